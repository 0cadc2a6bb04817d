"""Reference log-probs for DPO: summed reply log-probs of every preference pair under the frozen reference model,
computed in one pass before training and cached, so the training loop holds one model.

The cache file (under the cache dir, `reference_logps/<key>.json`) is keyed by the reference model (folder files'
names, sizes and modification times, or the hub id), its dtype and the tokenized rows' content. It stores a hash of
the rows it was computed for; a file whose hash, length or values do not match the data is reported and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from chatrl.algorithms.losses import token_logprobs
from chatrl.batches import PairBatch
from chatrl.engine.collectives import barrier
from chatrl.models.loading import last_positions, resolve_model_source
from chatrl.paths import atomic_write_json, cache_dir

log = logging.getLogger(__name__)
Rows = list[dict[str, Any]]


def reply_logps(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(reply | prompt) summed over each row's reply tokens, and the reply lengths: [2B] each (fp32).

    Logits at position t-1 score token t; only positions from the earliest reply start on go through the LM head
    (`logits_to_keep`), since prompt tokens are never scored."""
    assert batch.reply_mask is not None, "pair rows need chosen/rejected_prompt_len (data cache version >= 2)"
    width = batch.input_ids.shape[1]
    first = max(1, int(batch.reply_mask.float().argmax(dim=1).min()))  # earliest reply token over the batch
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                logits_to_keep=last_positions(width, width - first + 1, batch.input_ids.device))
    logp = token_logprobs(out.logits[:, :-1], batch.input_ids[:, first:])  # [2B, T - first]
    mask = batch.reply_mask[:, first:].float()
    return (logp * mask).sum(-1), mask.sum(-1)


def model_fingerprint(name_or_path: str) -> str:
    """Identity of a model's weights: its folder's files (name, size, mtime) or the hub id."""
    source = resolve_model_source(name_or_path)
    folder = Path(source)
    if not folder.is_dir():
        return f"hub:{source}"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def rows_hash(rows: Rows) -> str:
    ids = [[r["chosen_ids"], r["rejected_ids"], r["chosen_prompt_len"], r["rejected_prompt_len"]] for r in rows]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def cache_path(reference: str, dtype: str, rows: Rows) -> Path:
    key = hashlib.sha256(f"{model_fingerprint(reference)}|{dtype}|{rows_hash(rows)}".encode()).hexdigest()[:32]
    return cache_dir("reference_logps") / f"{key}.json"


@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, rows: Rows, collate: Callable[[Rows], PairBatch],
                            batch_size: int) -> list[tuple[float, float]]:
    """(chosen, rejected) summed reply log-probs of every row under `model` (eval mode), with a progress bar."""
    model.eval()
    out: list[tuple[float, float]] = []
    for i in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", unit="batch", dynamic_ncols=True):
        part = rows[i:i + batch_size]
        sums, _ = reply_logps(model, collate(part))
        out.extend(zip(sums[:len(part)].tolist(), sums[len(part):].tolist(), strict=True))
    return out


def _cache_problem(cached: dict[str, Any], rows: Rows) -> str | None:
    """Why a cache file cannot be used for `rows` (None when it can)."""
    if cached.get("rows_sha256") != rows_hash(rows):
        return "it was computed for other rows"
    values = cached.get("logps")
    if not isinstance(values, list) or len(values) != len(rows):
        return f"it holds {len(values) if isinstance(values, list) else 'no'} entries for {len(rows)} rows"
    if not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) and math.isfinite(x) for x in v)
               for v in values):
        return "it holds values that are not finite numbers"
    return None


def _read_cache(path: Path, rows: Rows) -> list[tuple[float, float]] | None:
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        problem = _cache_problem(cached, rows) if isinstance(cached, dict) else "it is not a JSON object"
    except (OSError, ValueError) as e:
        problem = f"it is unreadable ({type(e).__name__})"
    if problem is not None:
        log.warning("reference log-prob cache %s does not match the data (%s): rebuilding it", path, problem)
        print(f"[dpo] reference log-prob cache {path} does not match the data ({problem}): rebuilding it")
        return None
    return [(c, r) for c, r in cached["logps"]]


def cached_reference_logps(rows: Rows, *, reference: str, dtype: str, load_model: Callable[[], torch.nn.Module],
                           collate: Callable[[Rows], PairBatch], batch_size: int,
                           rank: int) -> tuple[list[tuple[float, float]], Path]:
    """Reference log-probs of `rows` from the cache, or computed once (on rank 0) and cached. Collective under
    torch.distributed: every rank returns the same values."""
    path = cache_path(reference, dtype, rows)
    if rank == 0 and _read_cache(path, rows) is None:
        model = load_model()
        values = compute_reference_logps(model, rows, collate, batch_size)
        del model
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"reference": reference, "dtype": dtype, "rows_sha256": rows_hash(rows),
                                 "logps": [list(v) for v in values]}, ensure_ascii=False)
    barrier()
    values = _read_cache(path, rows)
    assert values is not None, f"{path} was just written"
    return values, path


def attach(rows: Rows, values: Sequence[tuple[float, float]]) -> Rows:
    """Rows with their reference log-probs (`ref_logps`: [chosen, rejected]) added."""
    return [{**r, "ref_logps": list(v)} for r, v in zip(rows, values, strict=True)]
