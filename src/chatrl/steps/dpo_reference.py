"""The frozen reference of DPO and KTO: summed reply log-probs of every row (a preference pair's two replies, or a
KTO example and its mismatched KL row) under the reference model, computed in one pass before training and cached,
so the training loop holds one model (`dpo.reference=precompute`, `kto.reference=precompute`); or the live frozen
model (`reference=live`). Both steps set it up with `setup_reference`.

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
from chatrl.batches import PairBatch, UnpairedBatch
from chatrl.engine.collectives import barrier
from chatrl.errors import ChatrlError
from chatrl.models.loading import last_positions, load_frozen_causal_lm, resolve_dtype, resolve_model_source
from chatrl.paths import atomic_write_json, cache_dir
from chatrl.steps.common import StepContext

log = logging.getLogger(__name__)
Rows = list[dict[str, Any]]
Scored = PairBatch | UnpairedBatch  # rows [0, B) and [B, 2B): the two values cached per row
# The token fields of a row that its reference log-probs depend on (DPO pairs, KTO rows with their KL rows).
_SCORED_KEYS = ("chosen_ids", "rejected_ids", "chosen_prompt_len", "rejected_prompt_len", "input_ids", "prompt_len",
                "kl_ids", "kl_prompt_len")


def reply_logps(model: torch.nn.Module, batch: Scored) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(reply | prompt) summed over each row's reply tokens, and the reply lengths: one per row (fp32).

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
    ids = [[r[k] for k in _SCORED_KEYS if k in r] for r in rows]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def cache_path(reference: str, dtype: str, rows: Rows) -> Path:
    key = hashlib.sha256(f"{model_fingerprint(reference)}|{dtype}|{rows_hash(rows)}".encode()).hexdigest()[:32]
    return cache_dir("reference_logps") / f"{key}.json"


@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, rows: Rows, collate: Callable[[Rows], Scored],
                            batch_size: int) -> list[tuple[float, float]]:
    """(chosen, rejected) (or (example, KL row)) summed reply log-probs of every row under `model` (eval mode), with
    a progress bar."""
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
        print(f"[reference] reference log-prob cache {path} does not match the data ({problem}): rebuilding it")
        return None
    return [(c, r) for c, r in cached["logps"]]


def cached_reference_logps(rows: Rows, *, reference: str, dtype: str, load_model: Callable[[], torch.nn.Module],
                           collate: Callable[[Rows], Scored], batch_size: int,
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
    """Rows with their reference log-probs (`ref_logps`: [chosen, rejected] or [example, KL row]) added."""
    return [{**r, "ref_logps": list(v)} for r, v in zip(rows, values, strict=True)]


def reference_name(cfg: Any, section: str) -> str:
    """<section>.reference_model resolved: None = the starting model (model.name_or_path)."""
    name = getattr(cfg, section).reference_model or cfg.model.name_or_path
    try:
        resolve_model_source(name)
    except ChatrlError as e:
        raise ChatrlError(f"{section}.reference_model: {e}") from None
    return name


def reference_dtype(cfg: Any, section: str) -> str:
    """<section>.reference_dtype resolved: auto = the policy's dtype (model.dtype, itself resolved), bf16 or fp32."""
    opts = getattr(cfg, section)
    name = opts.reference_dtype if opts.reference_dtype != "auto" else cfg.model.dtype
    return "bf16" if resolve_dtype(name) == torch.bfloat16 else "fp32"


def setup_reference(cfg: Any, section: str, ctx: StepContext, collate: Callable[[Rows], Scored], train_rows: Rows,
                    eval_rows: Rows) -> tuple[Rows, Rows, torch.nn.Module | None]:
    """The reference of a step whose options section `section` holds `ReferenceOptions`: (train rows, eval rows,
    None) with the cached log-probs attached (precompute), or (the rows, the live frozen model); the rows as they
    are and None when the step's loss needs no reference (`cfg.uses_reference()`)."""
    if not cfg.uses_reference():
        return train_rows, eval_rows, None
    name, dtype = reference_name(cfg, section), reference_dtype(cfg, section)

    def load_reference() -> torch.nn.Module:
        return load_frozen_causal_lm(name, dtype=resolve_dtype(dtype), tokenizer=ctx.tokenizer,
                                     allow_pickle=cfg.model.allow_pickle).to(ctx.device)

    if getattr(cfg, section).reference == "live":
        return train_rows, eval_rows, load_reference()

    def with_reference(rows: Rows) -> Rows:
        values, path = cached_reference_logps(rows, reference=name, dtype=dtype, load_model=load_reference,
                                              collate=collate, batch_size=cfg.optim.micro_batch_size, rank=ctx.rank)
        if ctx.rank == 0:
            print(f"[{section}] reference log-probs of {len(rows)} rows: {path}")
        return attach(rows, values)

    return with_reference(train_rows), with_reference(eval_rows), None
