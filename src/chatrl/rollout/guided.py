"""Q-guided decoding (ILQL): a causal LM whose logits come out shifted by beta * (Q - V).

`QGuidedLM` wraps a causal LM and ILQL heads and answers the calls the decoders make (`model(input_ids=...,
attention_mask=..., position_ids=..., use_cache=..., logits_to_keep=..., cache=...)` -> `.logits`): one backbone
forward gives the last hidden states, from which both the LM head's logits and the heads' Q and V are computed.
So the shift is a logits transform in front of the ONE sampler (`rollout.sampling.pick_tokens`): the Hybrid
Engine's decode loop (`rollout.decode.generate`) and the chat/server `Decoding.step` use it unchanged.
beta = 0 is the plain LM. The compiled decode step (`rollout.compile`) is not used while heads guide decoding:
it computes logits inside its own graph, without the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from chatrl.algorithms.ilql import guided_logits
from chatrl.errors import ChatrlError
from chatrl.models.ilql_heads import ILQLHeads, check_fits, has_heads, load_heads
from chatrl.models.lora import plain_model


def _keep(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor | None) -> torch.Tensor:
    """The positions transformers would compute logits for: all (None / 0), the last n (int), or an index tensor."""
    if logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return hidden
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


class QGuidedLM(nn.Module):
    """A causal LM whose forward returns logits + beta * (Q - V) from the same forward (heads on the last hidden
    states). Exposes the LM's `config` and `generation_config`, so KV caches and EOS ids work as for the LM."""

    def __init__(self, lm: nn.Module, heads: ILQLHeads, beta: float):
        super().__init__()
        self.lm = lm
        self.heads = heads
        self.beta = float(beta)

    @property
    def config(self):  # noqa: ANN201 - transformers' PretrainedConfig of the wrapped LM
        return self.lm.config

    @property
    def generation_config(self):  # noqa: ANN201 - the LM's GenerationConfig (EOS ids)
        return getattr(self.lm, "generation_config", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor | None = None, **cache_kwargs: object) -> CausalLMOutputWithPast:
        hf = plain_model(self.lm)
        backbone = getattr(hf, hf.base_model_prefix)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=use_cache, **cache_kwargs)
        hidden = _keep(out.last_hidden_state, logits_to_keep)
        logits = hf.get_output_embeddings()(hidden)
        if self.beta != 0:
            q, v = self.heads.guidance(hidden)
            logits = guided_logits(logits.float(), q, v, self.beta)
        # the decoders read only `.logits` (the cache they passed in is filled in place); setting the output's cache
        # field would hit the name transformers renamed (past_key_values -> cache) and its deprecation warning
        return CausalLMOutputWithPast(logits=logits)


@dataclass
class QGuidance:
    """ILQL heads and the beta to decode with; `wrap(lm)` is the model the decoders call (the LM itself when
    beta = 0, so the plain path — and its fast variants — stay exactly as they are)."""

    heads: ILQLHeads
    beta: float

    @property
    def active(self) -> bool:
        return self.beta != 0

    def wrap(self, lm: nn.Module) -> nn.Module:
        if not self.active:
            return lm
        device = next(lm.parameters()).device
        return QGuidedLM(lm, self.heads.to(device), self.beta)


def load_guidance(folder: str, model: torch.nn.Module, beta: float | None) -> QGuidance | None:
    """The ILQL heads saved in `folder` with the beta to decode with, or None (no heads, or beta 0)."""
    if not has_heads(folder):
        if beta:
            raise ChatrlError(f"--ilql-beta {beta}: {folder} has no ILQL heads (ilql_heads.safetensors); "
                              "train them with `chatrl ilql`, or leave --ilql-beta out")
        return None
    heads, meta = load_heads(folder)
    check_fits(heads, model, folder)
    beta = meta.beta if beta is None else beta
    return QGuidance(heads, beta) if beta != 0 else None
