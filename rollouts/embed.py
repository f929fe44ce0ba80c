"""Item text embeddings with all-MiniLM-L6-v2 (the embedded `encoder` asset), for semantic IDs and similarity rewards.

The asset is a sentence-transformers directory (BERT weights + tokenizer + 1_Pooling mean pooling + Normalize); it is
run here with plain transformers: `AutoModel` → mean over real tokens → L2 normalisation, which is what the
sentence-transformers pipeline of that directory computes (no extra dependency).

Item embeddings are cached as safetensors under `$RECFORGE_HOME/embeddings/`, keyed by a fingerprint of the item
texts and the encoder weights: editing either recomputes them, a stale file is never used.

Shape legend: N texts, T tokens, H = 384 embedding size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rl import assets
from rollouts.envs.rec_data import Id, RecData, parse_id

log = logging.getLogger(__name__)

EMBEDDING_DIM = 384
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2


@functools.lru_cache(maxsize=2)
def load_encoder(path: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) of the sentence encoder at `path` (default: the prepared `encoder` asset), eval mode."""
    from transformers import AutoModel, AutoTokenizer

    where = Path(path) if path else assets.require("encoder")
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModel.from_pretrained(where, dtype=torch.float32).eval()
    return tokenizer, model


@torch.no_grad()
def embed_texts(texts: Sequence[str], batch_size: int = 64, *, encoder_path: str | None = None) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings, float32 [N, 384], row n for texts[n].

    Texts are batched in length order (less padding); the result is in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    tokenizer, model = load_encoder(encoder_path)
    out_NH = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_SEQ_LENGTH,
                          return_tensors="pt")
        hidden_BTH = model(**batch).last_hidden_state
        mask_BT1 = batch["attention_mask"].unsqueeze(-1).to(hidden_BTH.dtype)
        pooled_BH = (hidden_BTH * mask_BT1).sum(1) / mask_BT1.sum(1).clamp_min(1e-9)
        out_NH[rows] = torch.nn.functional.normalize(pooled_BH, p=2, dim=-1)
    return out_NH


def _encoder_fingerprint(encoder_path: str | None) -> str:
    """sha256 of the encoder weights, from the asset manifest when there is one (no re-hashing of 90 MB)."""
    where = Path(encoder_path) if encoder_path else assets.require("encoder")
    manifest = where / "manifest.json"
    if manifest.is_file():
        entry = json.loads(manifest.read_text()).get("model.safetensors")
        if entry:
            return entry["sha256"]
    return assets.sha256_file(where / "model.safetensors")


def cached_embeddings(item_ids: Sequence[Id], texts: Sequence[str], *, name: str, batch_size: int = 64,
                      cache_dir: Path | str | None = None, encoder_path: str | None = None) -> torch.Tensor:
    """`embed_texts(texts)` [N, 384], read from `<cache_dir>/<name>.safetensors` when it matches these items, texts
    and encoder; otherwise computed and written there atomically. `cache_dir` defaults to $RECFORGE_HOME/embeddings.
    """
    from safetensors.torch import load_file, save_file

    if len(item_ids) != len(texts):
        raise ValueError(f"{len(item_ids)} item ids for {len(texts)} texts; they must match.")
    directory = Path(cache_dir) if cache_dir else assets.home() / "embeddings"
    path = directory / f"{name}.safetensors"
    digest = hashlib.sha256(json.dumps([[str(i), t] for i, t in zip(item_ids, texts, strict=True)]).encode())
    digest.update(_encoder_fingerprint(encoder_path).encode())
    fingerprint = digest.hexdigest()
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get("fingerprint")
        if stored == fingerprint:
            log.info("Item embeddings from cache %s", path)
            return load_file(str(path))["embeddings"]
        log.info("Item embeddings in %s are stale (items, texts or encoder changed); recomputing.", path)
    log.info("Embedding %d item texts with all-MiniLM-L6-v2", len(texts))
    emb_NH = embed_texts(list(texts), batch_size, encoder_path=encoder_path)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    os.close(fd)
    try:
        save_file({"embeddings": emb_NH.contiguous()}, tmp,
                  metadata={"fingerprint": fingerprint, "item_ids": json.dumps([str(i) for i in item_ids])})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared by the user's processes
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return emb_NH


def item_embeddings(data: RecData, *, name: str, batch_size: int = 64,
                    cache_dir: Path | str | None = None) -> tuple[list[Id], torch.Tensor]:
    """(item ids, [N, 384] embeddings of `Item.embedding_text()`) for every item of `data`, cached under `name`."""
    item_ids = list(data.items)
    texts = [data.items[i].embedding_text() for i in item_ids]
    return item_ids, cached_embeddings(item_ids, texts, name=name, batch_size=batch_size, cache_dir=cache_dir)


def movielens_item_embeddings(*, cache_dir: Path | str | None = None) -> tuple[list[Id], torch.Tensor]:
    """MovieLens-100K item ids and their MiniLM embeddings; prepares the data and encoder assets if needed."""
    prepared = assets.prepare("data")
    assets.prepare("encoder")
    data = RecData.load_movielens(prepared["data"])
    return item_embeddings(data, name="ml-100k-minilm", cache_dir=cache_dir)


def stored_item_ids(path: Path | str) -> list[Id]:
    """The item ids recorded in a cached embeddings file (row order)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return [parse_id(i) for i in json.loads(handle.metadata()["item_ids"])]
