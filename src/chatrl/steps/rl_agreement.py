"""Rollout/training agreement: does the policy that sampled the rollout equal the policy the update scores?

The rollout is decoded by the Hybrid Engine's inference copy (its own dtype, packed bf16 weights, the decode
attention kernel, a copy refreshed only when the trainer marks the weights updated); the update scores the same
tokens with the training actor. Per iteration, in the metrics row (an alarm reads these names):

  agreement/logprob_max_abs_diff   max |sampler log-prob - trainer log-prob| over the action tokens of all ranks
  agreement/logprob_mean_abs_diff  the mean of the same over all action tokens
      sampler: recorded while decoding (`EpisodeTensors.sampler_logprobs`: the full softmax(logits / T), before
      top-k/top-p and EOS/pad blocking); trainer: the scoring pass's old log-probs, or in the on-policy shortcut
      the update's first forward (`policy_update` writes it into rollout.logprobs).
  agreement/vocab_kl               mean over up to PROBE_POSITIONS action positions (of up to PROBE_ROWS rows per
      process) of the full-vocabulary KL(sampler || trainer), from teacher-forced forwards of the inference copy
      and of the actor before the update (so its weights are the rollout's).

Both sides are full tempered softmaxes, so the numbers measure the copy (dtype, kernels, staleness): fp32 agrees to
rounding, bf16 shows its gap (which `rollout.is_correction=tis` corrects), a stale copy shows a large one. The
sampler's truncation (top-k/top-p, EOS blocked before min_new_tokens, pad never sampled) is a further gap between
the sampled and the scored policy that these numbers leave out.
"""

from __future__ import annotations

import torch
from torch import nn

from chatrl.algorithms.masked import zero_masked
from chatrl.batches import Rollout
from chatrl.engine.collectives import global_max, global_sum
from chatrl.rollout.hybrid import HybridEngine
from chatrl.steps.rl_experience import joined, response_logits
from chatrl.steps.rl_models import RLModels
from chatrl.steps.rl_update import Experience

PROBE_ROWS = 8
PROBE_POSITIONS = 64


def logprob_gaps(sampler: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(max, sum, count) of |sampler - trainer| over mask [B, R] (max 0 when nothing counts)."""
    gap = zero_masked((sampler.float() - trainer.float()).abs(), mask)
    return float(gap.max()) if gap.numel() else 0.0, float(gap.sum()), float(mask.bool().sum())


def vocab_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per position over the last (vocabulary) dim, in fp32: [..., V] -> [...]."""
    logp = torch.log_softmax(p_logits.float(), dim=-1)
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def probe_positions(mask: torch.Tensor, rows: int, positions: int, gen: torch.Generator) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """min(rows, B) rows drawn at random (the same count on every rank: ZeRO-3's forwards must match), and up to
    `positions` of their action positions (mask [B, R] == 1), drawn at random. -> (rows [n], position mask [n, R])."""
    picked = torch.randperm(mask.shape[0], generator=gen)[:rows].sort().values
    sub = mask[picked.to(mask.device)].bool().cpu()
    where = sub.nonzero()
    keep = where[torch.randperm(where.shape[0], generator=gen)[:positions]]
    chosen = torch.zeros_like(sub)
    chosen[keep[:, 0], keep[:, 1]] = True
    return picked, chosen.to(mask.device)


@torch.no_grad()
def sampled_vocab_kl(hybrid: HybridEngine, actor: nn.Module, rollout: Rollout, temperature: float,
                     seed: int) -> tuple[float, float]:
    """(sum, count) of KL(inference copy || actor) over the probed positions of this rank's rollout (models in eval
    mode; the inference copy as the next rollout would use it: re-copied only if it was released or marked stale)."""
    gen = torch.Generator().manual_seed(seed)
    rows, chosen = probe_positions(rollout.action_mask, PROBE_ROWS, PROBE_POSITIONS, gen)
    rows = rows.to(rollout.action_mask.device)
    ids, attn = joined(rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.response_ids[rows],
                       rollout.response_mask[rows])
    plen = rollout.prompt_ids.shape[1]
    with hybrid.inference_mode() as model:
        sampler = response_logits(model, ids, attn, plen, temperature)[chosen]
    trainer = response_logits(actor, ids, attn, plen, temperature)[chosen]
    kl = vocab_kl(sampler, trainer)
    return float(kl.sum()), float(kl.numel())


def agreement_metrics(rollout: Rollout, kl_sum: float, kl_count: float) -> dict[str, float]:
    """The agreement/* metrics over all ranks (collectives: every rank calls it); {} without sampler log-probs.
    rollout.logprobs must hold the trainer's old log-probs (after `policy_update` in the on-policy shortcut)."""
    if rollout.sampler_logprobs is None:
        return {}
    top, total, count = logprob_gaps(rollout.sampler_logprobs, rollout.logprobs, rollout.action_mask)
    total, count = global_sum(total), global_sum(count)
    kl_sum, kl_count = global_sum(kl_sum), global_sum(kl_count)
    return {"agreement/logprob_max_abs_diff": global_max(top),
            "agreement/logprob_mean_abs_diff": total / max(count, 1.0),
            "agreement/vocab_kl": kl_sum / max(kl_count, 1.0)}


def probe_before_update(m: RLModels, exp: Experience, temperature: float, seed: int) -> tuple[float, float]:
    """The vocab KL's (sum, count), with the actor's weights still those of the rollout (call before the update)."""
    if exp.rollout.sampler_logprobs is None:
        return 0.0, 0.0
    m.eval_mode()
    try:
        return sampled_vocab_kl(m.hybrid, m.actor, exp.rollout, temperature, seed)
    finally:
        m.train_mode()
