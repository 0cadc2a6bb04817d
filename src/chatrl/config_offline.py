"""Configs of the offline alignment steps: `chatrl dpo` (preference losses), `chatrl ilql` (Q-learning for
language) and `chatrl rft` (fine-tuning again from evaluation). They share the supervised sections
(`SupervisedStepConfig`) and add one options section each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from chatrl.algorithms.preference import REFERENCE_FREE
from chatrl.config import SupervisedStepConfig
from chatrl.configbase import opt, sub
from chatrl.errors import ChatrlError

# ============================================================================ dpo


@dataclass
class DPOOptions:
    """The preference loss and its reference model."""

    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = opt(
        "sigmoid", "sigmoid = DPO (with label_smoothing > 0: cDPO), ipo, simpo (reference-free, length-normalised), "
                   "orpo (reference-free, odds ratio added to the SFT loss)")
    beta: float = opt(0.1, "inverse temperature of the implicit reward beta * log(pi / pi_ref) (sigmoid, ipo: the "
                           "IPO tau; simpo: scale of the average log-prob; orpo: weight lambda of the odds-ratio term)")
    label_smoothing: float = opt(0.0, "cDPO: assumed probability that a pair's label is flipped (sigmoid only)")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin gamma")
    reference: Literal["precompute", "live"] = opt(
        "precompute", "precompute = one pass of the reference over the data, cached under the cache dir keyed by "
                      "model + data + settings, so training holds one model; live = a frozen reference model "
                      "scores every batch")
    reference_model: Optional[str] = opt(None, "reference model folder / hub id / alias; None = the starting model")
    reference_dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "dtype of the frozen reference model")


@dataclass
class DPOConfig(SupervisedStepConfig):
    """Direct preference optimisation (and its family) on preference pairs: no reward model, no sampling."""

    output_dir: str = opt("runs/dpo", "where checkpoints, metrics and the final HF model folder go")
    dpo: DPOOptions = sub(DPOOptions)

    def check(self) -> None:
        super().check()
        d = self.dpo
        if d.beta <= 0:
            raise ChatrlError(f"dpo.beta={d.beta}: must be > 0")
        if not 0.0 <= d.label_smoothing < 0.5:
            raise ChatrlError(f"dpo.label_smoothing={d.label_smoothing}: must be in [0, 0.5)")
        if d.label_smoothing > 0 and d.loss != "sigmoid":
            raise ChatrlError(f"dpo.label_smoothing applies to dpo.loss=sigmoid (cDPO), not {d.loss}")

    def uses_reference(self) -> bool:
        return self.dpo.loss not in REFERENCE_FREE


# ============================================================================ ilql
# (ILQLOptions, ILQLConfig: added below this line)


# ============================================================================ rft
# (RFTOptions, RFTConfig: added below this line)
