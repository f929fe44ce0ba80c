"""Semantic IDs across process boundaries: the index file between runs, and rewards reading generated SIDs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.items import generated_item, sid_index_for
from rl.types import Rollout, Sample
from rollouts.sid import SIDIndex

ROOT = Path(__file__).resolve().parents[2]

WRITE = """
import sys, torch
from rollouts.sid import build_sid_index
x = torch.randn(40, 8, generator=torch.Generator().manual_seed(7))
index, _ = build_sid_index([*range(1, 31), *[f"B0{i}" for i in range(10)]], x, num_levels=2, codes_per_level=4)
index.save(sys.argv[1])
"""
READ = """
import json, sys
from rollouts.sid import SIDIndex
index = SIDIndex.load(sys.argv[1])
print(json.dumps([[repr(k), list(v)] for k, v in index.sids.items()]))
"""


def run_python(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_index_written_by_one_run_is_read_back_by_another_to_the_same_mapping(tmp_path):
    path = tmp_path / "sid_index.json"
    run_python(WRITE, str(path))
    first = json.loads(run_python(READ, str(path)))
    second = json.loads(run_python(READ, str(path)))
    assert first == second and len(first) == 40
    assert ["1", list(SIDIndex.load(path)[1])] in first and ["'B00'", list(SIDIndex.load(path)["B00"])] in first
    assert SIDIndex.load(path).to_json() == path.read_text()  # what was written is what is read


def rollout(text: str) -> Rollout:
    return Rollout(rollout_id="s/0", sample=Sample(sample_id="s", prompt="p", metadata={"user_id": 1}), index=0,
                   prompt_token_ids=(1,), completion_token_ids=(2,), text=text, logprobs=(0.0,),
                   finish_reason="stop", policy_version=0)


def test_sid_item_parser_reads_one_generated_sid(tmp_path):
    path = tmp_path / "foreign.json"
    path.write_text('{"7": ["<a_1>", "<b_2>"], "9": ["<a_1>", "<b_3>"], "12": ["<a_0>", "<b_0>"]}')
    index = sid_index_for("sid", str(path))
    assert sid_index_for("sid", str(path)) is index and sid_index_for("item_id", None) is None
    catalogue = {7, 9}
    found = generated_item(rollout("<a_1> <b_3>"), parser="sid", catalogue=catalogue, sid_index=index)
    assert found.item_id == 9 and found.raw == "<a_1><b_3>"
    cases = {"Toy Story": "no semantic ID", "<a_1><b_9>": "exactly one valid", "<a_1>": "exactly one valid",
             "<a_1><b_2><a_1><b_3>": "exactly one valid", "<a_0><b_0>": "not in the catalogue"}
    for text, reason in cases.items():
        found = generated_item(rollout(text), parser="sid", catalogue=catalogue, sid_index=index)
        assert found.item_id is None and reason in found.reason, (text, found)
    with pytest.raises(ValueError, match="needs kwargs.sid_index"):
        sid_index_for("sid", None)
