"""Configs of the offline alignment steps: `chatrl dpo` (preference losses), `chatrl kto` (unpaired feedback),
`chatrl ilql` (Q-learning for language) and `chatrl rft` (fine-tuning again from evaluation). They share the
supervised sections (`SupervisedStepConfig`) and add one options section each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from chatrl.algorithms.preference import REFERENCE_FREE
from chatrl.config import SFTOptions, SupervisedStepConfig
from chatrl.config_sources import EnvConfig, RewardSourceConfig, RolloutConfig
from chatrl.configbase import opt, sub
from chatrl.errors import ChatrlError

# ============================================================================ dpo


@dataclass
class ReferenceOptions:
    """The frozen reference model of the steps that score replies against one (dpo, kto): its settings, once."""

    reference: Literal["precompute", "live"] = opt(
        "precompute", "precompute = one pass of the reference over the data, cached under the cache dir keyed by "
                      "model + data + settings, so training holds one model; live = a frozen reference model "
                      "scores every batch")
    reference_model: Optional[str] = opt(None, "reference model folder / hub id / alias; None = the starting model")
    reference_dtype: Literal["auto", "bf16", "fp32"] = opt(
        "auto", "dtype of the frozen reference model; auto = the policy's (model.dtype), so that at step 1 the "
                "policy and its reference score the data alike (an fp32 policy beside a bf16 reference starts "
                "with a margin of bf16 rounding)")


@dataclass
class DPOOptions(ReferenceOptions):
    """The preference loss and its reference model."""

    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = opt(
        "sigmoid", "sigmoid = DPO (with label_smoothing > 0: cDPO), ipo, simpo (reference-free, length-normalised), "
                   "orpo (reference-free, odds ratio added to the SFT loss)")
    beta: float = opt(0.1, "inverse temperature of the implicit reward beta * log(pi / pi_ref) (sigmoid, ipo: the "
                           "IPO tau; simpo: scale of the average log-prob; orpo: weight lambda of the odds-ratio term)")
    label_smoothing: float = opt(0.0, "cDPO: assumed probability that a pair's label is flipped (sigmoid only)")
    ipo_logratio: Literal["token_mean", "sum"] = opt(
        "token_mean", "ipo only: token_mean = each reply's log-ratio divided by its token count, so the target "
                      "1/(2 beta) is per token whatever the length (as TRL, huggingface/trl#1265); sum = sequence "
                      "sums (the target is per pair: a long reply needs less margin per token)")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin gamma")


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
        if d.ipo_logratio != "token_mean" and d.loss != "ipo":
            raise ChatrlError(f"dpo.ipo_logratio applies to dpo.loss=ipo, not {d.loss}")

    def uses_reference(self) -> bool:
        return self.dpo.loss not in REFERENCE_FREE


# ============================================================================ kto


@dataclass
class KTOOptions(ReferenceOptions):
    """The unpaired loss (KTO) and its reference model."""

    loss: Literal["kto"] = opt("kto", "the unpaired loss (algorithms.preference.UNPAIRED_LOSSES): kto = Kahneman-"
                                      "Tversky optimisation (Ethayarajh et al. 2024)")
    beta: float = opt(0.1, "inverse temperature of the implicit reward beta * log(pi / pi_ref) against the "
                           "reference point z0 (the batch's KL estimate)")
    desirable_weight: float = opt(1.0, "lambda_D, the loss weight of each desirable example; with n_D desirable and "
                                       "n_U undesirable examples the paper advises lambda_D n_D / (lambda_U n_U) in "
                                       "[1, 4/3] (e.g. 1 desirable to 9 undesirable: desirable_weight 9 to 12)")
    undesirable_weight: float = opt(1.0, "lambda_U, the loss weight of each undesirable example (see "
                                         "desirable_weight)")


@dataclass
class KTOConfig(SupervisedStepConfig):
    """KTO on unpaired feedback: completions labelled desirable or undesirable (rows {prompt, completion, label}),
    or preference pairs split into one desirable and one undesirable row; no reward model, no sampling."""

    output_dir: str = opt("runs/kto", "where checkpoints, metrics and the final HF model folder go")
    kto: KTOOptions = sub(KTOOptions)

    def check(self) -> None:
        super().check()
        k = self.kto
        if not k.beta > 0:
            raise ChatrlError(f"kto.beta={k.beta}: must be > 0")
        for key in ("desirable_weight", "undesirable_weight"):
            if not 0 < getattr(k, key) < float("inf"):
                raise ChatrlError(f"kto.{key}={getattr(k, key)}: must be a finite number > 0")

    def uses_reference(self) -> bool:
        return True  # r = log pi - log ref: KTO always has a reference


# ============================================================================ ilql


@dataclass
class ILQLOptions:
    """Implicit Language Q-Learning (Snell et al. 2022): Q/V heads trained offline from scored replies."""

    gamma: float = opt(0.99, "discount per token in the Bellman target r_t + gamma * V(s_t+1) (V = 0 after the end)")
    tau: float = opt(0.7, "expectile of V's regression toward min(target Q1, Q2); > 0.5 leans toward the best "
                          "actions the data took (0.5 = plain mean)")
    cql_alpha: float = opt(0.1, "weight of the conservative (CQL) term logsumexp_v Q(s, v) - Q(s, a)")
    awac_weight: float = opt(1.0, "weight of the LM loss (-log pi(a|s) of the data's tokens) kept alongside")
    polyak_alpha: float = opt(0.01, "target heads follow the online Q heads by this share per optimizer step: "
                                    "target <- (1 - alpha) target + alpha online")
    two_q: bool = opt(True, "twin Q heads (the min of the two targets is V's target); false = one Q head")
    beta: float = opt(1.0, "Q-guided decoding strength saved with the heads (logits + beta * (Q - V); 0 = the "
                           "plain LM); chat/serve take --ilql-beta to change it")
    chosen_reward: float = opt(1.0, "reward at the last token of a preference pair's chosen reply")
    rejected_reward: float = opt(-1.0, "reward at the last token of a preference pair's rejected reply")
    reward_key: str = opt("reward", "column of {prompt, response, <reward_key>} rows holding the reply's score "
                                    "(read from the rlhf shard; pairs come from the reward shard)")
    head_seed: int = opt(0, "seed of the heads' initialisation (new heads only; a model folder with "
                            "ilql_heads.safetensors continues from them)")


@dataclass
class ILQLConfig(SupervisedStepConfig):
    """Offline Q-learning for language: preference pairs (chosen / rejected rewards at the last token) and scored
    replies train two Q heads, their Polyak targets and a V head beside the LM, then decoding is Q-guided."""

    output_dir: str = opt("runs/ilql", "where checkpoints, metrics and the final HF model folder (+ heads) go")
    ilql: ILQLOptions = sub(ILQLOptions)

    def check(self) -> None:
        super().check()
        o = self.ilql
        if not 0.0 <= o.gamma <= 1.0:
            raise ChatrlError(f"ilql.gamma={o.gamma}: must be in [0, 1]")
        if not 0.0 < o.tau < 1.0:
            raise ChatrlError(f"ilql.tau={o.tau}: must be in (0, 1)")
        if not 0.0 < o.polyak_alpha <= 1.0:
            raise ChatrlError(f"ilql.polyak_alpha={o.polyak_alpha}: must be in (0, 1] (1 = targets copy the heads)")
        for key in ("beta", "chosen_reward", "rejected_reward", "cql_alpha", "awac_weight"):
            if not abs(getattr(o, key)) < float("inf"):  # also catches NaN, which compares False
                raise ChatrlError(f"ilql.{key}={getattr(o, key)}: must be a finite number")
        if o.cql_alpha < 0 or o.awac_weight < 0:
            raise ChatrlError("ilql.cql_alpha and ilql.awac_weight must be >= 0")
        if self.deepspeed.zero_stage == 3:
            raise ChatrlError("chatrl ilql supports deepspeed.zero_stage 0-2: the Polyak update and Q-guided decoding "
                              "read the heads in place, which ZeRO-3 partitions; use zero_stage=2")


# ============================================================================ rft


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
        if f.judge.base_url is not None:  # the judge is wired into the online steps' rewards only
            raise ChatrlError("reward.judge is not supported by chatrl rft (ppo and grpo only): score with "
                              "reward.model or reward.functions")
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
