"""Preference losses of the DPO family as pure functions of per-sequence log-probabilities.

Inputs are [B] tensors, one entry per preference pair: `chosen` / `rejected` are log pi(y | x) SUMMED over the
reply's tokens, `chosen_len` / `rejected_len` the reply's token counts, `ref_*` the same sums under the frozen
reference (None for the reference-free losses). Every loss returns (mean over pairs, stats of detached 0-d
tensors) with the implicit rewards r_c, r_r whose difference the loss pushes up.

  h      = (chosen - ref_chosen) - (rejected - ref_rejected)          (the DPO log-ratio margin)
  sigmoid  L = -(1 - e) log sigma(beta h) - e log sigma(-beta h)            r = beta (logp - ref_logp)
           (Rafailov et al. 2023; e = label_smoothing > 0 is cDPO: the label is wrong with probability e)
  ipo      L = (h - 1 / (2 beta))^2                                         r = beta (logp - ref_logp)
           (Azar et al. 2023, eq. 17, with beta as the paper's tau). ipo_logratio=token_mean (default) divides
           each reply's log-ratio by its token count before taking h (and r), as TRL does after asking the IPO
           authors (huggingface/trl#1265), so the target 1 / (2 beta) is per token whatever the length;
           ipo_logratio=sum keeps sequence sums (beta 0.1 then asks 5 nats per pair: 0.5 per token at 10
           tokens, 0.05 at 100)
  simpo    L = -log sigma(beta (chosen / |y_c| - rejected / |y_r|) - gamma)  r = beta logp / |y|
           (Meng et al. 2024: reference-free, length-normalised, target margin gamma)
  orpo     L = -chosen / |y_c| - beta log sigma(log odds(y_c) - log odds(y_r)),
           log odds(y) = a - log(1 - exp(a)) with a = logp / |y|               r = beta a
           (Hong et al. 2024: the SFT loss on the chosen reply plus beta (their lambda) times the odds-ratio term)

Unpaired losses (`UNPAIRED_LOSSES`) take one labelled completion per example instead of a pair (`UnpairedLogps`):

  kto      r = logp - ref_logp (summed over the reply's tokens); z0 = max(0, mean(kl_logp - ref_kl_logp)), detached
           L = lambda_D (1 - sigma(beta (r - z0)))   for a desirable completion
           L = lambda_U (1 - sigma(beta (z0 - r)))   for an undesirable one;    mean over the batch's examples
           (Ethayarajh et al. 2024, eq. 8; the reference point z0 is the batch's KL estimate from MISMATCHED
           pairs: each example's prompt with another example's completion, so z0 measures how far the policy
           drifted in general rather than on this completion; no gradient flows through it, as in the paper and
           TRL). The mean over all examples (not per class) is TRL's normalisation: lambda_D, lambda_U weigh a
           class's examples, so with n_D desirable and n_U undesirable examples the paper advises
           lambda_D n_D / (lambda_U n_U) in [1, 4/3].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Stats = dict[str, torch.Tensor]


@dataclass
class PairLogps:
    """Summed reply log-probs of a batch of pairs, [B] each (ref_* None without a reference)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def log_ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this preference loss needs the reference model's log-probs (ref_chosen/ref_rejected)")
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probs logp / |y| (SimPO, ORPO)."""
        return self.chosen / self.chosen_len.clamp(min=1), self.rejected / self.rejected_len.clamp(min=1)


def _stats(loss: torch.Tensor, r_c: torch.Tensor, r_r: torch.Tensor, lp: PairLogps) -> Stats:
    d = lambda x: x.detach().float().mean()  # noqa: E731 - one-liner reads best here
    return {"loss": loss.detach(), "rewards/chosen": d(r_c), "rewards/rejected": d(r_r),
            "rewards/accuracy": d((r_c > r_r).float()), "rewards/margin": d(r_c - r_r),
            "logps/chosen": d(lp.chosen), "logps/rejected": d(lp.rejected)}


def sigmoid_loss(lp: PairLogps, beta: float, label_smoothing: float = 0.0, **_: float) -> tuple[torch.Tensor, Stats]:
    """DPO (cDPO with label_smoothing > 0); formula in the module docstring."""
    ratio_c, ratio_r = lp.log_ratios()
    z = beta * (ratio_c - ratio_r)
    loss = (-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()
    return loss, _stats(loss, beta * ratio_c, beta * ratio_r, lp)


IPO_LOGRATIOS = ("token_mean", "sum")


def ipo_loss(lp: PairLogps, beta: float, ipo_logratio: str = "token_mean", **_: float) -> tuple[torch.Tensor, Stats]:
    """IPO: squared distance of the log-ratio margin to 1 / (2 beta), on per-token (default) or summed log-ratios."""
    ratio_c, ratio_r = lp.log_ratios()
    if ipo_logratio == "token_mean":
        ratio_c, ratio_r = ratio_c / lp.chosen_len.clamp(min=1), ratio_r / lp.rejected_len.clamp(min=1)
    elif ipo_logratio != "sum":
        raise ValueError(f"ipo_logratio={ipo_logratio!r}: choose one of {IPO_LOGRATIOS}")
    loss = ((ratio_c - ratio_r) - 1 / (2 * beta)).pow(2).mean()
    return loss, _stats(loss, beta * ratio_c, beta * ratio_r, lp)


def simpo_loss(lp: PairLogps, beta: float, simpo_gamma: float = 0.5, **_: float) -> tuple[torch.Tensor, Stats]:
    """SimPO: reference-free margin of length-normalised log-probs against a target gamma."""
    mean_c, mean_r = lp.means()
    r_c, r_r = beta * mean_c, beta * mean_r
    loss = -F.logsigmoid(r_c - r_r - simpo_gamma).mean()
    return loss, _stats(loss, r_c, r_r, lp)


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean_logp) < 1, computed as a - log1p(-exp(a)) (stable for a near 0)."""
    a = mean_logp.clamp(max=-1e-6)  # p = 1 exactly would make the odds infinite
    return a - torch.log1p(-torch.exp(a))


def orpo_loss(lp: PairLogps, beta: float, **_: float) -> tuple[torch.Tensor, Stats]:
    """ORPO: NLL of the chosen reply (token mean) + beta * odds-ratio loss."""
    mean_c, mean_r = lp.means()
    odds_ratio_term = -F.logsigmoid(_log_odds(mean_c) - _log_odds(mean_r))
    loss = (-mean_c + beta * odds_ratio_term).mean()
    stats = _stats(loss, beta * mean_c, beta * mean_r, lp)
    stats["nll_chosen"] = (-mean_c).detach().mean()
    return loss, stats


@dataclass
class UnpairedLogps:
    """Summed completion log-probs of a batch of B unpaired examples, [B] each: the policy's and the reference's
    of each example (`logps`, `ref_logps`) and of its mismatched KL row (`kl_logps`, `ref_kl_logps`: its prompt
    with another example's completion); `desirable` [B] bool labels."""

    logps: torch.Tensor
    ref_logps: torch.Tensor
    kl_logps: torch.Tensor
    ref_kl_logps: torch.Tensor
    desirable: torch.Tensor

    def log_ratios(self) -> torch.Tensor:
        """r = log pi(y|x) - log ref(y|x) of each example: the implicit reward before beta."""
        return self.logps - self.ref_logps

    def reference_point(self) -> torch.Tensor:
        """z0 = max(0, mean KL estimate over the mismatched rows), detached (a constant of the loss)."""
        return (self.kl_logps - self.ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(lp: UnpairedLogps, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             **_: float) -> tuple[torch.Tensor, Stats]:
    """KTO; formula in the module docstring. Stats of a class the batch lacks are left out (not reported as 0)."""
    r, z0, good = lp.log_ratios(), lp.reference_point(), lp.desirable.bool()
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    loss = losses.mean()
    stats: Stats = {"loss": loss.detach(), "kl": z0}
    for name, rows in (("desirable", good), ("undesirable", ~good)):
        if rows.any():
            stats[f"rewards/{name}"] = (beta * r[rows]).detach().float().mean()
            stats[f"logps/{name}"] = lp.logps[rows].detach().float().mean()
    return loss, stats


PreferenceLoss = Callable[..., tuple[torch.Tensor, Stats]]
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": sigmoid_loss, "ipo": ipo_loss, "simpo": simpo_loss, "orpo": orpo_loss,
}
REFERENCE_FREE = frozenset({"simpo", "orpo"})
UNPAIRED_LOSSES: dict[str, PreferenceLoss] = {"kto": kto_loss}
