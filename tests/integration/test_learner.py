"""Real DeepSpeed learners on CPU: micro-batches with the full-batch denominator give the same update as one batch,
under ZeRO-2 and ZeRO-3 (with the fused log-prob kernel and a tied lm_head gathered for the call, and with three
positions scored over constrained-decoding allowed sets, one of them forced)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def run_step(model_dir: Path, stage: int, micro: int) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "learner_accum_check.py"), str(model_dir), str(stage), str(micro)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", [2, 3])
def test_micro_batches_accumulate_to_the_full_batch_update(tiny_model_dir, stage):
    one = run_step(tiny_model_dir, 2, 4)  # the whole batch in one micro-batch, ZeRO-2
    split = run_step(tiny_model_dir, stage, 1)  # three micro-batches of one sequence
    assert split["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    assert split["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    for row_split, row_one in zip(split["logprobs"], one["logprobs"], strict=True):
        assert row_split == pytest.approx(row_one, abs=1e-4)
    assert one["grad_norm"] > 0
    # Positions 6-8 are scored over their allowed ids: the forced one (position 8) has log-prob 0 before and after.
    for row in (*one["before"], *one["logprobs"]):
        assert row[8] == 0.0 and row[7] < 0.0 and row[6] < 0.0
