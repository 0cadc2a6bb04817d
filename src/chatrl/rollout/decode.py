"""Fast batched decoding for Hugging Face causal LMs (Llama family and any model that takes a `Cache`).

B = batch, P = prompt length (left padded), R = response length (<= max_new_tokens), V = vocab.

What makes it faster than `model.generate()` on small models (see bench/NOTES.md for numbers):
- a preallocated ("slab") KV cache written in place, instead of `DynamicCache` re-concatenating every
  layer's keys and values at every step;
- finished rows are DROPPED from the batch (KV cache, mask and positions index-selected), so no compute
  is spent on sequences that already emitted EOS;
- no logits processors / stopping-criteria machinery: one small sampling function on a [B, V] slice,
  top-k through `torch.topk` instead of a full-vocabulary sort;
- host syncs only to test "anyone finished?" (every step on CPU where it is free, every few steps on GPU).

Greedy decoding returns exactly the tokens of `model.generate(do_sample=False)` (tests check it).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from chatrl.algorithms.losses import token_logprobs
from chatrl.engine.collectives import any_rank
from chatrl.models.loading import last_positions
from chatrl.models.lora import plain_model
from chatrl.rollout.compiled_decode import CompiledDecoder
from chatrl.rollout.sampling import GenerationSettings, block_token, pick_tokens

__all__ = ["GenerationSettings", "cache_kwarg", "decode_attention_enabled", "generate", "response_mask_from_ids"]

DECODE_ATTENTION = "chatrl_decode"


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for one new token per row: two small batched matmuls with the query heads grouped by their
    KV head (no repeat_kv). On CPU torch's flash SDPA kernel costs ~1 ms per layer at batch 64 for this
    (a third of a decode step); this costs a fraction. Prefill (several query tokens) goes to transformers' SDPA.
    query: [b, H, 1, D], key/value: [b, Hkv, T, D], mask: bool [b, 1, 1, T] (True = attend) or additive or None.
    Returns [b, 1, H, D] like the other attention functions."""
    if query.shape[2] != 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, h, _, d = query.shape
    kvh = key.shape[1]
    q = query.reshape(b, kvh, h // kvh, d)  # head i reads kv head i // (h // kvh), as repeat_kv does
    # fp32 scores and probabilities, as the SDPA kernels keep them (bf16 scores flip greedy tokens).
    scores = torch.matmul(q.float(), key.transpose(-1, -2).float()) * (scaling if scaling is not None else d ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, : key.shape[2]]  # [b, 1, 1, T]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float())  # [b, kvh, g, D]
    return out.to(query.dtype).reshape(b, 1, h, d), None


@contextlib.contextmanager
def decode_attention_enabled(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """While inside, an SDPA model uses `decode_attention` (same masks as SDPA); restored after."""
    config = getattr(model, "config", None)
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    ALL_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


class _SlabLayer(DynamicLayer):
    """One layer's KV cache in buffers of fixed capacity, filled in place (no per-step re-concatenation).
    Keys are stored TRANSPOSED, [B, H, D, capacity], and handed out as a [B, H, T, D] view of the filled
    prefix: `query @ key^T` then reads a plain strided matrix, which bf16 matmul on CPU does ~3x faster
    than the transposed view of a [B, H, capacity, D] buffer (that one is copied to contiguous every call).
    Values are [B, H, capacity, D]. `transposed_keys=False` keeps keys [B, H, capacity, D] (what SDPA prefers:
    its CPU kernel gives bit-identical results to transformers' own cache only with that layout).
    `zeroed`: allocate the buffers filled with zeros instead of uninitialised (see `make_cache`)."""
    def __init__(self, capacity: int, transposed_keys: bool = True, zeroed: bool = False):
        super().__init__()
        self.capacity = capacity
        self.transposed_keys = transposed_keys
        self.zeroed = zeroed
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        shape = (b, h, d, self.capacity) if self.transposed_keys else (b, h, self.capacity, d)
        alloc = torch.zeros if self.zeroed else torch.empty
        self.kt_buf = alloc(shape, dtype=key_states.dtype, device=key_states.device)
        self.v_buf = alloc((b, value_states.shape[1], self.capacity, value_states.shape[-1]), dtype=value_states.dtype,
                           device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.length, key_states.shape[-2]
        if start + n > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded (need {start + n})")
        if self.transposed_keys:
            self.kt_buf[..., start:start + n].copy_(key_states.transpose(-1, -2))
        else:
            self.kt_buf[:, :, start:start + n].copy_(key_states)
        self.v_buf[:, :, start:start + n].copy_(value_states)
        self.length = start + n
        self._refresh_views()
        return self.keys, self.values

    def _refresh_views(self) -> None:
        if self.transposed_keys:
            self.keys = self.kt_buf[..., : self.length].transpose(-1, -2)
        else:
            self.keys = self.kt_buf[:, :, : self.length]
        self.values = self.v_buf[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.kt_buf = self.kt_buf.index_select(0, indices)
            self.v_buf = self.v_buf.index_select(0, indices)
            self._refresh_views()

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False


def make_cache(model: torch.nn.Module, capacity: int, transposed_keys: bool = True, zeroed: bool = False) -> Cache:
    """A slab cache when every layer is plain full attention; otherwise transformers' own DynamicCache
    (sliding-window / hybrid models keep their specific layer types).
    zeroed: fill the slabs with zeros. Needed by the compiled decode step, which reads the whole capacity and masks
    the unwritten slots: an uninitialised slot can hold NaN, and NaN survives the mask (NaN - inf = NaN in the
    scores, 0 * NaN = NaN in probs @ values), turning a row's logits into NaN. The eager path reads only the filled
    prefix, so it skips the memset."""
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return DynamicCache(config=config)
    return Cache(layers=[_SlabLayer(capacity, transposed_keys, zeroed) for _ in range(config.num_hidden_layers)])


def _library_cache_kwarg() -> str:
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword `model(...)` takes its KV cache under: `cache` since transformers renamed it in 5.x (the old
    `past_key_values` still works there but raises a FutureWarning and goes away in 5.40), `past_key_values` in
    older releases and remote-code models. Wrappers whose forward only has **kwargs (peft, a DeepSpeed engine)
    are looked through (`models.lora.plain_model`); a model whose forward names neither gets what this transformers'
    own models take."""
    for candidate in (model, plain_model(model)):
        params = inspect.signature(candidate.forward).parameters
        for key in ("cache", "past_key_values"):
            if key in params:
                return key
    return _library_cache_kwarg()


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on tokens up to and including the first EOS of each row, 0 after. [B, R] -> [B, R] long.
    Works when pad == eos too (only the first EOS counts)."""
    is_eos = (response_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).long()


def _prefill_positions(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a LEFT padded batch: 0 at each row's first real token (pads get 0, like HF)."""
    pos = prompt_mask.long().cumsum(-1) - 1
    return pos.masked_fill(prompt_mask == 0, 0)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
            cache: Cache, cache_key: str | None = None) -> torch.Tensor:
    """Last-position logits [b, V] in float32. cache_key: `cache_kwarg(model)` (pass it to skip the lookup)."""
    cache_key = cache_key or cache_kwarg(model)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=last_positions(input_ids.shape[1], 1, input_ids.device), **{cache_key: cache})
    return out.logits[:, -1].float()


def _prefill(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pos: torch.Tensor,
             cache: Cache, cache_key: str) -> torch.Tensor:
    """The prompt forward, once per DISTINCT prompt row: a GRPO rollout repeats each prompt G times, so its G rows
    share one prefill and the KV cache is then expanded to all rows (`batch_select_indices` with repeats).
    Returns last-position logits [B, V] for every row."""
    rows = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if unique.shape[0] == rows.shape[0]:
        return _logits(model, prompt_ids, prompt_mask, pos, cache, cache_key)
    first = torch.full((unique.shape[0],), rows.shape[0], dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(rows.shape[0], device=rows.device), reduce="amin")
    logits = _logits(model, prompt_ids[first], prompt_mask[first], pos[first], cache, cache_key)
    cache.batch_select_indices(inverse)
    return logits[inverse]


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             settings: GenerationSettings, eos_token_id: int, pad_token_id: int, *,
             return_logprobs: bool = False, synced: bool = False, check_every: int | None = None,
             fast_attention: bool = True, decoder: CompiledDecoder | None = None):
    """Decode responses for a LEFT padded prompt batch.

    prompt_ids, prompt_mask: [B, P].
    Returns (response_ids [B, R], response_mask [B, R]) — right padded with `pad_token_id` after EOS, mask 1
    up to and including EOS — plus logprobs [B, R] when `return_logprobs`: float32 log softmax(logits / T)[token]
    of each sampled token under this model's full tempered distribution (T = settings.temperature when sampling,
    1 when greedy), taken BEFORE the sampler's truncation (EOS blocked before min_new_tokens, pad blocked, top-k,
    top-p): the distribution the trainer scores (`steps.rl_experience.response_logprobs`); 0 on padding.
    R = the longest response (<= max_new_tokens).
    The pad token is never emitted as a reply token (blocked at every step unless pad == eos).

    synced: several processes (ZeRO-3): every rank keeps running forwards (a 1-row dummy once its own rows
      are done) until all ranks are done, so per-forward collectives stay matched; R is then equal on all ranks.
    check_every: steps between "finished rows?" checks (each is one host sync); default 1 on CPU, 8 on GPU.
    fast_attention: decode steps of SDPA models use `decode_attention` (fp32: same tokens as HF in the tests;
      bf16: a different kernel, so rare greedy near-ties can resolve differently — see bench/NOTES.md).
    decoder: a `CompiledDecoder` for `model` runs the decode steps (the prefill stays the model's forward).
    """
    with decode_attention_enabled(model, fast_attention or decoder is not None):
        fast = model.config._attn_implementation == DECODE_ATTENTION
        if decoder is not None and not fast:
            raise ValueError("a CompiledDecoder needs an SDPA model (its slab cache stores keys transposed)")
        return _generate(model, prompt_ids, prompt_mask, settings, eos_token_id, pad_token_id,
                         return_logprobs=return_logprobs, synced=synced, check_every=check_every,
                         transposed_keys=fast, decoder=decoder)


def _generate(model, prompt_ids, prompt_mask, settings, eos_token_id, pad_token_id, *, return_logprobs, synced,
              check_every, transposed_keys, decoder):
    settings.validate()
    device = prompt_ids.device
    b0, plen = prompt_ids.shape
    max_new = settings.max_new_tokens
    every = check_every or (1 if device.type == "cpu" else 8)
    synced = synced and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    gen = settings.make_generator(device)

    out = torch.full((b0, max_new), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((b0, max_new), dtype=torch.float32, device=device) if return_logprobs else None
    # Mask for prompt + every future step, sliced per step; generated slots are real tokens (1).
    full_mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(b0, max_new).long()], dim=1)
    cache = make_cache(model, plen + max_new, transposed_keys, zeroed=decoder is not None)
    cache_key = cache_kwarg(model)
    weights = decoder.weights(model) if decoder is not None else None
    pos = _prefill_positions(prompt_mask)
    logits = _prefill(model, prompt_ids, prompt_mask, pos, cache, cache_key)
    next_pos = pos[:, -1] + 1  # [b]
    rows = torch.arange(b0, device=device)  # original row of each live row
    done = torch.zeros(b0, dtype=torch.bool, device=device)
    dummy = False  # True once this rank only runs placeholder forwards for the others (synced)
    steps = 0
    scale = settings.temperature if settings.do_sample else 1.0
    block_pad = pad_token_id != eos_token_id and 0 <= pad_token_id
    for t in range(max_new):
        scored = logits / scale if logps is not None else None  # full tempered softmax, before any blocking
        if t < settings.min_new_tokens:
            block_token(logits, eos_token_id)
        if block_pad and pad_token_id < logits.shape[-1]:  # a pad mid-reply would count as a real token
            block_token(logits, pad_token_id)
        tok = pick_tokens(logits, settings, gen)
        tok = tok.masked_fill(done, pad_token_id)  # rows finished since the last check emit pad
        if not dummy:
            out[rows, t] = tok
            if scored is not None:
                logps[rows, t] = token_logprobs(scored[:, None], tok[:, None])[:, 0].masked_fill(done, 0.0)
        steps = t + 1
        done = done | (tok == eos_token_id)
        if t + 1 == max_new:
            break
        if (t + 1) % every == 0 and t + 1 >= settings.min_new_tokens:
            live = (~done).nonzero().squeeze(1)
            n_live = int(live.numel())
            if synced and not any_rank(n_live > 0, device):
                break
            if n_live == 0 and not synced:
                break
            if n_live == 0:  # keep one row alive as a placeholder so this rank can keep calling forward
                dummy = True
                live = live.new_zeros(1)
            if decoder is not None and int(live.numel()) == 1 < int(rows.numel()):
                # the compiled step is specialised for batch 1 (a second compilation): keep a finished row too
                live = torch.cat([live, live.new_ones(1) if dummy else done.nonzero()[:1, 0]])
            if int(live.numel()) < int(rows.numel()):
                rows, done, tok, next_pos = rows[live], done[live], tok[live], next_pos[live]
                full_mask = full_mask.index_select(0, live)
                cache.batch_select_indices(live)
        kv_len = plen + t + 1
        if decoder is not None:
            logits = decoder.step(weights, tok, next_pos, kv_len - 1, full_mask, cache)
        else:
            logits = _logits(model, tok[:, None], full_mask[:, :kv_len], next_pos[:, None], cache, cache_key)
        next_pos = next_pos + 1
    response = out[:, :steps]
    mask = response_mask_from_ids(response, eos_token_id)
    if logps is None:
        return response, mask
    return response, mask, logps[:, :steps] * mask
