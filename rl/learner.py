"""DeepSpeed learners: one `Learner` per rank, one torch.distributed group, driven by a `LearnerGroup` handle.

This is the only module that imports deepspeed. A `Learner` is a plain class (tests build it without Ray); the
`LearnerGroup` on the driver wraps it in Ray actors, sets up the process group (rank 0's address and a free port
passed to every rank), shards each `TrainBatch` over the ranks and gathers metrics.

One optimiser step per training step (GRPO with a single update per batch): `old_logprobs` equal the learner's own
log-probs before the update (detached), so the ratio is 1 in value and carries the gradient; the sampler's log-probs
feed the truncated importance-sampling correction and the `rollout/logprob_mismatch` metric.

Gradient accumulation: the driver computes the loss denominator over the *global* batch; every micro-batch loss is
divided by it and summed, and multiplied by the world size because DeepSpeed averages gradients over ranks. The
learner marks the last micro-batch as the accumulation boundary itself, so `step()` is the single update whatever
the number of micro-batches (which varies with the step's batch).

Shape legend: B sequences, T tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from rl.advantages import LEVEL_ESTIMATORS
from rl.config import AlgorithmConfig, LearnerConfig
from rl.kernels import IGNORE_INDEX, fused_logprob_entropy, restricted_logprob_entropy
from rl.losses import policy_loss
from rl.types import TrainBatch
from rl.value_head import VALUE_HEAD, attach_value_head, hepo_micro_loss, is_value_head_tensor, level_values
from rl.weight_sync import WeightGroup, send_weights, write_safetensors

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def deepspeed_config(cfg: LearnerConfig, *, bf16: bool, world_size: int) -> dict:
    """The DeepSpeed config for one optimiser step per `train` call with caller-owned accumulation."""
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
                       "torch_adam": True},
        },
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.warmup_steps > 0:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": cfg.warmup_steps,
                       "warmup_type": "linear"},
        }
    return config


def micro_batches(batch: TrainBatch, size: int, count: int) -> Iterator[TrainBatch]:
    """Split `batch` into exactly `count` micro-batches of at most `size` sequences, trimming padding columns.

    Ranks must run the same number of forward/backward passes (ZeRO's collectives), so a rank with fewer sequences
    gets empty-mask micro-batches (one repeated sequence with loss_mask 0: it contributes nothing to the loss).
    """
    num = batch.num_sequences
    for i in range(count):
        lo, hi = i * size, min((i + 1) * size, num)
        if lo >= num:
            part = _slice(batch, 0, 1)
            yield replace(part, loss_mask_BT=torch.zeros_like(part.loss_mask_BT))
        else:
            yield _slice(batch, lo, hi)


def _slice(batch: TrainBatch, lo: int, hi: int) -> TrainBatch:
    attention_BT = batch.attention_mask_BT[lo:hi]
    width = int(attention_BT.sum(-1).max().item())
    return batch.rows(lo, hi, width=width)


@contextlib.contextmanager
def _gathered_if_partitioned(param: torch.nn.Parameter) -> Iterator[None]:
    """Gather a ZeRO-3 parameter unless DeepSpeed already holds it gathered (a tied embedding can be live in the
    embedding module's own hooks during backward); release only what this context gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        yield
        return
    param.all_gather(param_list=[param])
    try:
        yield
    finally:
        # With tied embeddings DeepSpeed's embedding hooks may claim the parameter meanwhile; it releases it then.
        if not param.ds_active_sub_modules and param.ds_status == ZeroParamStatus.AVAILABLE:
            param.partition(param_list=[param], has_been_updated=False)


def merge_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-micro-batch (or per-rank) metrics: `loss/*`, `*_sum` and token counts add up (they share the
    global denominator), `*_max` take the maximum, everything else (ratios, clip fractions) is averaged."""
    merged: dict[str, float] = {}
    keys = {key for part in parts for key in part}
    for key in keys:
        values = [part[key] for part in parts if key in part]
        if key.startswith("loss/") or key.endswith("_sum") or key == "rollout/num_loss_tokens":
            merged[key] = sum(values)
        elif key.endswith("_max"):
            merged[key] = max(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged


class Learner:
    """One DeepSpeed rank: policy (and optional frozen reference), fused log-probs, GRPO-family update."""

    def __init__(self, *, model_path: str, learner_cfg: LearnerConfig, algorithm_cfg: AlgorithmConfig,
                 dtype: str, temperature: float, rank: int, world_size: int, seed: int,
                 max_completion_length: int, num_threads: int | None = None) -> None:
        self.cfg, self.algo = learner_cfg, algorithm_cfg
        self.model_path, self.dtype = model_path, resolve_dtype(dtype)
        self.temperature, self.rank, self.world_size, self.seed = temperature, rank, world_size, seed
        self.max_completion_length = max_completion_length
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.engine = None
        self.ref_model = None
        self.weight_group = None  # the broadcast transport's group (rank 0 only)

    # -- setup ---------------------------------------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        """This rank's IP and a free port (asked of rank 0 to rendezvous the group)."""
        return socket.gethostbyname(socket.gethostname()), free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group and build the DeepSpeed engine (collective: every rank calls it together)."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0" if not torch.cuda.is_available()
                          else os.environ.get("LOCAL_RANK", "0"))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        torch.manual_seed(self.seed)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.algo.advantage in LEVEL_ESTIMATORS:  # HEPO: the critic, trained and checkpointed with the policy
            attach_value_head(model)
        ds_config = deepspeed_config(self.cfg, bf16=self.dtype == torch.bfloat16, world_size=self.world_size)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        if self.algo.kl_coef > 0:
            ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype)
            self.ref_model = ref.eval().requires_grad_(False).to(self.device)
        log.info("learner rank %d/%d ready (ZeRO-%d, %s)", self.rank, self.world_size, self.cfg.zero_stage,
                 self.dtype)

    # -- log-probs -----------------------------------------------------------------------------------------------

    def _lm_head_gather(self, model: torch.nn.Module, weight: torch.nn.Parameter):
        """Under ZeRO-3 the output projection is a partitioned shard: the fused op gathers it for the forward and
        again in its backward (which recomputes logits from the weight)."""
        if self.cfg.zero_stage == 3 and hasattr(weight, "ds_id"):
            return lambda: _gathered_if_partitioned(weight)
        return None

    def token_logprobs(self, model: torch.nn.Module, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-prob of each input token given its prefix, and the entropy there: (B, T) each, fp32.

        Position t holds log p(x_t | x_<t); position 0 and positions outside `loss_mask_BT` are 0. Only loss rows
        are computed (the fused kernel skips ignored rows), and logits are never materialised for the batch.
        """
        return self._logprobs_from_hidden(model, batch, self._hidden(model, batch))

    def _hidden(self, model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
        """Final hidden states (B, T, H) of the decoder (no logits)."""
        input_ids_BT = batch.input_ids_BT.to(self.device)
        attention_BT = batch.attention_mask_BT.to(self.device)
        return model.get_decoder()(input_ids=input_ids_BT, attention_mask=attention_BT).last_hidden_state

    def _logprobs_from_hidden(self, model: torch.nn.Module, batch: TrainBatch, hidden_BTH: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids_BT = batch.input_ids_BT.to(self.device)
        B, T, H = hidden_BTH.shape
        targets_BT = torch.full_like(input_ids_BT, IGNORE_INDEX)
        loss_mask_BT = batch.loss_mask_BT.to(self.device) > 0
        targets_BT[:, 1:] = torch.where(loss_mask_BT[:, 1:], input_ids_BT[:, 1:], IGNORE_INDEX)
        rows_M, cols_M, allowed_MA = self._constrained_rows(batch, loss_mask_BT)
        targets_BT[rows_M, cols_M] = IGNORE_INDEX  # scored over their allowed sets below, not the full vocabulary
        hidden_NH = hidden_BTH[:, :-1].reshape(-1, H)
        weight_VH = model.get_output_embeddings().weight
        gather = self._lm_head_gather(model, weight_VH)
        logprob_N, entropy_N = fused_logprob_entropy(
            hidden_NH, weight_VH, targets_BT[:, 1:].reshape(-1), self.temperature,
            chunk_size=self.cfg.logprob_chunk_size, gather=gather,
        )
        zeros_B1 = torch.zeros(B, 1, device=self.device, dtype=torch.float32)
        logprobs_BT = torch.cat([zeros_B1, logprob_N.view(B, T - 1)], dim=1)
        entropy_BT = torch.cat([zeros_B1, entropy_N.view(B, T - 1)], dim=1)
        if rows_M.numel():
            with gather() if gather is not None else contextlib.nullcontext():
                logprob_M, entropy_M = restricted_logprob_entropy(
                    hidden_BTH[rows_M, cols_M - 1], weight_VH, input_ids_BT[rows_M, cols_M], allowed_MA,
                    self.temperature)
            logprobs_BT = logprobs_BT.index_put((rows_M, cols_M), logprob_M)
            entropy_BT = entropy_BT.index_put((rows_M, cols_M), entropy_M)
        return logprobs_BT, entropy_BT

    def _constrained_rows(self, batch: TrainBatch, loss_mask_BT: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows_M, cols_M, allowed_MA): the loss positions the sampler drew under a token constraint, on device."""
        if batch.allowed_positions_BC is None or batch.allowed_ids_BCA is None:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty, empty.view(0, 1)
        positions_BC = batch.allowed_positions_BC.to(self.device)
        rows_BC = torch.arange(positions_BC.shape[0], device=self.device)[:, None].expand_as(positions_BC)
        keep_BC = positions_BC >= 0
        keep_BC &= loss_mask_BT[rows_BC, positions_BC.clamp(min=0)]
        return rows_BC[keep_BC], positions_BC[keep_BC], batch.allowed_ids_BCA.to(self.device)[keep_BC]

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Current policy log-probs (B, T) without gradient, on CPU (parity checks, diagnostics)."""
        self.engine.module.eval()
        return self.token_logprobs(self.engine.module, batch)[0].cpu()

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> torch.Tensor:
        """HEPO: the value head's V(s_l) at each level of `batch.level_positions_BL`, float32 (B, L) on CPU."""
        module = self.engine.module
        if not hasattr(module, VALUE_HEAD) or batch.level_positions_BL is None:
            raise ValueError("values() needs a value head (algorithm.advantage='hepo') and a per-level batch "
                             "(rl.hepo.with_levels).")
        module.eval()
        hidden_BTH = self._hidden(module, batch)
        return level_values(getattr(module, VALUE_HEAD), hidden_BTH, batch.level_positions_BL).cpu()

    # -- update --------------------------------------------------------------------------------------------------

    def train(self, batch: TrainBatch, *, loss_denominator: float, num_micro_batches: int,
              entropy_coef: float, kl_coef: float | None = None) -> dict[str, float]:
        """One optimiser step on this rank's shard; returns summed loss metrics and averaged diagnostics.

        `kl_coef` overrides algorithm.kl_coef for this step (curriculum stages); None keeps it."""
        start = time.perf_counter()
        kl_coef = self.algo.kl_coef if kl_coef is None else kl_coef
        if kl_coef > 0 and self.ref_model is None:
            raise ValueError(f"kl_coef={kl_coef} for this step, but no reference model was loaded "
                             "(algorithm.kl_coef=0). Set algorithm.kl_coef > 0.")
        self.engine.module.train()
        parts = []
        for index, micro in enumerate(micro_batches(batch, self.cfg.micro_batch_size, num_micro_batches)):
            # Caller-owned accumulation: only the last micro-batch is the boundary where ZeRO reduces gradients
            # and `step()` applies them (DeepSpeed's unmanaged mode loses micro-batches under ZeRO-3).
            self.engine.set_gradient_accumulation_boundary(index == num_micro_batches - 1)
            # We call the decoder directly (no logits), bypassing `engine.forward`, which is where ZeRO learns a new
            # micro-batch began; without this ZeRO-3 overwrites instead of accumulating earlier micro-batches' grads.
            if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
                self.engine.optimizer.clear_backward_seen_flag()
            loss, metrics = self._micro_step(micro, loss_denominator, entropy_coef, kl_coef)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if float(metrics["rollout/num_loss_tokens"]) > 0:  # padding micro-batches carry no statistics
                parts.append({key: float(value) for key, value in metrics.items()})
        self.engine.step()
        totals = merge_metrics(parts)
        grad_norm = self.engine.get_global_grad_norm()
        totals["learner/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["learner/lr"] = float(self.engine.get_lr()[0])
        totals["timing/train_rank"] = time.perf_counter() - start
        return totals

    def _micro_step(self, micro: TrainBatch, denominator: float, entropy_coef: float, kl_coef: float):
        module = self.engine.module
        hidden_BTH = self._hidden(module, micro)
        logprobs_BT, entropy_BT = self._logprobs_from_hidden(module, micro, hidden_BTH)
        mask_BT = micro.loss_mask_BT.to(self.device)
        sampler_BT = micro.old_logprobs_BT.to(self.device)
        if hasattr(module, VALUE_HEAD):  # HEPO: per-level clipped loss + value loss (rl/value_head.py)
            loss, metrics = hepo_micro_loss(logprobs_BT, hidden_BTH, getattr(module, VALUE_HEAD), micro,
                                            algo=self.algo, denominator=denominator)
            return loss, self._diagnostics(metrics, logprobs_BT, entropy_BT, sampler_BT, mask_BT)
        ref_BT = None
        if self.ref_model is not None and kl_coef > 0:
            with torch.no_grad():
                ref_BT = self.token_logprobs(self.ref_model, micro)[0]
        loss, metrics = policy_loss(
            logprobs_BT, logprobs_BT.detach(), micro.advantages_BT.to(self.device), mask_BT,
            loss_denominator=denominator, clip_low=self.algo.clip_low, clip_high=self.algo.clip_high,
            dual_clip=self.algo.dual_clip, ref_logprobs_BT=ref_BT, kl_coef=kl_coef,
            kl_estimator=self.algo.kl_estimator, entropy_BT=entropy_BT, entropy_coef=entropy_coef,
            sampler_logprobs_BT=sampler_BT if self.algo.tis_cap else None, tis_cap=self.algo.tis_cap,
            aggregation=self.algo.aggregation,
        )
        return loss, self._diagnostics(metrics, logprobs_BT, entropy_BT, sampler_BT, mask_BT)

    @staticmethod
    def _diagnostics(metrics: dict, logprobs_BT: torch.Tensor, entropy_BT: torch.Tensor, sampler_BT: torch.Tensor,
                     mask_BT: torch.Tensor) -> dict:
        with torch.no_grad():
            diff_BT = (logprobs_BT.detach() - sampler_BT).abs() * mask_BT
            metrics = dict(metrics)
            metrics["rollout/logprob_mismatch_sum"] = diff_BT.sum()
            metrics["rollout/logprob_mismatch_max"] = diff_BT.max()
            metrics["rollout/num_loss_tokens"] = mask_BT.sum()
            metrics["actor/entropy_sum"] = (entropy_BT.detach() * mask_BT).sum()
        return metrics

    # -- weights and checkpoints ---------------------------------------------------------------------------------

    @staticmethod
    def _exported_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        """HF-named tensors of the (gathered) module, read in place; a tied `lm_head.weight` is left out (the
        rollout worker hands the embedding over for it), and so is HEPO's value head (not part of the policy)."""
        tied = getattr(module.config, "tie_word_embeddings", False)
        return [(name, tensor.detach()) for name, tensor in module.state_dict().items()
                if not (tied and name == "lm_head.weight") and not is_value_head_tensor(name)]

    def _gathered(self, module: torch.nn.Module):
        """Every parameter whole while inside (collective under ZeRO-3: every rank enters it)."""
        if self.cfg.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def export_weights(self, directory: str) -> dict[str, float]:
        """Write HF-named safetensors for vLLM's `reload_weights` (rank 0 writes; collective under ZeRO-3).

        The bytes go from the parameters to the file once (`write_safetensors`), overwriting the directory's file in
        place (the caller, `rl.weight_sync.PathWeightSync`, never has it read meanwhile); a tied lm_head is left out
        (the rollout worker hands the embedding over for it, see rollouts/engine.py)."""
        module = self.engine.module
        num_bytes = 0
        with self._gathered(module):
            if self.rank == 0:
                path = Path(directory)
                path.mkdir(parents=True, exist_ok=True)
                num_bytes = write_safetensors(path / "model.safetensors", self._exported_tensors(module),
                                              in_place=True)
        return {"weight_sync/bytes": float(num_bytes)}

    # -- broadcast weight sync (rl.weight_sync.BroadcastWeightSync) -----------------------------------------------

    def weight_group_address(self) -> tuple[str, int, str]:
        """Rank 0's IP, a free port for the weight group's rendezvous, and its device type ("cuda" or "cpu")."""
        host, port = self.address()
        return host, port, self.device.type

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        """Rank 0 joins the weight group as its source (rank 0 of it); other ranks do nothing."""
        self.leave_weight_group()
        if self.rank == 0:
            self.weight_group = WeightGroup(host=host, port=port, rank=0, world_size=world_size, backend=backend,
                                            timeout_s=timeout_s, device=self.device)

    def broadcast_weights(self, policy_version: int, bucket_bytes: int) -> dict[str, float]:
        """Send the weights to the weight group (collective over the learner ranks under ZeRO-3: all call it)."""
        module = self.engine.module
        num_bytes = 0
        with self._gathered(module):
            if self.rank == 0:
                if getattr(self, "weight_group", None) is None:
                    raise RuntimeError("broadcast_weights before join_weight_group: the weight group is not set up.")
                try:
                    plan = send_weights(self.weight_group, self._exported_tensors(module),
                                        policy_version=policy_version, bucket_bytes=bucket_bytes)
                except BaseException:
                    self.leave_weight_group()  # closes the connections: receivers fail instead of hanging
                    raise
                num_bytes = plan.num_bytes
        return {"weight_sync/bytes": float(num_bytes)}

    def leave_weight_group(self) -> None:
        group = getattr(self, "weight_group", None)
        self.weight_group = None
        if group is not None:
            group.close()

    def save_checkpoint(self, directory: str, tag: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler) of every rank under `directory/tag`."""
        self.engine.save_checkpoint(directory, tag=tag, save_latest=False)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint '{tag}' in {directory}.")

    @torch.no_grad()
    def greedy(self, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation with the current weights (parity checks against the rollout workers)."""
        module = self.engine.module.eval()
        ids = torch.tensor([prompt_token_ids], device=self.device)
        out = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, temperature=None, top_p=None, top_k=None)
        return out[0, len(prompt_token_ids):].tolist()

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def export_checkpoint_weights(checkpoint_dir: str, tag: str, out_dir: str) -> dict[str, float]:
    """Consolidate a learner checkpoint (`{checkpoint_dir}/{tag}`, ZeRO-2 or ZeRO-3, any number of ranks) into
    `{out_dir}/model.safetensors`, HF-named fp32 weights that a rollout worker's `reload_weights` reads
    (`recforge eval`). Runs in the calling process, without an engine: DeepSpeed's zero_to_fp32 reads the fp32
    master weights from the optimizer shards. A tied `lm_head.weight` is left out, as `Learner.export_weights` does."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    if not (Path(checkpoint_dir) / tag).is_dir():
        raise FileNotFoundError(f"{checkpoint_dir} has no learner state '{tag}/' (is it a RecForge checkpoint, "
                                "runs/<name>/checkpoints/step_NNNNNN?).")
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    state = {name: tensor for name, tensor in state.items() if not is_value_head_tensor(name)}  # HEPO's critic
    embed = state.get("model.embed_tokens.weight")
    if embed is not None and "lm_head.weight" in state and torch.equal(state["lm_head.weight"], embed):
        del state["lm_head.weight"]
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return {"weights/bytes": float(sum(t.numel() * t.element_size() for t in state.values())),
            "weights/num_tensors": float(len(state))}
