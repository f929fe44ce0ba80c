"""`ray job submit` of rec_reasoning against a local `ray start --head` with token authentication (slow, ~3 min).

Starts a head with cluster/local_up.sh (token auth on, dashboard on loopback; its own temp dir and free ports, so it
neither collides with nor captures other Ray instances on the machine), submits the debug recipe on the tiny model
with `recforge submit` (which wraps `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`), checks
that the job's logs stream back, that it succeeded and wrote its run directory, and stops the head with
cluster/local_down.sh (which stops that head only).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_ray_job_submit_with_token_auth(tiny_model_dir, tmp_path):
    gcs, dashboard, agent, client = free_ports(4)
    state = Path(tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY": str(BIN / "ray"), "RAY_AUTH_MODE": "token", "RECFORGE_RAY_DIR": str(state),
           "RAY_PORT": str(gcs), "DASHBOARD_PORT": str(dashboard), "AGENT_PORT": str(agent),
           "CLIENT_PORT": str(client), "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    env.pop("RAY_AUTH_TOKEN", None)  # the token comes from ~/.ray/auth_token, as for a user on the head
    up = subprocess.run(["bash", "cluster/local_up.sh", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        run_dir = tmp_path / "runs"
        overrides = [
            f"model.path={tiny_model_dir}", "data.history_len=3", "data.max_train_users=20", "data.num_eval_users=2",
            "data.num_eval_candidates=3", "rollout.num_prompts_per_step=2", "rollout.max_new_tokens=8",
            "rollout.kv_cache_gib=0.5", "run.num_steps=1", f"run.output_dir={run_dir}", "run.name=submitted",
            "logging.tensorboard=false", "logging.progress_bar=false",
        ]
        out = subprocess.run([str(BIN / "recforge"), "submit", "rec_reasoning", "--config", "debug", *overrides],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        text = out.stdout + out.stderr
        (tmp_path / "submit.log").write_text(text)  # the whole streamed log, for a look after a failure
        assert out.returncode == 0, text[-6000:]
        assert "succeeded" in text.lower()
        assert "Run finished:" in out.stdout, "the job's own output should stream back"  # printed by the recipe
        assert "--runtime-env" in out.stderr and "runtime_env.yaml" in out.stderr
        assert (run_dir / "submitted" / "metrics.jsonl").is_file()
        assert (run_dir / "submitted" / "checkpoints" / "step_000001" / "COMPLETE").is_file()
    finally:
        down = subprocess.run(["bash", "cluster/local_down.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        stopped = not (state / "head.sid").exists()
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0 and stopped, down.stdout + down.stderr

