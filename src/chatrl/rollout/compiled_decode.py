"""A compiled decode step (torch.compile / inductor) for Llama-architecture models.

Why: at rollout batch sizes a decode step of a 135M model on CPU is ~1/3 GEMMs and ~2/3 small ops (RMSNorm's
eight ops, rotary, casts, residual adds, softmax, mask: ~2k tiny kernels per step, profiled in bench/NOTES.md).
Inductor fuses those into a few dozen C++ loops. The GEMMs stay oneDNN's pre-packed bf16 kernels, called through
an opaque custom op so the weights are INPUTS of the compiled graph, not constants baked into it: the Hybrid
Engine refreshes them after every optimizer step without recompiling. Shapes are dynamic (rows are dropped as
they finish, prompt lengths vary), so one compilation serves a whole run (~45 s on 2 cores the first time, a few
seconds from inductor's on-disk cache afterwards).

It only replaces DECODE steps (one new token per row); the prefill still runs the Hugging Face model, which
fills the slab KV cache this step reads and writes. The math is the model's own (transformers' Llama: RMSNorm in
fp32 then cast, rotary from the model's `inv_freq` and `attention_scaling`, grouped-query attention with fp32
scores as in `generate.decode_attention`, SiLU-gated MLP), so greedy tokens agree with `generate()` up to
rounding (tests).

b = live rows, C = hidden size, H / Hkv = query / KV heads, D = head dim, S = KV capacity (prompt + max new).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("chatrl::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """x [.., in] @ W^T with W pre-packed by oneDNN (`torch.ops.mkldnn._reorder_linear_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed_weight.shape[0])


PER_LAYER = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
             "gate_proj", "up_proj", "down_proj")


def why_unsupported(model: nn.Module) -> str | None:
    """None if `CompiledDecoder` can run `model`, else the reason (the caller falls back to the eager path)."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not 'llama'"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biases in attention/MLP projections"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if config._attn_implementation not in ("sdpa", "eager", "chatrl_decode"):
        return f"attention implementation {config._attn_implementation!r}"
    return None


def _weight(module: nn.Module) -> torch.Tensor:
    packed = getattr(module, "packed", None)  # hybrid.PackedLinear
    return packed if packed is not None else module.weight


class CompiledDecoder:
    """`step(...)` = one decode step of `model` for the last tokens of every live row, compiled once.

        dec = CompiledDecoder(model)              # model: LlamaForCausalLM (e.g. the Hybrid Engine's copy)
        weights = dec.weights(model)              # after each refresh of the model's weights
        logits = dec.step(weights, tok, pos, slot, valid, cache)
    """

    def __init__(self, model: nn.Module):
        reason = why_unsupported(model)
        if reason:
            raise ValueError(f"compiled decoding does not support this model: {reason}")
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.attention_scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
        self.packed = hasattr(model.lm_head, "packed")
        self._compiled = torch.compile(self._step, dynamic=True)

    def weights(self, model: nn.Module) -> list[torch.Tensor]:
        """The flat weight list `step` takes (read after each refresh of the model: cheap, no copies)."""
        inner = model.model
        out = [inner.embed_tokens.weight, inner.norm.weight, _weight(model.lm_head),
               inner.rotary_emb.inv_freq]
        for layer in inner.layers:
            mods = {**dict(layer.named_children()), **dict(layer.self_attn.named_children()),
                    **dict(layer.mlp.named_children())}
            out += [mods[n].weight if n.endswith("layernorm") else _weight(mods[n]) for n in PER_LAYER]
        return out

    def step(self, weights: list[torch.Tensor], tok: torch.Tensor, pos: torch.Tensor, slot: int,
             valid: torch.Tensor, cache) -> torch.Tensor:
        """tok, pos: [b] last token and its position; slot: the cache index it is written to (same for all
        rows, prompts are left padded); valid: [b, S] 1 = a real (non-pad) cache position; cache: the slab
        cache filled by the prefill (`generate.make_cache`). Returns next-token logits [b, V] float32."""
        keys = [layer.kt_buf for layer in cache.layers]  # [b, Hkv, D, S] (keys stored transposed)
        values = [layer.v_buf for layer in cache.layers]  # [b, Hkv, S, D]
        slot_t = torch.tensor([slot], device=tok.device)
        logits = self._compiled(weights, tok, pos, slot_t, valid.bool(), keys, values)
        for layer in cache.layers:
            layer.length = slot + 1
            layer._refresh_views()
        return logits

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, w) if self.packed else F.linear(x, w)

    def _rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # as transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2  # x [b, heads, D]; rotate_half = cat(-x2, x1)
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def _step(self, weights, tok, pos, slot, valid, keys, values):
        embed, final_norm, head, inv_freq = weights[:4]
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        x = embed[tok]  # [b, C]
        b, dtype = x.shape[0], x.dtype
        freqs = pos[:, None].float() * inv_freq.float()[None]  # [b, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)
        cos = (angles.cos() * self.attention_scaling).to(dtype)[:, None]  # [b, 1, D]
        sin = (angles.sin() * self.attention_scaling).to(dtype)[:, None]
        cap = valid.shape[1]
        visible = valid & (torch.arange(cap, device=valid.device)[None] <= slot)  # [b, S]: written, non-pad
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=x.device).masked_fill(~visible, float("-inf"))
        for i, (kt, vb) in enumerate(zip(keys, values, strict=False)):
            ln1, wq, wk, wv, wo, ln2, wg, wu, wd = weights[4 + 9 * i: 13 + 9 * i]
            hs = self._rms_norm(x, ln1)
            q = self._rotate(self._linear(hs, wq).view(b, h, d), cos, sin)  # [b, H, D]
            k = self._rotate(self._linear(hs, wk).view(b, kvh, d), cos, sin)  # [b, Hkv, D]
            v = self._linear(hs, wv).view(b, kvh, d)
            kt.index_copy_(3, slot, k[..., None])
            vb.index_copy_(2, slot, v[:, :, None])
            # query heads grouped by their KV head ([b, Hkv, H/Hkv, D]); fp32 scores like the SDPA kernels
            qg = q.view(b, kvh, h // kvh, d).float()
            scores = torch.matmul(qg, kt.float()) * d ** -0.5 + bias[:, None, None]  # [b, Hkv, G, S]
            attn = torch.matmul(torch.softmax(scores, dim=-1), vb.float())  # [b, Hkv, G, D]
            x = x + self._linear(attn.to(dtype).reshape(b, h * d), wo)
            hs = self._rms_norm(x, ln2)
            x = x + self._linear(F.silu(self._linear(hs, wg)) * self._linear(hs, wu), wd)
        return self._linear(self._rms_norm(x, final_norm), head).float()  # [b, V]
