"""`ray job submit` of rec_reasoning against a local `ray start --head` with token authentication (slow).

Starts a head with cluster/local_up.sh (token auth is Ray 2.60's default), submits the debug recipe on a tiny model
with `recforge submit` (which wraps `ray job submit --working-dir .`), checks the job succeeded and wrote its run
directory, and stops the head.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def test_ray_job_submit_with_token_auth(tiny_model_dir, tmp_path):
    env = {**os.environ, "RAY": str(BIN / "ray"), "RAY_AUTH_MODE": "token"}
    subprocess.run(["bash", "cluster/local_up.sh", "2"], cwd=ROOT, env=env, check=True, timeout=180)
    try:
        run_dir = tmp_path / "runs"
        overrides = [
            f"model.path={tiny_model_dir}", "data.history_len=3", "data.max_train_users=20", "data.num_eval_users=2",
            "data.num_eval_candidates=3", "rollout.num_prompts_per_step=2", "rollout.max_new_tokens=8",
            "rollout.kv_cache_gib=0.5", "run.num_steps=1", f"run.output_dir={run_dir}", "run.name=submitted",
            "logging.tensorboard=false",
        ]
        out = subprocess.run([str(BIN / "recforge"), "submit", "rec_reasoning", "--config", "debug", *overrides],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "succeeded" in (out.stdout + out.stderr).lower()
        assert (run_dir / "submitted" / "metrics.jsonl").is_file()
    finally:
        subprocess.run(["bash", "cluster/local_down.sh"], cwd=ROOT, env=env, timeout=120)
