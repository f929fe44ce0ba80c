"""HEPO's value head in a real DeepSpeed learner on CPU (ZeRO-2 and ZeRO-3, gloo): it starts at V = 0 and learns, it
is saved and restored with the checkpoint (the resumed learner takes exactly the same next step, critic included),
and no weight export for the rollout workers or `recforge eval` carries it.

    flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest tests/integration/test_value_head.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_value_head_learns_resumes_exactly_and_stays_out_of_exports(tiny_model_dir, tmp_path, stage):
    out = subprocess.run([sys.executable, str(HERE / "hepo_learner_check.py"), str(tiny_model_dir), str(tmp_path),
                          str(stage)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["values_0"] == [[0.0, 0.0]] * 3  # zero-initialised head
    assert r["values_1"] != r["values_0"] and r["values_2"] != r["values_1"]
    assert r["values_1_resumed"] == r["values_1"]
    for row, expected in zip(r["values_2_resumed"], r["values_2"], strict=True):
        assert row == pytest.approx(expected, abs=1e-6)
    for key in ("loss/total", "loss/policy", "loss/value", "learner/grad_norm", "critic/value_sum"):
        assert r["resumed_step"][key] == pytest.approx(r["second_step"][key], rel=1e-5, abs=1e-7), key
    assert r["second_step"]["loss/value"] > 0 and "loss/policy_level1" in r["second_step"]
    assert r["exported_value_head"] == [] and r["num_exported"] == r["num_consolidated"] > 0
