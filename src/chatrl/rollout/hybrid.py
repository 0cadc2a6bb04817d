"""Hybrid Engine: switch a policy between its training layout and a fast inference layout.

It decodes the RL steps' rollouts (PPO, GRPO and the other policy-gradient algorithms), RFT's samples and the
environment eval's episodes. Plain PyTorch (no CUDA kernels), so it runs on CPU and GPU. During rollout the actor
is served by an INFERENCE COPY of its weights:
- under ZeRO-3 the partitioned parameters are gathered once per refresh (one `engine.deepspeed.gathered` context
  around the whole copy), never per token or per layer;
- LoRA adapters are folded in: W + scale * B @ A is computed into the copy (peft's `get_delta_weight`), so the
  training weights are never merged/unmerged in place (no fp drift from merge/unmerge round trips, and no
  write into ZeRO-3 partitions);
- the copy is kept in `inference_dtype` (e.g. bf16 while training keeps fp32 master weights), and on CPU its
  bf16 linear weights are pre-packed for oneDNN (~1.5x faster GEMMs at decode batch sizes, bit-identical);
- it is refreshed only when the trainer said the weights changed (`mark_weights_updated()` after each
  optimizer step bumps a version counter); otherwise the copy is reused;
- with `release_after_rollout` its storage is freed after each rollout (module structure kept, so the next
  refresh costs only the copy).
With `compile_decode`, decode steps of Llama-architecture actors run a torch.compile'd step
(`rollout.compiled_decode`; compiled once per process, the weights are its inputs).
With `inference_dtype=None`, a plain (non-LoRA, non-ZeRO-3) actor is used as is: no copy at all.
With `guidance` (ILQL heads and beta != 0, `rollout.guided`), every decode step's logits are shifted by
beta * (Q - V) computed from the same forward; the compiled decode step is skipped then (eager decode).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from chatrl.engine.deepspeed import gathered
from chatrl.models.lora import plain_model, unwrap
from chatrl.paths import setup_extension_cache
from chatrl.rollout.compiled_decode import CompiledDecoder, why_unsupported
from chatrl.rollout.decode import GenerationSettings, generate
from chatrl.rollout.guided import QGuidance


def _plain_name(name: str) -> str:
    """Parameter name as in the un-adapted model: peft's `.base_layer` segments dropped."""
    return name.replace(".base_layer.", ".")


def _lora_deltas(base: nn.Module) -> dict[str, torch.Tensor]:
    """name of a weight -> sum of its active, not-yet-merged LoRA deltas (float32)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: no adapters possible
        return {}
    deltas: dict[str, torch.Tensor] = {}
    for name, mod in base.named_modules():
        if not isinstance(mod, LoraLayer) or getattr(mod, "disable_adapters", False):
            continue
        merged = set(getattr(mod, "merged_adapters", []))
        for adapter in mod.active_adapters:
            if adapter in merged or adapter not in mod.lora_A:
                continue
            delta = mod.get_delta_weight(adapter).float()
            key = f"{name}.weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    return deltas


def _source_state(base: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `base` under its plain name (tied aliases included), LoRA tensors excluded."""
    state = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        if "lora_" not in name:
            state[_plain_name(name)] = p
    return state


class PackedLinear(nn.Module):
    """nn.Linear replacement holding its weight pre-packed in oneDNN's blocked layout (CPU only), in `dtype`.
    bf16 (the Hybrid Engine's inference copy): same results as F.linear in bf16, faster at small batch (no per-call
    weight reorder). fp32 (`chatrl serve`'s batched decode): M = 8 row GEMMs ~1.4x the time of one row instead of
    MKL's ~2x; results differ from MKL's by float rounding, which is why fp32 rollouts do not use it (greedy rollouts
    are tested token-exact against `generate()`)."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = bias
        self.register_buffer("packed", torch.empty(0), persistent=False)

    def load(self, weight: torch.Tensor, batch_hint: int = 64) -> None:
        w = weight.detach().to(self.dtype).contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs linear weights of `dtype` on this CPU (bf16 needs AVX512BW/VL/DQ or AVX-NE-CONVERT: an
    AVX2-only CPU raises; fp32 packs on AVX2). Asked once per dtype."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 16, dtype=dtype), 8)
    except RuntimeError:
        return False
    return True


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """The inference copy packs bf16 weights only (see PackedLinear for why not fp32)."""
    return dtype == torch.bfloat16 and device.type == "cpu" and onednn_packs(dtype)


class InferenceCopy:
    """A second instance of the actor's architecture (built on the meta device, so no random init),
    materialised from the actor's weights in `dtype` on `refresh` and emptied on `release`."""

    def __init__(self, base: nn.Module, dtype: torch.dtype, device: torch.device, pack: bool):
        config = copy.deepcopy(base.config)  # own config: switching its attention must not touch the actor's
        with torch.device("meta"):
            self.model = type(base)(config)
        self.model.eval().requires_grad_(False)
        self.dtype, self.device = dtype, device
        self.packed: dict[str, PackedLinear] = {}
        if pack and can_pack(dtype, device):
            for name, mod in list(self.model.named_modules()):
                if type(mod) is nn.Linear:
                    packed = PackedLinear(mod.in_features, mod.out_features, mod.bias)
                    parent, _, child = name.rpartition(".")
                    setattr(self.model.get_submodule(parent) if parent else self.model, child, packed)
                    self.packed[name] = packed
        self.loaded = False

    @torch.no_grad()
    def refresh(self, base: nn.Module) -> None:
        """Copy (cast) every weight of `base` (+ LoRA deltas) into the copy. Parameters must be gathered."""
        state, deltas = _source_state(base), _lora_deltas(base)

        def value(name: str) -> torch.Tensor:
            src = state[name]
            if name in deltas:
                src = src.float() + deltas[name].to(src.device)
            return src.detach().to(device=self.device, dtype=self.dtype)

        # Parameters are replaced, not written (meta tensors cannot take data); tied aliases (e.g. lm_head and
        # embed_tokens) get the same new Parameter so they stay tied.
        made: dict[int, nn.Parameter] = {}
        for name, p in list(self.model.named_parameters(remove_duplicate=False)):
            if id(p) not in made:
                made[id(p)] = nn.Parameter(value(name).clone().contiguous(), requires_grad=False)
            mod_name, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(mod_name), attr, made[id(p)])
        for name, mod in self.packed.items():
            mod.load(value(f"{name}.weight"))
        base_buffers = dict(base.named_buffers())
        for name, _buf in list(self.model.named_buffers()):
            if name.endswith(".packed"):
                continue
            # Buffers (e.g. rotary inv_freq) are not trained: taken as they are, dtype included.
            src = base_buffers.get(name, base_buffers.get(_plain_name(name)))
            if src is None:
                raise RuntimeError(f"inference copy: buffer {name} not found in the actor")
            mod_name, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(mod_name), attr, src.detach().to(self.device).clone())
        self.loaded = True

    def release(self) -> None:
        """Free the weights' storage (structure kept for the next refresh)."""
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        for p in self.model.parameters():
            p.data = empty  # the Parameter objects (and their ties) stay; refresh replaces them
        for mod in self.packed.values():
            mod.packed = torch.empty(0)
        self.loaded = False


class HybridEngine:
    """Rollout-time view of a training actor (DeepSpeed engine or nn.Module, optionally peft LoRA / ZeRO-3).

        he = HybridEngine(actor, inference_dtype=torch.bfloat16, zero3=True)
        with he.inference_mode() as model:      # eval, no grad, weights gathered/merged/cast once
            ids, mask = he.generate(prompt_ids, prompt_mask, settings, eos_token_id=2, pad_token_id=2)
        ...optimizer step...; he.mark_weights_updated()
    """

    def __init__(self, actor: nn.Module, *, inference_dtype: torch.dtype | None,
                 release_after_rollout: bool = True, zero3: bool = False, pack_weights: bool = True,
                 compile_decode: bool = False, guidance: QGuidance | None = None):
        self.actor = actor
        self.guidance = guidance  # ILQL Q-guided decoding; may be replaced between rollouts (e.g. another beta)
        self.module = unwrap(actor)  # what trains: the model inside a DeepSpeed engine (a peft model under LoRA)
        self.base = plain_model(self.module)
        self.zero3 = zero3 or any(hasattr(p, "ds_id") for p in self.module.parameters())
        self.is_lora = self.base is not self.module
        self.inference_dtype = inference_dtype
        self.release_after_rollout = release_after_rollout
        self.pack_weights = pack_weights
        self.compile_decode = compile_decode
        self._decoder: CompiledDecoder | None = None
        self.version = 0
        self._copy: InferenceCopy | None = None
        self._copy_version = -1
        self._active: nn.Module | None = None

    @property
    def uses_copy(self) -> bool:
        return self.inference_dtype is not None or self.zero3 or self.is_lora

    def mark_weights_updated(self) -> None:
        """Call after every optimizer step: the next rollout re-copies the weights."""
        self.version += 1

    @property
    def device(self) -> torch.device:
        """Where the actor's parameters (and so the rollout's tensors) live."""
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def _inference_model(self) -> nn.Module:
        if not self.uses_copy:
            return self.base
        if self._copy is None:
            dtype = self.inference_dtype or next(self.base.parameters()).dtype
            self._copy = InferenceCopy(self.base, dtype, self.device, self.pack_weights)
        if not self._copy.loaded or self._copy_version != self.version:
            with gathered(self.module.parameters(), enabled=self.zero3):  # one gather for the whole refresh
                self._copy.refresh(self.base)
            self._copy_version = self.version
        return self._copy.model

    @contextlib.contextmanager
    def inference_mode(self) -> Iterator[nn.Module]:
        """Inference layout for one rollout: yields the model to decode with (eval, no grad); restores the
        actor's train/eval mode after and frees the inference copy if `release_after_rollout`."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                self._active = self._inference_model()
                yield self._active
        finally:
            self._active = None
            self.module.train(was_training)
            if self.release_after_rollout:
                self.release()

    def _decoder_for(self, model: nn.Module) -> CompiledDecoder | None:
        """The compiled decode step (built once; weights are its inputs, so refreshes need no recompile)."""
        if not self.compile_decode:
            return None
        if self._decoder is None:
            reason = why_unsupported(model)
            if reason:
                warnings.warn(f"rollout.compile: {reason}; decoding without compilation", stacklevel=3)
                self.compile_decode = False
                return None
            setup_extension_cache()  # inductor's kernels are cached in chatrl's cache dir
            self._decoder = CompiledDecoder(model)
        return self._decoder

    def release(self) -> None:
        """Free the inference copy's memory (it is rebuilt from the actor at the next rollout)."""
        if self._copy is not None:
            self._copy.release()

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: GenerationSettings, *,
                 eos_token_id: int, pad_token_id: int, return_logprobs: bool = False, synced: bool | None = None,
                 **kwargs):
        """Decode a rollout from LEFT padded prompts [B, P]; see `rollout.decode.generate` for the outputs and the
        other keyword arguments. Inside `inference_mode()` it reuses that layout; otherwise it opens one for this
        call. synced defaults to True under ZeRO-3 (every rank keeps stepping until all are done)."""
        synced = self.zero3 if synced is None else synced
        if self._active is None:
            with self.inference_mode() as model:
                return self._decode(model, prompt_ids, prompt_mask, settings, eos_token_id, pad_token_id,
                                    return_logprobs=return_logprobs, synced=synced, **kwargs)
        return self._decode(self._active, prompt_ids, prompt_mask, settings, eos_token_id, pad_token_id,
                            return_logprobs=return_logprobs, synced=synced, **kwargs)

    def _decode(self, model: nn.Module, *args, **kwargs):
        """`generate` on the inference model, Q-guided when guidance is active (then without the compiled step,
        whose graph has no heads; log-probs are then those of the guided distribution that was sampled)."""
        if self.guidance is not None and self.guidance.active:
            return generate(self.guidance.wrap(model), *args, decoder=None, **kwargs)
        return generate(model, *args, decoder=self._decoder_for(model), **kwargs)
