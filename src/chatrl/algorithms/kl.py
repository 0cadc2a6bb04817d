"""Per-token KL estimators between the actor pi and the frozen reference pi_ref, from log-probs.

All take logp, ref_logp: [B, R] log pi(a_t|s_t) and log pi_ref(a_t|s_t) of the SAMPLED tokens a_t ~ pi
and return [B, R]. With d = logp - ref_logp (so the ratio pi_ref/pi = exp(-d)), following Schulman,
"Approximating KL Divergence" (2020), each is an estimator of KL(pi || pi_ref) at that token:

  k1  = d                          unbiased, high variance, can be negative
  k2  = 0.5 * d^2                  biased, low variance, >= 0
  k3  = exp(-d) - (-d) - 1         unbiased, low variance, >= 0 ("low_var_kl" in veRL)
  abs = |d|                        >= 0

As a LOSS term (the KL in the loss, differentiated through logp with a ~ pi held fixed), only two of them pull
pi toward pi_ref (test_algorithms_kl_gradients.py checks each on a categorical, exact expectation):

  k2: E_pi[grad k2] = grad KL(pi || pi_ref)      (the reverse KL, the one the rewards' KL penalty estimates)
  k3: E_pi[grad k3] = grad KL(pi_ref || pi)      (the forward KL; GRPO's and veRL's choice)
  k1: E_pi[grad k1] = E_pi[grad log pi] = 0      (no pull at all: only noise)
  abs: E_pi[sign(d) grad log pi]                 (the gradient of no divergence)

so k1 and abs are refused with kl_in=loss (`LOSS_KL_ESTIMATORS`); in the rewards all four are fine.

Padding positions are not special here (the estimators are elementwise); mask the result downstream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from chatrl.algorithms.masked import masked_mean
from chatrl.algorithms.registry import lookup

# exp(20) ~ 5e8: keeps k3 finite in fp32 when the policies have drifted far apart on a token.
_K3_LOG_RATIO_CLAMP = 20.0


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp, [B, R]."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2, [B, R]."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(x) - x - 1 with x = ref_logp - logp (clamped to +-20 for fp32 safety), [B, R].

    >= 0 everywhere (exp(x) >= 1 + x) and exactly 0 where logp == ref_logp.
    """
    x = (ref_logp - logp).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return torch.exp(x) - x - 1


def kl_abs(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """abs = |logp - ref_logp|, [B, R]."""
    return (logp - ref_logp).abs()


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
}


# The estimators whose expected gradient as a loss term is a KL gradient (module docstring), and which one.
LOSS_KL_ESTIMATORS: dict[str, str] = {"k2": "grad KL(pi||ref)", "k3": "grad KL(ref||pi)"}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate `KL_ESTIMATORS[kind](logp, ref_logp)`, [B, R]. ValueError for an unknown kind."""
    return lookup(KL_ESTIMATORS, kind, "KL estimator")(logp, ref_logp)


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: str = "k3",
            agg: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_mean) -> torch.Tensor:
    """KL-in-the-loss term (GRPO style, instead of reward shaping): kl_penalty reduced by `agg`, 0-d.

    Default `agg`: the masked token mean; a trainer passes the policy loss's aggregation so both terms weigh
    tokens alike. logp, ref_logp, mask: [B, R]. Only `LOSS_KL_ESTIMATORS` make sense here: k3 (the usual choice;
    its per-token gradient (1 - pi_ref/pi) grad log pi has expectation grad KL(pi_ref || pi)) or k2 (expectation
    grad KL(pi || pi_ref)); k1's expected gradient is 0 (module docstring).
    """
    return agg(kl_penalty(logp, ref_logp, kind), mask)
