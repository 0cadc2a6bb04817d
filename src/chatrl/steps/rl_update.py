"""Step 5 of an RL iteration: `ppo_epochs` passes over shuffled mini-batches of the experience; DeepSpeed
accumulates `grad_accum` micro-batches into one optimizer step per mini-batch. Shared by PPO and GRPO: the
critic's update runs only when there is a critic, the KL term only when it sits in the loss."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from chatrl.algorithms.correction import IS_CORRECTIONS
from chatrl.algorithms.kl import kl_loss
from chatrl.algorithms.losses import (
    aggregate,
    aggregation_units,
    entropy_from_logits,
    token_logprobs,
    value_loss,
)
from chatrl.algorithms.masked import masked_mean
from chatrl.algorithms.policy_losses import POLICY_LOSSES
from chatrl.batches import Rollout
from chatrl.config_rl import BatchPlan, PPOOptions, RLStepConfig
from chatrl.engine.collectives import global_sum_tensor
from chatrl.engine.faults import BadSteps
from chatrl.steps.rl_experience import joined, response_logits, response_values
from chatrl.steps.rl_models import RLModels


@dataclass
class Experience:
    """Steps 1-4 of an iteration: the scored rollout and what the update regresses on (all [B, R])."""

    rollout: Rollout
    kl: torch.Tensor           # per-token KL estimate (0 off the actions)
    advantages: torch.Tensor
    returns: torch.Tensor      # the critic's targets (GAE); = advantages for critic-free estimators
    on_policy: bool = False    # rollout.logprobs were not computed: the update's forward (detached) stands in,
    #                            and `policy_update` writes it into rollout.logprobs (the agreement metrics read it)
    kl_coef: float = 0.0       # beta of a KL in the loss: the KL controller's value when the rollout was scored

    def rows(self, idx: torch.Tensor) -> Experience:
        return Experience(self.rollout.rows(idx), self.kl[idx], self.advantages[idx], self.returns[idx], self.on_policy,
                          self.kl_coef)


def single_on_policy_step(cfg: RLStepConfig, has_reference: bool, has_critic: bool, has_teacher: bool = False) -> bool:
    """One epoch, one mini-batch, nothing else reading the rollout's log-probs: the update's first and only forward
    runs on the rollout's weights, so the old log-probs equal its own (ratio exactly 1) and the separate scoring
    forward of the actor can be skipped. (A distillation teacher's advantages read them before the update.)"""
    p = cfg.policy
    return p.ppo_epochs == 1 and p.mini_batches == 1 and not has_reference and not has_critic and not has_teacher


def policy_update(m: RLModels, exp: Experience, cfg: RLStepConfig, plan: BatchPlan,
                  bad: BadSteps | None = None) -> dict[str, float]:
    """The actor's policy loss (`policy_loss`: PPO-clip, CISPO or SAPO; + KL term, entropy bonus, ptx) and the
    critic's value loss, averaged over the micro-batches for logging. Every term is reduced with the policy's
    aggregation over the whole mini-batch (all micro-batches, all ranks), so a gradient does not depend on how a
    mini-batch is cut. An optimizer step whose loss or gradients are not finite is skipped and counted in `bad`
    (default: a counter that never stops the run)."""
    p = cfg.policy
    bad = bad if bad is not None else BadSteps(limit=0)
    n, micro = exp.rollout.response_ids.shape[0], p.micro_batch_size
    local_mini = plan.grad_accum * micro
    max_len = cfg.rollout.max_new_tokens * cfg.env.max_turns  # Dr. GRPO's constant L_max
    sums: dict[str, float] = {}
    norms: list[float] = []
    count = 0
    for _ in range(p.ppo_epochs):
        for mini in torch.randperm(n).split(local_mini):
            # the mean over the whole mini-batch (all micro-batches, all ranks), not per micro-batch: each
            # micro-batch divides by its share of the mini-batch's tokens (or rows), as DeepSpeed then averages
            units = global_sum_tensor(aggregation_units(exp.rollout.action_mask[mini], p.aggregation))
            denom = units.clamp(min=1) / (plan.grad_accum * plan.world)
            for idx in mini.split(micro):
                mb = exp.rows(idx)
                stats = _micro_step(m, mb, cfg, max_len, denom, bad)
                if exp.on_policy:  # one epoch, one mini-batch: each row's first and only forward
                    exp.rollout.logprobs[idx] = mb.rollout.logprobs
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            norm = bad.grad_norm(m.actor)  # of the step that just ran
            if norm is not None and math.isfinite(float(norm)):
                norms.append(float(norm))
    out = {k: v / max(count, 1) for k, v in sums.items()}
    if norms:
        out["policy_grad_norm"] = sum(norms) / len(norms)  # before clipping, mean over the optimizer steps
    return out


def _micro_step(m: RLModels, mb: Experience, cfg: RLStepConfig, max_len: int,
                denom: torch.Tensor, bad: BadSteps) -> dict[str, float]:
    p, r = cfg.policy, mb.rollout
    # the policy loss, the KL term, the entropy bonus and the value loss reduce their per-token values the same way
    agg = functools.partial(aggregate, mode=p.aggregation, max_len=max_len, denom=denom)
    mask, plen = r.action_mask, r.prompt_ids.shape[1]
    ids, attn = joined(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    # actor: the policy loss (PPO-clip, CISPO, SAPO) (+ beta * KL when it sits in the loss) - entropy bonus (+ ptx)
    logits = response_logits(m.actor, ids, attn, plen, cfg.rollout.temperature)
    logprobs = token_logprobs(logits, r.response_ids)
    old_logprobs = logprobs.detach() if mb.on_policy else r.logprobs
    if mb.on_policy:
        r.logprobs = old_logprobs
    weights, is_stats = _is_weights(cfg, old_logprobs, r.sampler_logprobs, mask)
    gate = {"tau_pos": p.sapo_tau_pos, "tau_neg": p.sapo_tau_neg} if p.policy_loss == "sapo" else {}
    pg_loss, pg_stats = POLICY_LOSSES[p.policy_loss](
        logprobs, old_logprobs, mb.advantages, mask, p.clip_eps, clip_eps_high=p.clip_eps_high,
        level=p.importance_sampling_level, agg=p.aggregation, max_len=max_len, denom=denom, weights=weights, **gate)
    # logged always (the token mean), a loss term only with a bonus: without one, no graph keeps its [B, R, V]
    # softmax for backward
    with torch.set_grad_enabled(p.entropy_coef != 0 and torch.is_grad_enabled()):
        entropy = entropy_from_logits(logits)
    loss = pg_loss - p.entropy_coef * agg(entropy, mask) if p.entropy_coef else pg_loss
    stats = {"policy_loss": pg_loss.item(), "entropy": masked_mean(entropy.detach(), mask).item(),
             **{f"policy_{k}": float(v) for k, v in pg_stats.items()}, **{k: float(v) for k, v in is_stats.items()}}
    if p.kl_in == "loss" and m.reference is not None:
        kl_term = kl_loss(logprobs, r.ref_logprobs, mask, p.kl_estimator, agg=agg)
        loss = loss + mb.kl_coef * kl_term  # the controller's beta (adaptive with kl_target), not the initial one
        stats["kl_loss"] = kl_term.item()
    if isinstance(p, PPOOptions) and p.ptx_coef > 0 and m.ptx_batches is not None:
        batch = next(m.ptx_batches)
        loss = loss + p.ptx_coef * m.actor(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           labels=batch.labels, use_cache=False).loss
    bad.backward_step(m.actor, loss)
    # critic: clipped value regression to the GAE returns
    if m.critic is not None and isinstance(p, PPOOptions):
        values = response_values(m.critic, ids, attn, plen)
        v_loss, v_stats = value_loss(values, r.values, mb.returns, mask, p.value_clip_eps, agg=agg)
        bad.backward_step(m.critic, v_loss)
        stats.update(value_loss=v_loss.item(), **{f"value_{k}": float(v) for k, v in v_stats.items()})
    return stats


def _is_weights(cfg: RLStepConfig, old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The per-token weight of `rollout.is_correction` (None for none) and its stats (tis: is_weight_mean,
    is_capped_frac; mis: is_weight_mean, is_masked_frac[_low|_high])."""
    r = cfg.rollout
    if r.is_correction == "none":
        return None, {}
    if sampler_logprobs is None:
        raise ValueError(f"rollout.is_correction={r.is_correction} needs the sampler's log-probs in the rollout")
    return IS_CORRECTIONS[r.is_correction](old_logprobs, sampler_logprobs, mask, r.is_cap, r.is_low)
