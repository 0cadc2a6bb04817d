"""RLHF math as pure tensor functions (torch + stdlib only: no configs, no distributed, no I/O).

Shapes: B = batch, T = sequence length, R = response length, V = vocabulary. Every mask has the shape
of the tensor it masks; 1 = the position counts, 0 = padding / after EOS. Values at masked positions
never change a result (they are zeroed with torch.where before use).

masked       masked_sum, masked_count, masked_mean(x, mask, dim=None), masked_var(x, mask, unbiased=True),
             masked_whiten(x, mask, shift_mean=True, moments=local_moments), zero_masked
kl           kl_k1, kl_k2, kl_k3, kl_abs, KL_ESTIMATORS, kl_penalty(logp, ref_logp, kind) -> [B, R],
             kl_loss(logp, ref_logp, mask, kind="k3") -> 0-d, LOSS_KL_ESTIMATORS (k2, k3: the ones with a KL gradient)
controllers  FixedKLController(beta), AdaptiveKLController(init_beta, target, horizon):
             .value, .update(current_kl, n_steps), state_dict()/load_state_dict()
rewards      shape_rewards(scores[B], kl[B,R], mask, beta, clip=None) -> [B, R], final_reward(score, discount, clip),
             last_token_index(mask) -> [B],
             overlong_penalty(lengths[B], max_len, buffer, factor) -> [B] (DAPO),
             turn_rewards(values[B,K], positions[B,K], valid[B,K], R, gamma) -> [B, R] (multi-turn episodes)
advantages   gae_advantages(rewards, values, mask, gamma, lam) -> (adv, returns),
             grpo_advantages(scores[B], group_size, mask), rloo_advantages, reinforce_returns(rewards, mask, gamma),
             ADVANTAGE_ESTIMATORS (name -> Estimator) / compute_advantages(kind, rewards, values, mask, ...)
losses       aggregate(per_token[B,R], mask, mode, denom=None) (token_mean / seq_mean_token_mean /
             seq_mean_token_sum_norm), aggregation_units(mask, mode),
             policy_loss (clip-higher, GSPO sequence ratio), value_loss -> (loss, stats);
             entropy_from_logits, mean_entropy; pairwise_reward_loss -> (loss, stats); token_logprobs;
             LOSS_AGGREGATIONS
ilql         ILQL (Snell et al. 2022): next_action_values, bellman_targets, q_bellman_loss, expectile_loss,
             cql_loss, awac_loss, ilql_loss -> (loss, stats), polyak_update, guided_logits
correction   truncated_is_weight(old_logp, sampler_logp, mask, cap) -> (weight, stats) (TIS), IS_CORRECTIONS
distill      reverse_kl_advantages(teacher_logp, student_logp, mask) -> [B, R] (on-policy distillation),
             distill_advantages(..., env_advantages, teacher_weight) (mixed with an environment's advantages)
registry     lookup(table, name, what): table[name] or a ValueError listing the choices
"""

from chatrl.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_returns,
    rloo_advantages,
)
from chatrl.algorithms.controllers import AdaptiveKLController, FixedKLController
from chatrl.algorithms.correction import IS_CORRECTIONS, truncated_is_weight
from chatrl.algorithms.distill import distill_advantages, reverse_kl_advantages
from chatrl.algorithms.ilql import (
    awac_loss,
    bellman_targets,
    cql_loss,
    expectile_loss,
    guided_logits,
    ilql_loss,
    next_action_values,
    polyak_update,
    q_bellman_loss,
)
from chatrl.algorithms.kl import KL_ESTIMATORS, LOSS_KL_ESTIMATORS, kl_loss, kl_penalty
from chatrl.algorithms.losses import (
    LOSS_AGGREGATIONS,
    aggregate,
    aggregation_units,
    entropy_from_logits,
    mean_entropy,
    pairwise_reward_loss,
    policy_loss,
    token_logprobs,
    value_loss,
)
from chatrl.algorithms.masked import local_moments, masked_mean, masked_sum, masked_var, masked_whiten, zero_masked
from chatrl.algorithms.rewards import (
    final_reward,
    last_token_index,
    overlong_penalty,
    shape_rewards,
    turn_rewards,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "IS_CORRECTIONS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "LOSS_KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "aggregation_units",
    "awac_loss",
    "bellman_targets",
    "compute_advantages",
    "cql_loss",
    "distill_advantages",
    "entropy_from_logits",
    "expectile_loss",
    "final_reward",
    "gae_advantages",
    "grpo_advantages",
    "guided_logits",
    "ilql_loss",
    "kl_loss",
    "kl_penalty",
    "last_token_index",
    "local_moments",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mean_entropy",
    "next_action_values",
    "overlong_penalty",
    "pairwise_reward_loss",
    "policy_loss",
    "polyak_update",
    "q_bellman_loss",
    "reinforce_returns",
    "reverse_kl_advantages",
    "rloo_advantages",
    "shape_rewards",
    "token_logprobs",
    "truncated_is_weight",
    "turn_rewards",
    "value_loss",
    "zero_masked",
]
