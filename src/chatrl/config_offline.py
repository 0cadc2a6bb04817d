"""Configs of the offline alignment steps: `chatrl dpo` (preference losses), `chatrl ilql` (Q-learning for
language) and `chatrl rft` (fine-tuning again from evaluation). They share the supervised sections
(`SupervisedStepConfig`) and add one options section each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from chatrl.algorithms.preference import REFERENCE_FREE
from chatrl.config import SFTOptions, SupervisedStepConfig
from chatrl.config_rl import EnvConfig, RewardSourceConfig, RolloutConfig
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


@dataclass
class RFTOptions:
    """Fine-tuning from evaluation (rejection sampling / best-of-n): each round samples rollout.samples_per_prompt
    replies to rollout.prompts_per_rollout prompts with the current model, scores them, keeps the best and runs
    SFT on them; the next round samples from that model."""

    rounds: int = opt(1, "rounds of sample -> score -> keep -> SFT; round k+1 samples from round k's model")
    keep: Literal["best", "threshold"] = opt(
        "best", "best = the top-scored sample of each prompt (only if it reaches `threshold`, when set); "
                "threshold = every sample whose score is >= `threshold`")
    threshold: Optional[float] = opt(None, "score a kept sample must reach (needed by keep=threshold)")
    batch_size: int = opt(64, "episodes decoded together in one Hybrid Engine batch (sampling and evaluation)")
    eval_prompts: int = opt(32, "held-out prompts / tasks (the environment's eval split, tasks 0..n-1) scored with "
                                "the starting model and after every round (0 = no evaluation)")
    eval_samples: int = opt(0, "0 = one greedy reply per held-out prompt; k > 0 = k replies sampled at "
                               "rollout.temperature (a smoother mean for small models)")
    eval_base: bool = opt(True, "also score the starting model on the held-out prompts (round 0 of the table)")


@dataclass
class RFTConfig(SupervisedStepConfig):
    """`chatrl rft`: sample n replies per prompt, score them (reward model, reward functions or an environment),
    keep the best, SFT on them; repeat. `optim`, `sft` and `data.max_length` drive each round's SFT (on the kept
    samples); `data` also feeds the prompts of env.name=chat."""

    output_dir: str = opt("runs/rft", "where each round's samples, kept dataset, SFT model and the summary go")
    reward: RewardSourceConfig = sub(RewardSourceConfig)
    env: EnvConfig = sub(EnvConfig)
    rollout: RolloutConfig = sub(RolloutConfig, prompts_per_rollout=64, samples_per_prompt=4)  # n = 4
    sft: SFTOptions = sub(SFTOptions)
    rft: RFTOptions = sub(RFTOptions)

    def check(self) -> None:
        super().check()
        f, r, x = self.reward, self.rollout, self.rft
        if f.function_weights and len(f.function_weights) != len(f.functions):
            raise ChatrlError(f"reward.function_weights has {len(f.function_weights)} entries but reward.functions "
                              f"has {len(f.functions)}; give one weight per function")
        if f.model is None and not f.functions and self.env.name == "chat":
            raise ChatrlError("env.name=chat gives no reward itself: set reward.model=PATH and/or "
                              "reward.functions=[...], or choose an environment (env.name=arithmetic)")
        if x.rounds < 1 or r.prompts_per_rollout < 1 or r.samples_per_prompt < 1 or x.batch_size < 1:
            raise ChatrlError("rft.rounds, rollout.prompts_per_rollout, rollout.samples_per_prompt and "
                              "rft.batch_size must be >= 1")
        if x.keep == "threshold" and x.threshold is None:
            raise ChatrlError("rft.keep=threshold needs rft.threshold=<score>")
        if x.eval_prompts < 0 or x.eval_samples < 0:
            raise ChatrlError("rft.eval_prompts and rft.eval_samples must be >= 0")
        if r.min_new_tokens > r.max_new_tokens:
            raise ChatrlError("rollout.min_new_tokens must be <= rollout.max_new_tokens")
        if self.env.max_turns < 1 or self.env.max_context <= r.max_new_tokens:
            raise ChatrlError("env.max_turns must be >= 1 and env.max_context > rollout.max_new_tokens")
        if not 0 < self.data.eval_fraction < 1:  # each round's SFT holds out part of the kept samples
            raise ChatrlError(f"data.eval_fraction={self.data.eval_fraction}: rft needs a value in (0, 1), the "
                              "share of kept samples each round's SFT holds out for its eval loss")
