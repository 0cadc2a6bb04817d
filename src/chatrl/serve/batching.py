"""Continuous (iteration-level) batching for `chatrl serve`: ONE forward per decode step for all active sequences.

Each active sequence is one ROW of a shared, ragged KV cache: row i holds `lengths[i]` tokens (its prompt and what it
generated so far), and the rows' lengths differ. One decode step feeds every row's last token at its own position:

- the new key/value of row i is written at column `lengths[i]` of that row (`RaggedLayer.update`);
- `get_seq_length()` is max(lengths), so transformers sizes the mask as [rows, max_len + 1];
- the 2-D attention mask marks each row's valid columns (0..lengths[i]); position_ids[i] = lengths[i].

Columns past a row's length hold zeros, never garbage: a masked column still enters `probs @ values` with weight 0,
and 0 * NaN = NaN (the same reason as `rollout.decode.make_cache(zeroed=True)`).

New requests join BETWEEN steps: each distinct prompt is prefilled alone (batch 1, its own slab cache from
`make_cache`), its first token is sampled from that forward, and its KV is copied in as new rows (once per choice:
the `n` choices of a request share one prefill). Prefilling alone keeps a request's tokens independent of who else
is being served (a padded multi-prompt prefill changes the last bits of its activations), and a prompt of a few
dozen tokens is already compute-bound. Finished and cancelled rows leave by an index-select of the rows.
Capacity (columns) grows on demand in blocks of `block` (256) and shrinks back when long rows leave, so a short
conversation does not hold a whole context window per row.

Per-request settings stay per request: every row is a `Decoding` (its own generator, temperature/top-p, stop strings,
detokenizer, budget); the batch only supplies its next-token logits row to `Decoding.accept`.

`SerialRows` is the fallback with the same interface: one forward per sequence on its own cache (`Decoding.step`).
It drives models the batched path cannot: models whose layers are not all full attention (sliding-window / hybrid
layers: `make_cache` gives transformers' own `DynamicCache` there, which has no per-row lengths), and models whose
forward does not take attention_mask / position_ids / logits_to_keep (test stubs, remote code). ILQL Q-guided models
(`rollout.guided.QGuidedLM`) take all three and are batched: the heads shift each row's logits like the LM head's.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache

from chatrl.rollout.decode import (
    DECODE_ATTENTION,
    _logits,
    _SlabLayer,
    cache_kwarg,
    decode_attention_enabled,
    make_cache,
)
from chatrl.rollout.guided import QGuidedLM
from chatrl.rollout.hybrid import PackedLinear, onednn_packs
from chatrl.serve.generation import ChatModel, Decoding

log = logging.getLogger(__name__)

BLOCK = 256  # cache columns are allocated in multiples of this
BATCH_KWARGS = ("attention_mask", "position_ids", "logits_to_keep")


@dataclass
class RowResult:
    """What one step did for one sequence: the text it added, or the error that ended it."""

    decoding: Decoding
    text: str = ""
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.decoding.finish_reason is not None


def _round_up(n: int, block: int) -> int:
    return max(block, -(-n // block) * block)


def _resized(buf: torch.Tensor, capacity: int, dim: int, keep: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A zero-filled copy of `buf` (only `rows`, when given) with `capacity` slots along `dim`; the first `keep`
    slots are copied over."""
    src = buf if rows is None else buf.index_select(0, rows)
    shape = list(src.shape)
    shape[dim] = capacity
    out = src.new_zeros(shape)
    out.narrow(dim, 0, keep).copy_(src.narrow(dim, 0, keep))
    return out


class RaggedLayer(_SlabLayer):
    """One layer's KV slab whose rows have their own lengths (kept by the owning `RaggedCache`). Same buffers and
    key layout as `_SlabLayer` (keys transposed [rows, H, D, capacity] for `decode_attention`, values
    [rows, H, capacity, D]); only one-token updates go through `update` (prompts are prefilled elsewhere)."""

    def __init__(self, owner: RaggedCache, transposed_keys: bool):
        super().__init__(capacity=0, transposed_keys=transposed_keys, zeroed=True)
        self.owner = owner

    @property
    def _key_dim(self) -> int:  # the column (token) axis of the key buffer
        return 3 if self.transposed_keys else 2

    def get_seq_length(self) -> int:
        return self.owner.max_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write row i's new key/value [rows, H, 1, D] at its column lengths[i]; hand out [rows, H, max_len+1, D]."""
        if key_states.shape[-2] != 1:
            raise RuntimeError("a ragged cache takes one new token per row (prompts are prefilled separately)")
        rows, cols = self.owner.row_index, self.owner.lengths
        if self.transposed_keys:
            self.kt_buf[rows, :, :, cols] = key_states[:, :, 0]  # [rows, H, D]
        else:
            self.kt_buf[rows, :, cols] = key_states[:, :, 0]
        self.v_buf[rows, :, cols] = value_states[:, :, 0]
        self.length = self.owner.max_len + 1
        self._refresh_views()
        return self.keys, self.values

    def append(self, prefilled: _SlabLayer, length: int, copies: int) -> None:
        """Add `copies` rows holding the first `length` tokens of a 1-row prefill slab (same key layout)."""
        k_src = prefilled.kt_buf.narrow(self._key_dim, 0, length)
        v_src = prefilled.v_buf.narrow(2, 0, length)
        k_new = _resized(k_src.expand(copies, *k_src.shape[1:]), self.owner.capacity, self._key_dim, length)
        v_new = _resized(v_src.expand(copies, *v_src.shape[1:]), self.owner.capacity, 2, length)
        if self.is_initialized:
            k_new, v_new = torch.cat([self.kt_buf, k_new]), torch.cat([self.v_buf, v_new])
        self.kt_buf, self.v_buf = k_new, v_new
        self.dtype, self.device, self.is_initialized = k_new.dtype, k_new.device, True

    def reset(self) -> None:
        super().reset()
        self.kt_buf = self.v_buf = None  # an empty batch holds no memory

    def reshape_rows(self, rows: torch.Tensor | None, capacity: int, keep: int) -> None:
        """Keep only `rows` (all when None) and make the buffers `capacity` columns wide (first `keep` copied)."""
        if self.is_initialized:
            self.kt_buf = _resized(self.kt_buf, capacity, self._key_dim, keep, rows)
            self.v_buf = _resized(self.v_buf, capacity, 2, keep, rows)


class RaggedCache(Cache):
    """A KV cache of rows of different lengths (see the module docstring). lengths: [rows] long."""

    def __init__(self, num_layers: int, transposed_keys: bool, device: torch.device, block: int = BLOCK):
        self.block = block
        self.device = device
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # [rows]
        self.row_index = self.lengths.clone()  # arange(rows), the row index of every write
        self.max_len = 0  # max(lengths) as a Python int: read by every layer at every step
        self.capacity = 0  # columns allocated per row
        super().__init__(layers=[RaggedLayer(self, transposed_keys) for _ in range(num_layers)])

    @property
    def rows(self) -> int:
        return int(self.lengths.numel())

    def _set_lengths(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths
        self.row_index = torch.arange(lengths.numel(), device=self.device)
        self.max_len = int(lengths.max()) if lengths.numel() else 0

    def reserve(self, columns: int) -> None:
        """Make room for `columns` tokens in every row (grows in blocks; keeps what is written)."""
        if columns > self.capacity:
            self._reshape(None, _round_up(columns, self.block))

    def _reshape(self, rows: torch.Tensor | None, capacity: int) -> None:
        keep = min(self.max_len, capacity)
        for layer in self.layers:
            layer.reshape_rows(rows, capacity, keep)
        self.capacity = capacity

    def append(self, prefilled: Cache, length: int, copies: int) -> None:
        """Add `copies` rows that hold the `length`-token prompt of a 1-row prefill cache."""
        self.reserve(length + 1)  # + the column the next step writes
        for layer, src in zip(self.layers, prefilled.layers, strict=True):
            layer.append(src, length, copies)
        new = torch.full((copies,), length, dtype=torch.long, device=self.device)
        self._set_lengths(torch.cat([self.lengths, new]))

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (an index tensor, in order); gives back columns nobody needs any more."""
        lengths = self.lengths.index_select(0, rows)
        if not lengths.numel():  # empty: the next rows start from fresh buffers
            for layer in self.layers:
                layer.reset()
            self.capacity = 0
        else:
            self._reshape(rows, min(self.capacity, _round_up(int(lengths.max()) + 1, self.block)))
        self._set_lengths(lengths)

    def advance(self) -> None:
        """Every row got one token (after a decode step)."""
        self._set_lengths(self.lengths + 1)


def batchable(model: torch.nn.Module) -> bool:
    """Whether `BatchedRows` can drive `model`: every layer is full attention (`make_cache` gives slab layers, not
    transformers' DynamicCache) and its forward takes attention_mask, position_ids and logits_to_keep."""
    layers = make_cache(model, 1).layers
    if not layers or not all(isinstance(layer, _SlabLayer) for layer in layers):
        return False
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return takes_any or all(name in params for name in BATCH_KWARGS)


def pack_linear_weights(model: nn.Module, rows_hint: int) -> int:
    """Swap the LM's nn.Linear layers for oneDNN pre-packed ones (CPU; fp32, or bf16 where the CPU packs it), in
    place. Why: a decode step of 8 rows is a GEMM with M = 8, which MKL's sgemm runs at ~2x the time of its M = 1
    gemv on this 2-core AVX2 EPYC, oneDNN's packed kernel at ~1.4x (SmolLM2-135M fp32, 8-row step: 300 -> 215 ms
    under load; 1-row step unchanged). The tied LM head keeps its embedding, so that matrix is held twice. Skipped
    for LoRA (peft) models, whose layers read `.weight`; ILQL heads stay as they are. Returns the layers packed."""
    lm = model.lm if isinstance(model, QGuidedLM) else model
    weight = next(lm.parameters(), None)
    if (weight is None or weight.device.type != "cpu" or not onednn_packs(weight.dtype)
            or hasattr(lm, "peft_config")):
        return 0
    count = 0
    for name, mod in list(lm.named_modules()):
        if type(mod) is nn.Linear and mod.weight.dtype == weight.dtype:
            packed = PackedLinear(mod.in_features, mod.out_features, mod.bias, dtype=weight.dtype)
            packed.load(mod.weight, rows_hint)
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, packed)
            count += 1
    return count


class BatchedRows:
    """Active sequences decoded together: `admit` prefills new ones, `step` is one forward for all rows.
    Rows that finish (or fail) in `admit`/`step` leave the batch by themselves; `drop` removes others (cancelled).
    Not thread-safe: only the thread that owns the model calls it."""

    def __init__(self, chat: ChatModel, block: int = BLOCK, rows_hint: int = 8, pack: bool = True):
        """rows_hint: the rows a step usually has (the worker's max_active). pack: `pack_linear_weights` the model
        (in place: the server's worker owns its model)."""
        self.chat = chat
        self.model = chat.model
        if pack:
            pack_linear_weights(self.model, rows_hint)
        self.block = block
        self.cache_key = cache_kwarg(self.model)
        # SDPA models decode with `decode_attention` (`decode_attention_enabled` around every forward), which reads
        # keys stored transposed; other attention implementations get the plain layout, as in `rollout.decode`
        self.transposed_keys = getattr(self.model.config, "_attn_implementation", None) in ("sdpa", DECODE_ATTENTION)
        self.rows: list[Decoding] = []
        self.cache = self._new_cache()

    def _new_cache(self) -> RaggedCache:
        config = self.model.config.get_text_config(decoder=True)
        device = next(self.model.parameters()).device
        return RaggedCache(config.num_hidden_layers, self.transposed_keys, device, self.block)

    @torch.inference_mode()
    def admit(self, decodings: list[Decoding]) -> list[RowResult]:
        """Prefill new sequences (once per distinct prompt) and sample their first tokens; the unfinished ones
        join the batch. Returns one result per sequence."""
        results: list[RowResult] = []
        for group in _by_prompt(decodings):
            results += self._admit_group(group)
        return results

    def _admit_group(self, group: list[Decoding]) -> list[RowResult]:
        """Sequences with the same prompt (the `n` choices of a request): one prefill for all of them."""
        empty = [d for d in group if d.max_new_tokens <= 0]
        results = [RowResult(d, d.step()) for d in empty]  # budget 0: finishes without a forward
        group = [d for d in group if d.max_new_tokens > 0]
        if not group:
            return results
        try:
            prefilled, logits = self._prefill(group[0].prompt_ids)  # logits [1, V]
        except Exception as e:  # this request fails; the others (and the batch) go on
            log.exception("prefill failed")
            return results + [RowResult(d, error=f"generation failed: {e}") for d in group]
        firsts = [_accept(d, logits) for d in group]
        live = [r.decoding for r in firsts if not r.done]
        if live:
            self.cache.append(prefilled, len(group[0].prompt_ids), len(live))
            self.rows += live
        return results + firsts

    def _prefill(self, prompt_ids: list[int]) -> tuple[Cache, torch.Tensor]:
        """The prompt alone through the model into its own slab cache: (cache, last-position logits [1, V])."""
        device = self.cache.device
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
        pos = torch.arange(ids.shape[1], device=device)[None]  # [1, T]
        cache = make_cache(self.model, ids.shape[1], self.transposed_keys)
        with decode_attention_enabled(self.model):
            logits = _logits(self.model, ids, torch.ones_like(ids), pos, cache, self.cache_key)
        return cache, logits

    @torch.inference_mode()
    def step(self) -> list[RowResult]:
        """One forward for every row (each at its own position) and one token per row. A failed forward fails
        every row (they shared it) and empties the batch."""
        if not self.rows:
            return []
        try:
            logits = self._forward()  # [rows, V]
        except Exception as e:
            log.exception("batched decode step failed")
            failed = [RowResult(d, error=f"generation failed: {e}") for d in self.rows]
            self.clear()
            return failed
        results = [_accept(d, logits[i:i + 1]) for i, d in enumerate(self.rows)]
        self._remove([i for i, r in enumerate(results) if r.done])
        return results

    def _forward(self) -> torch.Tensor:
        """Last tokens [rows, 1] at positions lengths [rows, 1]; mask [rows, max_len+1]. -> logits [rows, V]."""
        cache = self.cache
        cache.reserve(cache.max_len + 1)
        tokens = torch.tensor([[d.last_token] for d in self.rows], dtype=torch.long, device=cache.device)
        columns = torch.arange(cache.max_len + 1, device=cache.device)
        mask = (columns[None, :] <= cache.lengths[:, None]).long()  # the row's tokens + the one it writes now
        with decode_attention_enabled(self.model):
            logits = _logits(self.model, tokens, mask, cache.lengths[:, None], cache, self.cache_key)
        cache.advance()
        return logits

    def drop(self, decodings: Iterable[Decoding]) -> None:
        """Remove these sequences (cancelled) from the batch; their KV rows are freed."""
        gone = {id(d) for d in decodings}
        self._remove([i for i, d in enumerate(self.rows) if id(d) in gone])

    def _remove(self, indices: list[int]) -> None:
        if not indices:
            return
        drop = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        self.rows = [self.rows[i] for i in keep]
        self.cache.keep(torch.tensor(keep, dtype=torch.long, device=self.cache.device))

    def clear(self) -> None:
        self.rows = []
        self.cache = self._new_cache()


class SerialRows:
    """The fallback with `BatchedRows`' interface: every sequence runs its own forwards on its own cache
    (`Decoding.step`), one after the other — for models `batchable` refuses (see the module docstring)."""

    def __init__(self, chat: ChatModel):
        self.chat = chat
        self.rows: list[Decoding] = []

    def admit(self, decodings: list[Decoding]) -> list[RowResult]:
        results = [_step_alone(d) for d in decodings]  # the first step is the prefill
        self.rows += [r.decoding for r in results if not r.done]
        return results

    def step(self) -> list[RowResult]:
        results = [_step_alone(d) for d in self.rows]
        self.rows = [r.decoding for r in results if not r.done]
        return results

    def drop(self, decodings: Iterable[Decoding]) -> None:
        gone = {id(d) for d in decodings}
        self.rows = [d for d in self.rows if id(d) not in gone]

    def clear(self) -> None:
        self.rows = []


def make_rows(chat: ChatModel, rows_hint: int = 8) -> BatchedRows | SerialRows:
    """The batched engine when the model allows it, else the one-sequence-at-a-time fallback."""
    return BatchedRows(chat, rows_hint=rows_hint) if batchable(chat.model) else SerialRows(chat)


def _by_prompt(decodings: list[Decoding]) -> list[list[Decoding]]:
    """Group sequences by prompt (in first-seen order): the choices of one request share a prefill."""
    groups: dict[tuple[int, ...], list[Decoding]] = {}
    for d in decodings:
        groups.setdefault(tuple(d.prompt_ids), []).append(d)
    return list(groups.values())


def _accept(decoding: Decoding, logits: torch.Tensor) -> RowResult:
    """The row's token from its logits [1, V]; an error (e.g. in the tokenizer) ends only this row."""
    try:
        return RowResult(decoding, decoding.accept(logits))
    except Exception as e:
        log.exception("sampling failed")
        return RowResult(decoding, error=f"generation failed: {e}")


def _step_alone(decoding: Decoding) -> RowResult:
    try:
        return RowResult(decoding, decoding.step())
    except Exception as e:  # one bad request must not kill the server
        log.exception("generation failed")
        return RowResult(decoding, error=f"generation failed: {e}")
