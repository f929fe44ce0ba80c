"""Fixtures shared by the recipe integration tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ctr_model_dir(tmp_path_factory) -> Path:
    """The prepared CTR artifact of the `ecpm` reward, or one trained here for one epoch on a clean machine."""
    from rl import assets

    default = assets.home() / "artifacts" / "ctr"
    if (default / "model.pt").is_file():
        return default
    out = tmp_path_factory.mktemp("ctr")
    cmd = [sys.executable, "-m", "rewards.train", "ctr", "--out", str(out), "--epochs", "1", "--threads", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out
