"""LoRA through peft: apply, merge for saving (on a copy, or from a gathered state dict), and the wrappers.

The training model is never merged in place: the Hybrid Engine adds the LoRA deltas into its inference copy
(rollout/hybrid.py), since peft's unmerge subtracts the delta again, which in bf16 does not give back the same
weights. With ZeRO-3 the parameters are partitioned: save from a gathered state dict with `merge_lora_state_dict`.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from chatrl.config import LoraConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

PEFT_PREFIX = "base_model.model."


# peft is imported only by `apply_lora`: `chatrl chat`, `serve` and `eval` load models through this module and must
# not pay peft's import (nor its accelerate/DeepSpeed probes) for a plain model. No object is a peft model or a
# LoRA layer before peft has been imported, so the type checks below look peft up in sys.modules instead.
def is_peft_model(model: object) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _is_lora_layer(module: object) -> bool:
    lora = sys.modules.get("peft.tuners.lora")
    return lora is not None and isinstance(module, lora.LoraLayer)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip training wrappers (DeepSpeed engine / DDP `.module`, chatrl's `hf_model` wrappers) down to
    the HF model or the peft model around it."""
    while not is_peft_model(model):
        if hasattr(model, "hf_model"):
            model = model.hf_model
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            break
    return model


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under every wrapper: `unwrap`, then peft's (LoRA layers are injected into it in
    place, so it runs the adapters too)."""
    inner = unwrap(model)
    return inner.get_base_model() if is_peft_model(inner) else inner


def apply_lora(model: torch.nn.Module, lora_cfg: LoraConfig, *, keep_trainable: tuple[str, ...] = ()) -> PeftModel:
    """Inject LoRA adapters into `lora_cfg.target_modules` and return the peft model.

    only_optimize_lora=True freezes every base weight (only adapters train, plus the modules whose
    names start with an entry of `keep_trainable`, e.g. a reward model's "score" head); False keeps
    the base weights trainable too.
    """
    from peft import LoraConfig as PeftLoraConfig  # lazy: see is_peft_model
    from peft import get_peft_model

    is_causal = bool(getattr(model, "can_generate", lambda: False)())
    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                              target_modules=list(lora_cfg.target_modules), bias="none",
                              task_type="CAUSAL_LM" if is_causal else None)
    peft_model = get_peft_model(model, peft_cfg)
    base = peft_model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        keep = not lora_cfg.only_optimize_lora or any(name.startswith(p + ".") for p in keep_trainable)
        param.requires_grad_(keep)
    return peft_model


def lora_layers(model: torch.nn.Module) -> Iterator[LoraLayer]:
    for module in unwrap(model).modules():
        if _is_lora_layer(module):
            yield module


def merge_lora_for_save(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model with the adapters merged, built from a copy (the training model is untouched).

    Non-LoRA models are returned unwrapped as they are.
    """
    inner = unwrap(model)
    if not is_peft_model(inner):
        return inner
    clone = copy.deepcopy(inner)
    for layer in lora_layers(clone):  # a model merged in place elsewhere (peft's merge_adapter) must not merge twice
        if layer.merged:
            layer.unmerge()
    return clone.merge_and_unload()


def lora_scaling(peft_model: PeftModel, adapter: str = "default") -> float:
    """alpha / r (or alpha / sqrt(r) with rsLoRA) of an adapter."""
    cfg = peft_model.peft_config[adapter]
    return cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


def merge_lora_state_dict(state_dict: Mapping[str, torch.Tensor], scaling: float,
                          adapter: str = "default") -> dict[str, torch.Tensor]:
    """Turn a full peft state dict (e.g. gathered from ZeRO-3) into plain HF keys with adapters merged.

    W' = W + scaling * B @ A for each `<mod>.base_layer.weight` with `<mod>.lora_A/B.<adapter>.weight`;
    LoRA tensors are dropped and the "base_model.model." / ".base_layer" parts of names removed.
    Computed in fp32 and cast back to W's dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(".base_layer.weight"):
            mod = key[: -len(".base_layer.weight")]
            a = state_dict[f"{mod}.lora_A.{adapter}.weight"].float()
            b = state_dict[f"{mod}.lora_B.{adapter}.weight"].float()
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        out[name.replace(".base_layer.", ".")] = value
    return out
