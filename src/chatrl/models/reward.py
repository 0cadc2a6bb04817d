"""Reward model / critic = causal-LM backbone + scalar head, stored as a standard HF
`AutoModelForSequenceClassification` (num_labels=1, pad token set), so plain transformers loads it
and scores with it.

THE RULE (shared with the data pipeline and HF): a sequence's score is the head's value at its last
real token, i.e. the last position where attention_mask == 1. Reward sequences end exactly at the
reply's EOS, and the pad token differs from EOS (see `loading.ensure_pad_token`), so with right
padding this is also the token HF's pooling picks ("last token that is not pad").
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from chatrl.config import LoraConfig
from chatrl.errors import ChatrlError
from chatrl.models.loading import (
    _hub_error,
    load_model_config,
    load_tokenizer,
    prepare_model,
    resolve_dtype,
    resolve_model_source,
    weights_kwargs,
)
from chatrl.models.lora import plain_model

HEAD = "score"  # the attribute name of the scalar head in HF's *ForSequenceClassification models
HEAD_INIT_SEED = 0


def load_reward_model(name_or_path: str, *, dtype: torch.dtype | str = "auto",
                      lora_cfg: Optional[LoraConfig] = None, tokenizer=None, trainable: bool = True,
                      gradient_checkpointing: bool = False,
                      trainable_layers: Optional[int] = None, allow_pickle: bool = False) -> PreTrainedModel:
    """Load a reward model (or critic) from a causal-LM folder (new head) or a reward-model folder (keeps its head).

    A new head is initialised deterministically (normal, std = config.initializer_range, fixed seed,
    without touching the global RNG). LoRA (lora_cfg.r > 0) keeps the head fully trainable.
    trainable=False gives a frozen eval-mode model (PPO's reward model); trainable_layers=N trains only the top N
    blocks and the head (`loading.freeze_lower_layers`). Pickle-only folders are refused unless `allow_pickle`
    (`loading.weights_kwargs`).
    """
    source = resolve_model_source(name_or_path)
    weights = weights_kwargs(source, allow_pickle, auto_class="AutoModelForSequenceClassification")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
    config = load_model_config(source, tokenizer, num_labels=1)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, dtype=resolve_dtype(dtype),
            output_loading_info=True, **weights)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err, weights) from err
    head = getattr(model, HEAD, None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ChatrlError(f"{source}: {type(model).__name__} has no scalar `{HEAD}` head; chatrl reward models "
                          f"need a decoder with HF's generic sequence-classification head (Llama, Qwen2, Mistral...)")
    if any(k.startswith(HEAD + ".") for k in info.get("missing_keys", [])):
        init_head(model)
    return prepare_model(model, tokenizer, gradient_checkpointing=gradient_checkpointing, lora=lora_cfg,
                         trainable=trainable, keep_trainable=(HEAD,), trainable_layers=trainable_layers)


def init_head(model: PreTrainedModel, seed: int = HEAD_INIT_SEED) -> None:
    """Deterministic small init of the scalar head (independent of the global RNG state)."""
    head = getattr(model, HEAD)
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = torch.randn(head.weight.shape, generator=gen, dtype=torch.float32) * std
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


def end_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of each row's last real token: the last position where attention_mask == 1.

    Computed as T-1 - argmax(flip(mask)), valid for right AND left padding (mask.sum()-1 is only
    right for right padding). Rows must have at least one real token.
    """
    mask = attention_mask.to(torch.int64)
    t = mask.shape[-1]
    return (t - 1) - mask.flip(-1).argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only ([B, T]), so a left-padded row gets the same positions as alone."""
    mask = attention_mask.to(torch.int64)
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _per_token_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    hf = plain_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    values = getattr(hf, HEAD)(out.last_hidden_state).squeeze(-1).float()
    # left-padding rows can produce garbage (even NaN) at pad positions: zero them so they never leak.
    return torch.where(attention_mask.bool(), values, torch.zeros_like(values))


class TokenValueModel(torch.nn.Module):
    """nn.Module whose forward returns per-token values [B, T]: hand THIS to deepspeed.initialize.

    DeepSpeed hooks the tensors its engine's forward returns (ZeRO backward bookkeeping), so the
    values a loss is computed from must be that forward's output; `save_hf_folder` unwraps it
    (attribute `hf_model`) and saves the inner sequence-classification model.
    """

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _per_token_values(self.hf_model, input_ids, attention_mask)


def token_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token head outputs [B, T] in fp32 (0 at padding): the PPO critic's values.

    `model` is a sequence-classification model, its peft wrapper, a TokenValueModel, or a DeepSpeed
    engine around a TokenValueModel (then the engine's forward is called, as DeepSpeed requires).
    """
    if isinstance(model, TokenValueModel) or isinstance(getattr(model, "module", None), TokenValueModel):
        return model(input_ids, attention_mask)
    if hasattr(model, "module") and not hasattr(model, "hf_model") and hasattr(model, "backward"):
        raise ChatrlError("token_values: wrap the reward model in chatrl.models.reward.TokenValueModel before "
                          "deepspeed.initialize, so the engine's forward returns the values")
    return _per_token_values(model, input_ids, attention_mask)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score [B] of each sequence: its per-token value at `end_token_index(attention_mask)` (THE RULE)."""
    values = token_values(model, input_ids, attention_mask)
    return gather_end_values(values, attention_mask)


def gather_end_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] -> [B] at each row's last real token."""
    idx = end_token_index(attention_mask).to(values.device)
    return values.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
