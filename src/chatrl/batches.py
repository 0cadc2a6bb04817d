"""Typed batches passed between parts. B = batch, T = sequence length, R = response length.

Masks are 1 on real tokens that count and 0 on padding (or on tokens that must not count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch


def pad_rows(rows: Sequence[Sequence[int]], pad: int, side: Literal["left", "right"] = "right",
             min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ints -> (ids, mask), both [B, T] long with T the longest row, at least `min_width` (so 0 when every
    row is empty, by default): ids filled with `pad` on `side`, mask 1 on the rows' own entries. Left padding puts
    every row's end in the last column (prompts before generation); right padding keeps position t at column t
    (training rows)."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    width = max(max((len(r) for r in rows), default=0), min_width)
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append([pad] * fill + list(r) if side == "left" else list(r) + [pad] * fill)
        mask.append([0] * fill + [1] * len(r) if side == "left" else [1] * len(r) + [0] * fill)
    shape = (len(rows), width)
    return (torch.tensor(ids, dtype=torch.long).reshape(shape), torch.tensor(mask, dtype=torch.long).reshape(shape))


class _TensorBatch:
    def to(self, device: torch.device | str):
        """Move every tensor field to `device` (non-tensors are kept)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return type(self)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


@dataclass
class TokenBatch(_TensorBatch):
    """SFT batch. input_ids/attention_mask/labels: [B, T]; labels are -100 where no loss is taken
    (prompt tokens unless train_on_prompt, and padding). Right padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@dataclass
class PairBatch(_TensorBatch):
    """Reward-model batch: rows [0, B) are chosen, rows [B, 2B) the rejected replies of the same pairs,
    so both go through the model in one forward. input_ids/attention_mask: [2B, T].
    margin: [B] (zeros when the data has none). reply_mask: [2B, T] 1 on the reply's tokens (the ones DPO scores),
    None when the rows carry no prompt lengths. ref_logps: [2B] the frozen reference's summed reply log-probs when
    precomputed (DPO), else None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    margin: torch.Tensor
    reply_mask: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


@dataclass
class UnpairedBatch(_TensorBatch):
    """KTO batch, laid out as PairBatch's two halves (so `reply_logps` and the reference cache take either): rows
    [0, B) are B examples (prompt + completion), rows [B, 2B) their mismatched KL rows (the prompt with another
    example's completion). input_ids/attention_mask/reply_mask: [2B, T]; desirable: [B] bool; ref_logps: [2B] the
    reference's summed reply log-probs when precomputed, else None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    reply_mask: torch.Tensor
    desirable: torch.Tensor
    ref_logps: torch.Tensor | None = None

    def half(self, second: bool) -> UnpairedBatch:
        """The examples (second=False) or the KL rows (True) alone, cut to their own longest row."""
        n = self.desirable.shape[0]
        rows = slice(n, 2 * n) if second else slice(0, n)
        width = int(self.attention_mask[rows].sum(1).max())
        return UnpairedBatch(input_ids=self.input_ids[rows, :width], attention_mask=self.attention_mask[rows, :width],
                             reply_mask=self.reply_mask[rows, :width], desirable=self.desirable,
                             ref_logps=None if self.ref_logps is None else self.ref_logps[rows])


@dataclass
class Rollout(_TensorBatch):
    """What generation + scoring hand to the policy update.

    prompt_ids, prompt_mask:  [B, P] left-padded prompts (an episode's first observation)
    response_ids:             [B, R] everything after the prompt, right-padded: the model's replies and, in
                              multi-turn episodes, the environment's messages between them
    response_mask:            [B, R] 1 on real tokens (attended to), 0 on padding
    action_mask:              [B, R] 1 on tokens the model generated (the only ones losses, KL and advantages
                              count), 0 on padding and on tokens the environment wrote; = response_mask single-turn
    logprobs, ref_logprobs:   [B, R] log pi(a_t | s_t) of the actor / frozen reference at generation time
    values:                   [B, R] critic value of the state before each response token
    scores:                   [B]    sequence reward (reward model + reward functions), before KL shaping
    sampler_logprobs:         [B, R] log-probs of the sampled tokens under the rollout's inference copy (full
                              softmax(logits / T)), 0 off the actions; None when not recorded
    teacher_logprobs:         [B, R] log-probs of the tokens under on-policy distillation's frozen teacher; None
                              without a teacher
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> Rollout:
        """Rows `idx` of every tensor field (None fields stay None)."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                          for f in fields(self)})
