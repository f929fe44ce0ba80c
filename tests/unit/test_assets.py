"""Asset preparation: sha256 checks, no-op re-runs, and redoing corrupted or partial assets (MovieLens-100K)."""

import shutil

import pytest

from rl import assets


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh $RECFORGE_HOME, seeded with the already downloaded recbole wheel when this machine has one."""
    real_wheel = assets.home() / "wheels" / assets.RECBOLE_WHEEL.filename
    monkeypatch.setenv("RECFORGE_HOME", str(tmp_path))
    if real_wheel.is_file():
        (tmp_path / "wheels").mkdir()
        shutil.copy(real_wheel, tmp_path / "wheels" / real_wheel.name)
    return tmp_path


def test_data_is_extracted_checked_and_rerun_is_a_noop(home, caplog):
    where = assets.prepare("data")["data"]
    for name, digest in assets.ML100K_SHA256.items():
        assert assets.sha256_file(where / name) == digest
    before = {p.name: p.stat().st_mtime_ns for p in where.iterdir()}
    with caplog.at_level("INFO", logger="rl.assets"):
        assets.prepare("data")
    assert {p.name: p.stat().st_mtime_ns for p in where.iterdir()} == before
    assert "nothing to do" in caplog.text
    assert assets.require("data") == where


def test_corrupted_file_is_detected_and_redone(home):
    where = assets.prepare("data")["data"]
    inter = where / "ml-100k.inter"
    data = bytearray(inter.read_bytes())
    data[100] ^= 0xFF  # same size, different content: only the sha256 can tell
    inter.write_bytes(bytes(data))
    assert "sha256" in assets.verify_manifest(where)
    assets.prepare("data")
    assert assets.sha256_file(inter) == assets.ML100K_SHA256["ml-100k.inter"]


def test_partial_asset_is_never_used(home):
    where = assets.data_dir()
    where.mkdir(parents=True)
    (where / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t2\n")  # interrupted: no manifest
    with pytest.raises(assets.AssetError, match="recforge prepare data"):
        assets.require("data")
    assets.prepare("data")
    assert assets.sha256_file(where / "ml-100k.inter") == assets.ML100K_SHA256["ml-100k.inter"]


def test_checksum_failure_is_an_error_and_leaves_nothing_behind(home, monkeypatch):
    monkeypatch.setitem(assets.ML100K_SHA256, "ml-100k.item", "0" * 64)
    with pytest.raises(assets.AssetError, match=r"ml-100k\.item .* expected 0{64}"):
        assets.prepare("data")
    assert not assets.data_dir().exists()
    assert not [p for p in assets.data_dir().parent.iterdir() if p.name.startswith(".")]


def test_corrupted_wheel_is_rejected(home, monkeypatch):
    assets.fetch_wheel(assets.RECBOLE_WHEEL)
    wrong = assets.Wheel(assets.RECBOLE_WHEEL.requirement, assets.RECBOLE_WHEEL.filename, "f" * 64)
    with pytest.raises(assets.AssetError, match="refusing to use it"):
        assets.fetch_wheel(wrong)
