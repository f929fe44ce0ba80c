"""Semantic IDs: residual k-means codes for items, the item → SID index JSON, and SID tokens in a HF model.

A semantic ID (SID) is a short token sequence per item, "<a_12><b_7><c_3>", where items with similar embeddings share
leading tokens (TIGER, Rajput et al. 2023; LC-Rec). Here the codes come from residual k-means (a training-free
stand-in for RQ-VAE): level 1 clusters the item embeddings into K codes, level ℓ clusters the residuals left by levels
< ℓ. Items that still share all L codes get one extra level that numbers them 0, 1, ... within their group (TIGER's
collision fix), so SIDs are unique and all of one length.

The index file is the widely used JSON form `{"item_id": ["<a_12>", "<b_7>", "<c_3>"], ...}`. `SIDIndex.save` writes
it one item per line in item order; `SIDIndex.load` reads it back to the same mapping, and accepts any index written
elsewhere in that form (any item ids, any `<...>` tokens, any lengths) as long as SIDs are unique and no SID is a
prefix of another (else constrained decoding could not tell where an ID ends); problems are reported per item and
line. Token order for the tokenizer: by level prefix, then code number.

Decoding (the trie over valid SIDs, constrained sampling and beam search, and SID → item decoding) lives in
`rollouts/sid_trie.py` and is re-exported here.

Shape legend: N items, D embedding size, K codes per level, L levels, V vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rollouts.envs.rec_data import DataError, Id, id_sort_key, parse_id
from rollouts.envs.rec_formats import iter_json_entries
from rollouts.sid_trie import BeamHit, SIDTrie, constrained_beam_search, constrained_greedy, sample_sids

log = logging.getLogger(__name__)

__all__ = [
    "SIDIndexError", "SIDIndex", "KMeansResult", "kmeans", "residual_kmeans", "resolve_collisions", "code_metrics",
    "build_sid_index", "sid_token", "add_sid_tokens", "SIDTrie", "BeamHit", "constrained_beam_search",
    "constrained_greedy", "sample_sids", "LEVEL_PREFIXES",
]

LEVEL_PREFIXES = "abcdefghijklmnopqrstuvwxyz"
"""Level ℓ (0-based) writes its codes as `<{LEVEL_PREFIXES[ℓ]}_{code}>`."""
TOKEN_RE = re.compile(r"<[^<>\s]+>")
_LEVEL_TOKEN_RE = re.compile(r"<([A-Za-z]+)_(\d+)>")
_MAX_LISTED_PROBLEMS = 20


class SIDIndexError(DataError):
    """A semantic-ID index is invalid; the message lists each problem with its item and line."""


def sid_token(level: int, code: int) -> str:
    """The token of `code` at 0-based `level`: sid_token(0, 12) == "<a_12>"."""
    if not 0 <= level < len(LEVEL_PREFIXES):
        raise ValueError(f"level {level} is out of range: SIDs support up to {len(LEVEL_PREFIXES)} levels.")
    return f"<{LEVEL_PREFIXES[level]}_{code}>"


# ---------------------------------------------------------------------------------------------------------------------
# Residual k-means.


@dataclass(frozen=True)
class KMeansResult:
    centroids_KD: torch.Tensor
    """float64 cluster centres."""
    codes_N: torch.Tensor
    """int64 nearest centre of each point."""
    inertia: float
    """Sum of squared distances of the points to their centres."""
    num_iters: int


def _sqdist_NK(x_ND: torch.Tensor, c_KD: torch.Tensor) -> torch.Tensor:
    d_NK = (x_ND * x_ND).sum(1, keepdim=True) - 2.0 * x_ND @ c_KD.T + (c_KD * c_KD).sum(1)[None, :]
    return d_NK.clamp_min_(0.0)


def _kmeans_pp_init(x_ND: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn ∝ squared distance to the nearest."""
    n = x_ND.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    d2_N = ((x_ND - x_ND[chosen[0]]) ** 2).sum(1)
    for _ in range(1, num_clusters):
        total = float(d2_N.sum())
        if total <= 0.0:  # fewer distinct points than clusters: the rest stay duplicates (and end up unused)
            chosen.append(int(torch.randint(n, (1,), generator=generator)))
        else:
            chosen.append(int(torch.multinomial(d2_N / total, 1, generator=generator)))
        d2_N = torch.minimum(d2_N, ((x_ND - x_ND[chosen[-1]]) ** 2).sum(1))
    return x_ND[chosen].clone()


def kmeans(x_ND: torch.Tensor, num_clusters: int, *, seed: int, max_iters: int = 100,
           tol: float = 1e-10) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding, in float64 on CPU, so the same seed gives the same codes anywhere.

    An empty cluster is re-seeded with the point farthest from its centre (stable order, so ties are deterministic).
    Stops when the centres move less than `tol` (sum of squared shifts) or after `max_iters`.
    """
    if x_ND.ndim != 2 or x_ND.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [N, D] tensor, got shape {tuple(x_ND.shape)}.")
    if num_clusters < 1:
        raise ValueError(f"num_clusters={num_clusters} must be >= 1.")
    x_ND = x_ND.detach().to("cpu", torch.float64)
    generator = torch.Generator().manual_seed(seed)
    c_KD = _kmeans_pp_init(x_ND, num_clusters, generator)
    num_iters = 0
    for num_iters in range(1, max_iters + 1):  # noqa: B007 -- reported below
        d_NK = _sqdist_NK(x_ND, c_KD)
        codes_N = d_NK.argmin(1)  # first minimum on ties: deterministic
        counts_K = torch.bincount(codes_N, minlength=num_clusters)
        sums_KD = torch.zeros_like(c_KD).index_add_(0, codes_N, x_ND)
        new_KD = sums_KD / counts_K.clamp_min(1)[:, None].to(torch.float64)
        empty_K = counts_K == 0
        if bool(empty_K.any()):
            far_N = d_NK.gather(1, codes_N[:, None]).squeeze(1)
            order = torch.argsort(far_N, descending=True, stable=True)
            new_KD[empty_K] = x_ND[order[: int(empty_K.sum())]]
        shift = float(((new_KD - c_KD) ** 2).sum())
        c_KD = new_KD
        if shift <= tol:
            break
    d_NK = _sqdist_NK(x_ND, c_KD)
    codes_N = d_NK.argmin(1)
    inertia = float(d_NK.gather(1, codes_N[:, None]).sum())
    return KMeansResult(centroids_KD=c_KD, codes_N=codes_N, inertia=inertia, num_iters=num_iters)


def residual_kmeans(x_ND: torch.Tensor, *, num_levels: int, codes_per_level: int, seed: int = 0,
                    max_iters: int = 100) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """codes_NL (int64) and the L codebooks [K, D]: level ℓ clusters what levels < ℓ left unexplained.

    Level ℓ uses seed + ℓ, so one seed fixes every level.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels={num_levels} must be >= 1.")
    residual_ND = x_ND.detach().to("cpu", torch.float64).clone()
    codes, codebooks = [], []
    for level in range(num_levels):
        result = kmeans(residual_ND, codes_per_level, seed=seed + level, max_iters=max_iters)
        residual_ND -= result.centroids_KD[result.codes_N]
        codes.append(result.codes_N)
        codebooks.append(result.centroids_KD)
        log.debug("level %d: inertia %.4f after %d iterations", level + 1, result.inertia, result.num_iters)
    return torch.stack(codes, dim=1), codebooks


def resolve_collisions(codes_NL: torch.Tensor) -> torch.Tensor:
    """Unique codes: when items share all L codes, append a level numbering them 0, 1, ... in item order.

    Every item gets the extra level (0 when it collides with nothing), so all SIDs keep one length; without any
    collision the codes come back unchanged (a copy).
    """
    _, inverse_N, counts_G = torch.unique(codes_NL, dim=0, return_inverse=True, return_counts=True)
    if codes_NL.shape[0] == 0 or int(counts_G.max()) <= 1:
        return codes_NL.clone()
    next_in_group: dict[int, int] = {}
    extra = []
    for group in inverse_N.tolist():
        extra.append(next_in_group.get(group, 0))
        next_in_group[group] = extra[-1] + 1
    return torch.cat([codes_NL, torch.tensor(extra, dtype=codes_NL.dtype)[:, None]], dim=1)


def code_metrics(codes_NL: torch.Tensor, *, codes_per_level: int) -> dict[str, float]:
    """Collision and code-usage metrics of raw (unresolved) codes.

    sid/collision_rate: 1 − distinct SIDs / items (0 = every item has its own SID).
    sid/colliding_items: fraction of items that share their SID with another item.
    sid/max_items_per_sid: size of the largest group sharing one SID (the extra level needs that many codes).
    sid/code_usage_l{ℓ}: fraction of the K codes of level ℓ that some item uses.
    sid/code_perplexity_l{ℓ}: exp(entropy) of level ℓ's code distribution (K = perfectly balanced, 1 = one code).
    """
    num_items, num_levels = codes_NL.shape
    _, counts_G = torch.unique(codes_NL, dim=0, return_counts=True)
    metrics = {
        "sid/num_items": float(num_items),
        "sid/collision_rate": 1.0 - counts_G.numel() / num_items,
        "sid/colliding_items": float(counts_G[counts_G > 1].sum()) / num_items,
        "sid/max_items_per_sid": float(counts_G.max()),
    }
    for level in range(num_levels):
        counts_K = torch.bincount(codes_NL[:, level], minlength=codes_per_level).to(torch.float64)
        p_K = counts_K[counts_K > 0] / num_items
        metrics[f"sid/code_usage_l{level + 1}"] = float((counts_K > 0).sum()) / codes_per_level
        metrics[f"sid/code_perplexity_l{level + 1}"] = math.exp(float(-(p_K * p_K.log()).sum()))
    return metrics


def build_sid_index(
    item_ids: Sequence[Id], embeddings_ND: torch.Tensor, *, num_levels: int = 3, codes_per_level: int = 32,
    seed: int = 0, max_iters: int = 100,
) -> tuple[SIDIndex, dict[str, float]]:
    """Residual k-means SIDs for `item_ids` (row n of `embeddings_ND` is item n), collisions resolved.

    Returns the index and `code_metrics` of the raw codes plus `sid/num_levels` (L, or L + 1 with the extra level)
    and `sid/extra_level_codes` (codes the extra level needs; 0 without one).
    """
    if len(item_ids) != embeddings_ND.shape[0]:
        raise ValueError(f"{len(item_ids)} item ids for {embeddings_ND.shape[0]} embedding rows; they must match.")
    codes_NL, _ = residual_kmeans(embeddings_ND, num_levels=num_levels, codes_per_level=codes_per_level, seed=seed,
                                  max_iters=max_iters)
    metrics = code_metrics(codes_NL, codes_per_level=codes_per_level)
    resolved_NM = resolve_collisions(codes_NL)
    metrics["sid/num_levels"] = float(resolved_NM.shape[1])
    metrics["sid/extra_level_codes"] = float(resolved_NM[:, -1].max() + 1) if resolved_NM.shape[1] > num_levels else 0.0
    return SIDIndex.from_codes(item_ids, resolved_NM), metrics


# ---------------------------------------------------------------------------------------------------------------------
# The index.


def _token_sort_key(token: str) -> tuple[str, int, str]:
    match = _LEVEL_TOKEN_RE.fullmatch(token)
    return (match.group(1), int(match.group(2)), "") if match else (token, -1, token)


class SIDIndex:
    """Item id → semantic ID (a tuple of token strings); SIDs are unique and prefix-free (checked on construction).

    Two indexes are equal when they map the same items to the same SIDs.
    """

    def __init__(self, sids: Mapping[Any, Sequence[str]], *, source: str = "<mapping>",
                 lines: Mapping[Id, int] | None = None) -> None:
        problems: list[str] = []
        where = lambda item: f"line {lines[item]}, item {item!r}" if lines and item in lines else f"item {item!r}"
        normalised: dict[Id, tuple[str, ...]] = {}
        for raw_id, sid in sids.items():
            try:
                item_id = parse_id(raw_id)
            except ValueError as err:
                problems.append(f"item {raw_id!r}: {err}")
                continue
            problem = _sid_problem(sid)
            if problem:
                problems.append(f"{where(item_id)}: {problem}")
            elif item_id in normalised:
                problems.append(f"{where(item_id)}: the item appears twice (as {raw_id!r} and another spelling).")
            else:
                normalised[item_id] = tuple(sid)
        self.sids: dict[Id, tuple[str, ...]] = dict(sorted(normalised.items(), key=lambda kv: id_sort_key(kv[0])))
        self._by_sid: dict[tuple[str, ...], Id] = {}
        for item_id, sid in self.sids.items():
            other = self._by_sid.setdefault(sid, item_id)
            if other != item_id:
                problems.append(f"{where(item_id)}: same SID {''.join(sid)} as {where(other)}; SIDs must be unique "
                                "(resolve collisions with an extra level, see resolve_collisions).")
        for item_id, sid in self.sids.items():
            for k in range(1, len(sid)):
                other = self._by_sid.get(sid[:k])
                if other is not None:
                    problems.append(f"{where(item_id)}: its SID {''.join(sid)} starts with the whole SID of "
                                    f"{where(other)}, so a decoder could not tell where an ID ends.")
        _raise_problems(source, problems)
        self._string_trie: SIDTrie | None = None

    @classmethod
    def from_codes(cls, item_ids: Sequence[Id], codes_NL: torch.Tensor) -> SIDIndex:
        """Integer codes → tokens: level ℓ code c becomes `sid_token(ℓ, c)`."""
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item_ids contains duplicates; each item needs exactly one SID.")
        rows = codes_NL.tolist()
        pairs = zip(item_ids, rows, strict=True)
        return cls({item: tuple(sid_token(lv, c) for lv, c in enumerate(row)) for item, row in pairs})

    # -- file form ----------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """`{"item_id": ["<a_1>", ...], ...}`, one item per line, in item order."""
        lines = [f"  {json.dumps(str(item))}: {json.dumps(list(sid))}" for item, sid in self.sids.items()]
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def save(self, path: Path | str) -> Path:
        """Write the index JSON atomically (a reader never sees a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; an index is meant to be read by other processes
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: Path | str) -> SIDIndex:
        """Read an index JSON written by `save` or elsewhere; every problem is reported with its item and line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist.")
        sids: dict[str, Sequence[str]] = {}
        lines: dict[Id, int] = {}
        problems: list[str] = []
        try:
            for line, key, value in iter_json_entries(path):
                if key is None:
                    raise SIDIndexError(f"{path}:{line}: expected an object {{item_id: [tokens]}} at the top level, "
                                        "got a list.")
                try:
                    item_id = parse_id(key)
                except ValueError as err:
                    problems.append(f"line {line}, item {key!r}: {err}")
                    continue
                if item_id in lines:
                    problems.append(f"line {line}, item {item_id!r}: the item is already listed on line "
                                    f"{lines[item_id]}.")
                    continue
                lines[item_id] = line
                problem = _sid_problem(value)
                if problem:
                    problems.append(f"line {line}, item {item_id!r}: {problem}")
                else:
                    sids[key] = value
        except SIDIndexError:
            raise
        except DataError as err:
            raise SIDIndexError(str(err)) from err
        _raise_problems(str(path), problems)
        return cls(sids, source=str(path), lines=lines)

    # -- lookups ------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sids)

    def __iter__(self) -> Iterator[Id]:
        return iter(self.sids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.sids

    def __getitem__(self, item_id: Id) -> tuple[str, ...]:
        return self.sids[item_id]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SIDIndex) and self.sids == other.sids

    __hash__ = None  # mutable-looking container semantics: equal by content, not hashable

    def __repr__(self) -> str:
        return f"SIDIndex({len(self)} items, up to {self.max_len} tokens each)"

    @property
    def max_len(self) -> int:
        return max((len(s) for s in self.sids.values()), default=0)

    def sid_text(self, item_id: Id) -> str:
        """The SID as one string, "<a_12><b_7><c_3>"."""
        return "".join(self.sids[item_id])

    def item_for(self, tokens: Sequence[str]) -> Id | None:
        """The item whose SID is exactly `tokens`, or None."""
        return self._by_sid.get(tuple(tokens))

    def tokens(self) -> list[str]:
        """Every distinct SID token, ordered by level prefix then code number ("<a_0>", "<a_1>", ..., "<b_0>", ...)."""
        return sorted({t for sid in self.sids.values() for t in sid}, key=_token_sort_key)

    def parse(self, text: str) -> list[Id | None]:
        """Items named by the SIDs in generated text, in order; None for each invalid or unfinished SID.

        Whitespace between SID tokens is ignored; any other text separates SIDs (see `SIDTrie.decode`).
        """
        if self._string_trie is None:
            self._string_trie = SIDTrie(self.sids)
        symbols = re.findall(r"<[^<>\s]+>|\S", text)
        return self._string_trie.decode(symbols)

    def trie(self, token_to_id: Mapping[str, int], *, end_ids: Sequence[int] = ()) -> SIDTrie:
        """The token-id trie for constrained decoding (`token_to_id` as returned by `add_sid_tokens`)."""
        return SIDTrie.from_index(self, token_to_id, end_ids=end_ids)

    def metrics(self) -> dict[str, float]:
        """Shape of an index from any source: items, distinct tokens, SID length, distinct tokens per position."""
        out = {"sid/num_items": float(len(self)), "sid/num_tokens": float(len(self.tokens())),
               "sid/max_len": float(self.max_len)}
        for pos in range(self.max_len):
            out[f"sid/distinct_tokens_p{pos + 1}"] = float(len({s[pos] for s in self.sids.values() if len(s) > pos}))
        return out


def _raise_problems(source: str, problems: list[str]) -> None:
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
        extra = len(problems) - _MAX_LISTED_PROBLEMS
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise SIDIndexError(f"{source}: {len(problems)} problem(s) in the semantic-ID index:\n  {listed}{more}")


def _sid_problem(sid: object) -> str | None:
    """Why `sid` is not a valid SID (a non-empty list of "<...>" token strings), or None."""
    if not isinstance(sid, (list, tuple)):
        return f"expected a list of tokens like [\"<a_12>\", \"<b_7>\"], got {type(sid).__name__} {sid!r:.60}."
    if not sid:
        return "the SID is empty; every item needs at least one token."
    for pos, token in enumerate(sid):
        if not isinstance(token, str):
            return f"token {pos + 1} is {type(token).__name__} {token!r}, expected a string like \"<a_12>\"."
        if not TOKEN_RE.fullmatch(token):
            return f"token {pos + 1} {token!r} is not of the form \"<...>\" (no spaces or angle brackets inside)."
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and model.


def add_sid_tokens(tokenizer: Any, index: SIDIndex, model: Any = None, *, pad_to_multiple_of: int | None = None,
                   mean_resizing: bool = True) -> dict[str, int]:
    """Add the index's SID tokens to a HF tokenizer (and grow `model`'s embeddings to match); token → id.

    Tokens are added as ordinary (non-special) added tokens, so `decode(..., skip_special_tokens=True)` keeps them
    and each is matched whole when text is encoded. Tokens the tokenizer already has are reused. New embedding rows
    are initialised by transformers' `mean_resizing` (a draw around the mean of the old rows: seed torch first for
    reproducibility). Raises if a token does not encode to exactly its own id.
    """
    tokens = index.tokens()
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    encoded = tokenizer("".join(tokens), add_special_tokens=False)["input_ids"]
    if encoded != ids:
        raise ValueError(f"After adding {len(new)} SID tokens, the tokenizer encodes them as {len(encoded)} ids "
                         f"instead of {len(ids)} single tokens; check that the tokenizer honours added tokens.")
    if model is not None:
        num_rows = model.get_input_embeddings().weight.shape[0]
        if num_rows < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of,
                                          mean_resizing=mean_resizing)
            log.info("Resized embeddings from %d to %d rows for %d new SID tokens.", num_rows,
                     model.get_input_embeddings().weight.shape[0], len(new))
    return dict(zip(tokens, ids, strict=True))
