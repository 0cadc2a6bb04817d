"""RLHF math as pure tensor functions (torch + stdlib only: no configs, no distributed, no I/O).

Shapes: B = batch, T = sequence length, R = response length, V = vocabulary. Every mask has the shape
of the tensor it masks; 1 = the position counts, 0 = padding / after EOS. Values at masked positions
never change a result (they are zeroed with torch.where before use).

masked       masked_sum, masked_count, masked_mean(x, mask, dim=None), masked_var(x, mask, unbiased=True),
             masked_whiten(x, mask, shift_mean=True), zero_masked
kl           kl_k1, kl_k2, kl_k3, kl_abs, KL_ESTIMATORS, kl_penalty(logp, ref_logp, kind) -> [B, R],
             kl_loss(logp, ref_logp, mask, kind="k3") -> 0-d
controllers  FixedKLController(beta), AdaptiveKLController(init_beta, target, horizon):
             .value, .update(current_kl, n_steps), state_dict()/load_state_dict()
rewards      shape_rewards(scores[B], kl[B,R], mask, beta, clip=None) -> [B, R],
             last_token_index(mask) -> [B], contains_eos(ids, mask, eos_id) -> [B], eos_penalty(scores, has_eos, p)
advantages   gae_advantages(rewards, values, mask, gamma, lam) -> (adv, returns), whiten_advantages,
             grpo_advantages(scores[B], group_size, mask), reinforce_returns(rewards, mask, gamma),
             ADVANTAGE_ESTIMATORS / NEEDS_CRITIC / compute_advantages(kind, rewards, values, mask, ...)
losses       policy_loss, value_loss -> (loss, stats); entropy_from_logits, mean_entropy;
             pairwise_reward_loss -> (loss, stats); sft_loss; token_logprobs;
             POLICY_LOSSES, VALUE_LOSSES, REWARD_LOSSES
registry     lookup(table, name, what): table[name] or a ValueError listing the choices
"""

from chatrl.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    NEEDS_CRITIC,
    compute_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_returns,
    whiten_advantages,
)
from chatrl.algorithms.controllers import AdaptiveKLController, FixedKLController
from chatrl.algorithms.kl import KL_ESTIMATORS, kl_loss, kl_penalty
from chatrl.algorithms.losses import (
    POLICY_LOSSES,
    REWARD_LOSSES,
    VALUE_LOSSES,
    entropy_from_logits,
    mean_entropy,
    pairwise_reward_loss,
    policy_loss,
    sft_loss,
    token_logprobs,
    value_loss,
)
from chatrl.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten, zero_masked
from chatrl.algorithms.rewards import contains_eos, eos_penalty, last_token_index, shape_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "NEEDS_CRITIC",
    "POLICY_LOSSES",
    "REWARD_LOSSES",
    "VALUE_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "compute_advantages",
    "contains_eos",
    "entropy_from_logits",
    "eos_penalty",
    "gae_advantages",
    "grpo_advantages",
    "kl_loss",
    "kl_penalty",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mean_entropy",
    "pairwise_reward_loss",
    "policy_loss",
    "reinforce_returns",
    "sft_loss",
    "shape_rewards",
    "token_logprobs",
    "value_loss",
    "whiten_advantages",
    "zero_masked",
]
