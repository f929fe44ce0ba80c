"""Supervised warm-start: fine-tune a causal LM on (prompt → target) pairs with a completion-only loss.

RL needs a policy that already emits valid outputs: a model whose semantic-ID tokens were just added (their
embeddings drawn around the mean of the old rows) samples SIDs almost uniformly, so GRPO-family advantages have little
to work with. A short SFT on user history → next item's SID, plus item title ↔ SID alignment pairs (LC-Rec, TIGER-
style warm-up), teaches the new tokens first. Recipes call `warm_start` between adding tokens and building the
Trainer; `cfg.sft` (rl/config.py: SFTConfig) sets the steps and optimiser, `sft.num_steps: 0` turns it off.

The loss is the token-mean cross-entropy over target tokens only (prompt tokens are labelled -100), with the target
followed by the tokenizer's EOS: exactly the tokens a rollout worker samples after the same rendered prompt (prompt and
target are tokenized apart, without special tokens, as the worker tokenizes prompts), so SFT and RL see one boundary.

Why a plain torch loop and not TRL's SFTTrainer (trl 1.16 is installed): on these 2-core CPU hosts the warm-start
runs inside the recipe's driver before Ray starts, for tens to hundreds of steps on a 135M model; a loop of AdamW
steps on one device has no accelerate/datasets start-up, no dataset materialisation (examples are built lazily, so
a 20k-pair source costs only what is sampled), and its loss is the few lines below. It is meant for models that fit
on one device with AdamW state; for a large model run TRL's SFTTrainer (or the DeepSpeed learner) separately and
point `model.path` at its output with `sft.num_steps: 0`.

Caching. `warm_start` writes `out_dir` atomically with `sft.json` (settings fingerprint + metrics). A later call with
the same settings reuses it (a resumed run never redoes the warm-start); different settings raise, because the run's
RL checkpoints were trained from the first model.

Shape legend: B examples in a batch, T tokens (prompt + target, left-padded), K target tokens kept, V
vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rl.config import ConfigError, SFTConfig

log = logging.getLogger(__name__)

IGNORE = -100
MARKER = "sft.json"


@dataclass(frozen=True)
class SFTExample:
    """One supervised pair. `prompt` is the rendered prompt text (chat template applied, generation prompt included);
    `target` is what the model should answer (the tokenizer's EOS is appended when training)."""

    prompt: str
    target: str


class LazyExamples(Sequence[SFTExample]):
    """`num` examples built on demand by `make(i)` (a 20k-pair source costs only the pairs a warm-start draws)."""

    def __init__(self, num: int, make: Callable[[int], SFTExample]) -> None:
        self.num = num
        self.make = make

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.make(j) for j in range(*i.indices(self.num))]
        if not -self.num <= i < self.num:
            raise IndexError(i)
        return self.make(i % self.num)


@dataclass(frozen=True)
class SFTResult:
    model_path: str
    metrics: dict[str, float]
    reused: bool
    """True when an earlier warm-start with the same settings was found and reused."""


def encode_example(tokenizer: Any, example: SFTExample) -> tuple[list[int], list[int]]:
    """(input ids, labels): prompt ids + target ids + EOS; labels are -100 on the prompt."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target = [*target, tokenizer.eos_token_id]
    if not target:
        raise ValueError(f"SFT example with an empty target (prompt ends {example.prompt[-60:]!r}).")
    return prompt + target, [IGNORE] * len(prompt) + target


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids_BT`, `attention_mask_BT`, `position_ids_BT`, `labels_BT` (padding labelled -100).

    Left padding puts every row's target at the end, so the model computes logits only for the last few positions
    (`logits_to_keep`): a 300-token prompt with a 4-token SID costs 5 rows of V logits, not 300.
    """
    width = max(len(ids) for ids, _ in encoded)
    ids_BT = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels_BT = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask_BT = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, (ids, labels) in enumerate(encoded):
        ids_BT[b, width - len(ids):] = torch.tensor(ids)
        labels_BT[b, width - len(labels):] = torch.tensor(labels)
        mask_BT[b, width - len(ids):] = 1
    position_ids_BT = (mask_BT.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids_BT, "attention_mask": mask_BT, "position_ids": position_ids_BT, "labels": labels_BT}


def target_logprobs_B(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over target tokens of log p(token | everything before it), per example (float32).

    Targets are the labelled tokens at the end of each (left-padded) row; logits are computed for the last
    `num_targets + 1` positions only, and position p's logits predict token p + 1.
    """
    device = next(model.parameters()).device
    labels_BT = batch["labels"]
    is_target_BT = labels_BT != IGNORE
    num_targets = int(is_target_BT.sum(dim=1).max())
    if bool(is_target_BT[:, : labels_BT.shape[1] - num_targets].any()):
        raise ValueError("SFT labels must be one contiguous target at the end of each row (use rl.sft.collate).")
    logits_BKV = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       position_ids=batch["position_ids"].to(device), logits_to_keep=num_targets + 1).logits
    labels_BK = labels_BT[:, -num_targets:].to(device)
    logp_BKV = torch.log_softmax(logits_BKV[:, :-1].float(), dim=-1)
    picked_BK = logp_BKV.gather(-1, labels_BK.clamp(min=0)[..., None]).squeeze(-1)
    return (picked_BK * (labels_BK != IGNORE)).sum(dim=1)


def completion_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean cross-entropy over the batch's target tokens; (loss, detached per-example summed NLL `nll_B`)."""
    num_tokens = int((batch["labels"] != IGNORE).sum())
    logprobs_B = target_logprobs_B(model, batch)
    return -logprobs_B.sum() / max(num_tokens, 1), -logprobs_B.detach()


@torch.no_grad()
def mean_target_logprob(model: Any, tokenizer: Any, examples: Sequence[SFTExample], *, batch_size: int = 8) -> float:
    """Mean over `examples` of log p(target + EOS | prompt) under `model` (a check that SFT did its job)."""
    was_training = model.training
    model.eval()
    pad_id = _pad_id(tokenizer)
    total = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = [encode_example(tokenizer, examples[i]) for i in range(start, min(start + batch_size, len(examples)))]
        total += float(target_logprobs_B(model, collate(chunk, pad_id)).sum())
    model.train(was_training)
    return total / max(len(examples), 1)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _draw(sources: Mapping[str, Sequence[SFTExample]], weights: Mapping[str, float], batch_size: int,
          rng: random.Random) -> list[tuple[str, SFTExample]]:
    names = [n for n in sources if weights.get(n, 0.0) > 0 and len(sources[n])]
    picked = rng.choices(names, weights=[weights[n] for n in names], k=batch_size)
    return [(name, sources[name][rng.randrange(len(sources[name]))]) for name in picked]


def finetune(model: Any, tokenizer: Any, sources: Mapping[str, Sequence[SFTExample]], weights: Mapping[str, float],
             *, cfg: SFTConfig, seed: int, progress: bool = True) -> dict[str, float]:
    """`cfg.num_steps` AdamW steps on `model` in place; each example of a batch comes from source s with probability
    ∝ weights[s], uniformly within it. Returns `sft/*` metrics (first and last-10-step losses, per-source losses)."""
    from tqdm import tqdm

    if not any(weights.get(n, 0.0) > 0 and len(s) for n, s in sources.items()):
        raise ValueError(f"SFT has nothing to train on: sources {({n: len(s) for n, s in sources.items()})} with "
                         f"weights {dict(weights)}; give a non-empty source a positive weight.")
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    pad_id = _pad_id(tokenizer)
    losses: list[float] = []
    per_source: dict[str, list[tuple[int, float, int]]] = {}  # (step, summed NLL, target tokens) per example
    bar = tqdm(range(cfg.num_steps), desc="sft", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        drawn = _draw(sources, weights, cfg.batch_size, rng)
        batch = collate([encode_example(tokenizer, e) for _, e in drawn], pad_id)
        loss, nll_B = completion_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        num_targets_B = (batch["labels"] != IGNORE).sum(dim=1).tolist()
        for (name, _), nll, count in zip(drawn, nll_B.tolist(), num_targets_B, strict=True):
            per_source.setdefault(name, []).append((len(losses), nll, count))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"SFT loss became {losses[-1]} at step {len(losses)}; lower sft.lr.")
    model.eval()
    tail = losses[-10:]
    metrics = {"sft/num_steps": float(len(losses)), "sft/loss_first": losses[0] if losses else float("nan"),
               "sft/loss_last10": sum(tail) / len(tail) if tail else float("nan")}
    for name, rows in per_source.items():  # token-mean loss of that source's examples in the last 10 steps
        recent = [(nll, count) for step, nll, count in rows if step > len(losses) - 10]
        if recent:
            metrics[f"sft/loss_last10_{name}"] = sum(n for n, _ in recent) / max(sum(c for _, c in recent), 1)
    return metrics


def warm_start(base_path: str, sources: Mapping[str, Sequence[SFTExample]], weights: Mapping[str, float],
               out_dir: Path, *, cfg: SFTConfig, seed: int, progress: bool = True) -> SFTResult:
    """Fine-tune the model at `base_path` (see `finetune`) and save it with its tokenizer to `out_dir`, once.

    An `out_dir` holding a finished warm-start with the same settings is reused; one with other settings raises a
    ConfigError (the run's later stages were built on it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    settings = {"base_path": str(base_path), "sft": dataclasses.asdict(cfg), "seed": seed,
                "sources": {name: len(examples) for name, examples in sources.items()},
                "weights": {name: float(w) for name, w in weights.items()}}
    marker = out_dir / MARKER
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["settings"] != settings:
            changed = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
            raise ConfigError(f"{out_dir} holds a warm-start made with other settings ({', '.join(changed)} differ: "
                              f"{ {k: saved['settings'].get(k) for k in changed} } then, "
                              f"{ {k: settings[k] for k in changed} } now). This run's checkpoints start from it: "
                              "use a new run.name (or delete that directory to redo the warm-start).")
        log.info("Reusing the SFT warm-start in %s (%s).", out_dir, _summary(saved["metrics"]))
        return SFTResult(model_path=str(out_dir), metrics=saved["metrics"], reused=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(device)
    torch.manual_seed(seed)
    metrics = finetune(model, tokenizer, sources, weights, cfg=cfg, seed=seed, progress=progress)
    partial = out_dir.with_name(f".partial-{out_dir.name}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / MARKER).write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an unfinished earlier attempt (no marker)
    os.replace(partial, out_dir)
    log.info("SFT warm-start: %s -> %s (%s).", base_path, out_dir, _summary(metrics))
    return SFTResult(model_path=str(out_dir), metrics=metrics, reused=False)


def _summary(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in sorted(metrics.items()))
