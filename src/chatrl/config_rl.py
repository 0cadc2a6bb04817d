"""Configs of the online RL steps (`chatrl ppo`, `chatrl grpo`): the sections they share are declared once in
`RLStepConfig`; each step adds its own options section. The batch arithmetic lives in `RLStepConfig.batch_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from chatrl.algorithms.advantages import ADVANTAGE_ESTIMATORS
from chatrl.algorithms.kl import KL_ESTIMATORS, LOSS_KL_ESTIMATORS
from chatrl.algorithms.losses import LOSS_AGGREGATIONS
from chatrl.algorithms.policy_losses import POLICY_LOSSES, SAPO_TAU_NEG, SAPO_TAU_POS
from chatrl.config import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    check_common,
)
from chatrl.config_sources import (
    EnvConfig,
    ReferenceConfig,
    RewardSourceConfig,
    RolloutConfig,
    TeacherConfig,
)
from chatrl.configbase import opt, sub
from chatrl.errors import ChatrlError
from chatrl.tools.toolbox import check_tool_settings

# The options' choices are the registries' names (chatrl.algorithms), so a new estimator or aggregation is one
# function and one registry entry: the config, its check and --help pick it up.
ADVANTAGES = tuple(ADVANTAGE_ESTIMATORS)
CRITIC_FREE_ADVANTAGES = tuple(k for k, e in ADVANTAGE_ESTIMATORS.items() if not e.needs_critic)  # GRPO's


@dataclass
class PolicyOptions:
    """Hyper-parameters of the policy update shared by PPO and GRPO (the math lives in chatrl.algorithms)."""

    iterations: int = opt(20, "iterations (rollout + update)")
    advantage: Literal[ADVANTAGES] = opt(
        "gae", "advantage estimator (all but gae skip the critic)")
    ppo_epochs: int = opt(1, "passes over each rollout")
    mini_batches: int = opt(1, "mini-batches per rollout (one optimizer step each, per epoch)")
    micro_batch_size: int = opt(4, "sequences per process per forward; grad accumulation is derived")
    policy_loss: Literal[tuple(POLICY_LOSSES)] = opt(
        "ppo_clip", "ppo_clip: max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high)); cispo (MiniMax-M1): "
                    "-sg(clip(r, 1 - clip_eps, 1 + clip_eps_high)) A log pi, no token dropped from the gradient; "
                    "sapo (Qwen): -(4 / tau) sigmoid(tau (r - 1)) A, a soft gate instead of the clip (tau = "
                    "sapo_tau_pos where A > 0, else sapo_tau_neg). All take importance_sampling_level")
    sapo_tau_pos: float = opt(SAPO_TAU_POS, "SAPO gate temperature for tokens with A > 0 (the paper's 1.0)")
    sapo_tau_neg: float = opt(SAPO_TAU_NEG, "SAPO gate temperature for tokens with A <= 0 (the paper's 1.05: "
                                            "negative updates are gated off faster)")
    clip_eps: float = opt(0.2, "policy ratio clip epsilon (the lower one when clip_eps_high is set)")
    clip_eps_high: Optional[float] = opt(None, "upper ratio clip (DAPO clip-higher, e.g. 0.28); None = clip_eps")
    importance_sampling_level: Literal["token", "sequence"] = opt(
        "token", "token: PPO's per-token ratio; sequence: GSPO's length-normalised sequence ratio (use small clip "
                 "eps, e.g. 3e-4 / 4e-4; loss_agg=auto then weighs each sequence once, as the paper does)")
    loss_agg: Literal[("auto", *LOSS_AGGREGATIONS)] = opt(
        "auto", "token_mean (DAPO), seq_mean_token_mean (original GRPO), seq_mean_token_sum_norm (Dr. GRPO: token "
                "sums / a constant max length); auto = seq_mean_token_mean with importance_sampling_level=sequence "
                "(GSPO's objective: one term per sequence), else token_mean. The value loss, the entropy bonus and "
                "a KL in the loss reduce the same way")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient")
    gamma: float = opt(1.0, "discount per token (GAE, REINFORCE++ returns)")
    kl_estimator: Literal[tuple(KL_ESTIMATORS)] = opt(
        "k1", "per-token KL estimator; with kl_in=loss only k2 (gradient of KL(pi||ref)) or k3 (gradient of "
              "KL(ref||pi)): k1's expected gradient is 0 and abs's is no KL's")
    kl_coef: float = opt(0.05, "KL coefficient beta (0 = no KL: the reference model is not loaded)")
    kl_in: Literal["reward", "loss"] = opt("reward", "where the KL goes: -beta * kl_t in the token rewards, or "
                                                     "beta * agg(kl_t) added to the policy loss (GRPO; k2 or k3)")
    overlong_buffer: int = opt(0, "DAPO soft overlong penalty: the last N tokens before max_new_tokens ramp the "
                                  "penalty up to overlong_penalty (0 = off)")
    overlong_penalty: float = opt(1.0, "the overlong penalty at max_new_tokens")
    mask_truncated: bool = opt(False, "leave responses cut at max_new_tokens (no EOS) out of the loss (DAPO)")
    dynamic_sampling: bool = opt(False, "DAPO dynamic sampling: drop groups whose rewards are all equal and sample "
                                        "more prompts until the rollout is full")
    max_sampling_rounds: int = opt(4, "cap of rollout rounds per iteration for dynamic sampling; a batch still not "
                                      "full is filled with dropped groups (advantage 0), counted in the logs")
    save_every: int = opt(0, "save the actor's HF folder every N iterations (0 = end only)")
    disable_dropout: bool = opt(True, "set every dropout of the trained models to 0 (as TRL does): the first "
                                      "update's ratio is then exactly 1 and scoring/training see the same model")

    @property
    def aggregation(self) -> str:
        """loss_agg with auto resolved. GSPO's objective is (1/G) sum_i min(s_i A_i, clip(s_i) A_i): under token_mean
        a sequence would weigh |y_i| / sum |y| instead of 1/G."""
        if self.loss_agg != "auto":
            return self.loss_agg
        return "seq_mean_token_mean" if self.importance_sampling_level == "sequence" else "token_mean"


@dataclass
class PPOOptions(PolicyOptions):
    """PPO: the policy options plus the critic's, the adaptive KL controller, EMA and the ptx loss."""

    advantage: Literal[ADVANTAGES] = opt(
        "gae", "advantage estimator (all but gae skip the critic)")
    value_clip_eps: Optional[float] = opt(0.2, "value clip epsilon (None = unclipped)")
    lam: float = opt(0.95, "GAE lambda")
    whiten_advantages: bool = opt(True, "normalise GAE advantages over the rollout of all ranks (group-relative and "
                                        "REINFORCE++ advantages are already normalised: never whitened again)")
    kl_target: Optional[float] = opt(None, "adaptive KL: target KL per sequence (None = fixed beta)")
    kl_horizon: float = opt(10000.0, "adaptive KL horizon in samples")
    ema_decay: float = opt(0.0, "EMA of actor weights (0 = off, e.g. 0.992)")
    ptx_coef: float = opt(0.0, "weight of an LM loss on SFT data mixed into the actor loss (0 = off)")


@dataclass
class GRPOOptions(PolicyOptions):
    """GRPO family: critic-free, group-relative advantages over G samples per prompt."""

    advantage: Literal[CRITIC_FREE_ADVANTAGES] = opt(
        "grpo", "grpo (group mean/std), dr_grpo (no std), rloo (leave-one-out), reinforce_pp (whitened returns)")
    kl_estimator: Literal[tuple(KL_ESTIMATORS)] = opt(
        "k3", "per-token KL estimator (k3 = low-variance KL); in the loss only k3 (gradient of KL(ref||pi)) or k2 "
              "(gradient of KL(pi||ref)): k1's expected gradient is 0")
    kl_coef: float = opt(0.0, "KL coefficient beta (0 = no KL: the reference model is not loaded)")
    kl_in: Literal["reward", "loss"] = opt("loss", "where the KL goes: the policy loss (GRPO; k2 or k3) or the "
                                                   "rewards")
    teacher: Optional[str] = opt(None, "on-policy distillation: a causal LM folder or alias with the actor's "
                                       "tokenizer, frozen (the `teacher` section: dtype, offload); each generated "
                                       "token's advantage is log p_teacher - log p_student (None = off)")
    teacher_weight: float = opt(1.0, "with a teacher: A = w * (log p_teacher - log p_student) + (1 - w) * the "
                                     "environment's advantage (`advantage`); 1 = pure distillation, the reward "
                                     "is not used")


@dataclass
class BatchPlan:
    """The batch arithmetic of one iteration (all counts are sequences)."""

    rollout: int      # prompts_per_rollout * samples_per_prompt, all processes together
    per_process: int  # rollout / world
    mini_batch: int   # rollout / mini_batches: one optimizer step
    grad_accum: int   # mini_batch / (micro_batch_size * world): micro-batches per step per process
    world: int


@dataclass
class RLStepConfig:
    """Sections shared by the online RL steps."""

    output_dir: str = opt("runs/rl", "where checkpoints, metrics and the final actor folder go")
    seed: int = opt(42, "seed for sampling, shuffling and dropout")
    actor: ModelConfig = sub(ModelConfig)
    reward: RewardSourceConfig = sub(RewardSourceConfig)
    reference: ReferenceConfig = sub(ReferenceConfig)
    data: DataConfig = sub(DataConfig)
    env: EnvConfig = sub(EnvConfig)
    rollout: RolloutConfig = sub(RolloutConfig)
    actor_optim: OptimConfig = sub(OptimConfig)
    deepspeed: DeepSpeedConfig = sub(DeepSpeedConfig)
    logging: LoggingConfig = sub(LoggingConfig)
    checkpoint: CheckpointConfig = sub(CheckpointConfig)

    @property
    def policy(self) -> PolicyOptions:
        """The step's options section (ppo or grpo)."""
        raise NotImplementedError

    def batch_plan(self, world: int) -> BatchPlan:
        """The batch arithmetic in one place:

        rollout      = prompts_per_rollout * samples_per_prompt          (all processes together)
        per_process  = rollout / world                                    (generated by each process)
        mini_batch   = rollout / mini_batches                             (one optimizer step)
        grad_accum   = mini_batch / (micro_batch_size * world)            (micro-batches per step per process)
        """
        r, p = self.rollout, self.policy
        rollout = r.prompts_per_rollout * r.samples_per_prompt
        problems = []
        if r.prompts_per_rollout % world:
            problems.append(f"rollout.prompts_per_rollout={r.prompts_per_rollout} is not divisible by {world} processes")
        if rollout % p.mini_batches:
            problems.append(f"rollout size {rollout} (= {r.prompts_per_rollout} prompts x {r.samples_per_prompt} "
                            f"samples) is not divisible by mini_batches={p.mini_batches}")
        mini = rollout // max(p.mini_batches, 1)
        if mini % (p.micro_batch_size * world) or mini == 0:
            problems.append(f"mini-batch {mini} (= rollout {rollout} / {p.mini_batches} mini-batches) is not a "
                            f"multiple of micro_batch_size {p.micro_batch_size} x {world} processes")
        if problems:
            raise ChatrlError("impossible batch sizes: " + "; ".join(problems) +
                              ". Adjust rollout.prompts_per_rollout, mini_batches or micro_batch_size.")
        return BatchPlan(rollout=rollout, per_process=rollout // world, mini_batch=mini,
                         grad_accum=mini // (p.micro_batch_size * world), world=world)

    def needs_reference(self) -> bool:
        return self.policy.kl_coef > 0

    def uses_env_advantage(self) -> bool:
        """Do the advantages read the reward (False only for pure distillation: GRPOConfig)?"""
        return True

    def check(self) -> None:
        check_common(self.actor, self.deepspeed, self.actor_optim)
        p, r = self.policy, self.rollout
        if self.reward.function_weights and len(self.reward.function_weights) != len(self.reward.functions):
            raise ChatrlError(f"reward.function_weights has {len(self.reward.function_weights)} entries but "
                              f"reward.functions has {len(self.reward.functions)}; give one weight per function")
        self.reward.judge.check(r.samples_per_prompt)
        estimator = ADVANTAGE_ESTIMATORS[p.advantage]
        if self.uses_env_advantage() and r.samples_per_prompt < estimator.min_group_size:
            raise ChatrlError(f"advantage={p.advantage} needs rollout.samples_per_prompt >= "
                              f"{estimator.min_group_size} (groups per prompt)")
        if p.dynamic_sampling and r.samples_per_prompt < 2:
            raise ChatrlError("dynamic_sampling needs rollout.samples_per_prompt >= 2 (it drops tied groups)")
        if r.min_new_tokens > r.max_new_tokens:
            raise ChatrlError("rollout.min_new_tokens must be <= rollout.max_new_tokens")
        if not r.is_cap > 0:
            raise ChatrlError(f"rollout.is_cap={r.is_cap} must be > 0 (the truncated importance weight's cap)")
        if r.is_low is not None and not 0 < r.is_low <= 1 <= r.is_cap:
            raise ChatrlError(f"rollout.is_low={r.is_low} and is_cap={r.is_cap}: the kept band of "
                              "rollout.is_correction=mis needs 0 < is_low <= 1 <= is_cap")
        if not (p.sapo_tau_pos > 0 and p.sapo_tau_neg > 0):
            raise ChatrlError(f"sapo_tau_pos={p.sapo_tau_pos} and sapo_tau_neg={p.sapo_tau_neg} must be > 0")
        if p.overlong_buffer < 0 or p.overlong_buffer > r.max_new_tokens:
            raise ChatrlError(f"overlong_buffer={p.overlong_buffer} must be in 0..rollout.max_new_tokens")
        if self.env.max_turns < 1 or self.env.max_context <= r.max_new_tokens:
            raise ChatrlError("env.max_turns must be >= 1 and env.max_context > rollout.max_new_tokens")
        check_tool_settings(self.env)
        if p.kl_in == "loss" and p.kl_coef > 0 and p.kl_estimator not in LOSS_KL_ESTIMATORS:
            section = "ppo" if isinstance(p, PPOOptions) else "grpo"
            works = " or ".join(f"{k} ({v})" for k, v in LOSS_KL_ESTIMATORS.items())
            why = "is 0" if p.kl_estimator == "k1" else "is the gradient of no KL"
            raise ChatrlError(f"{section}.kl_estimator={p.kl_estimator} with {section}.kl_in=loss: its expected "
                              f"gradient {why}, so the KL would not be controlled; set {section}.kl_estimator to "
                              f"{works}")
        assert p.aggregation in LOSS_AGGREGATIONS
        self.batch_plan(1)


@dataclass
class PPOConfig(RLStepConfig):
    """Step 3: RLHF with PPO. Actor from the SFT model, critic from the reward model, frozen reference."""

    output_dir: str = opt("runs/ppo", "where checkpoints, metrics and the final actor/critic folders go")
    critic: ModelConfig = sub(ModelConfig, name_or_path="")  # "" = start from reward.model
    critic_optim: OptimConfig = sub(OptimConfig)
    ppo: PPOOptions = sub(PPOOptions)

    @property
    def policy(self) -> PPOOptions:
        return self.ppo

    def needs_critic(self) -> bool:
        return ADVANTAGE_ESTIMATORS[self.ppo.advantage].needs_critic

    def check(self) -> None:
        super().check()
        if self.needs_critic():
            check_common(self.critic, self.deepspeed, self.critic_optim)
        if not self.reward.any_source() and self.env.name == "chat":
            raise ChatrlError("PPO needs a reward: set reward.model=PATH, reward.functions=[pkg.mod:fn] and/or "
                              "reward.judge.base_url=URL, or an environment that gives rewards (env.name)")


@dataclass
class GRPOConfig(RLStepConfig):
    """Critic-free RL from checkable rewards (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO, GSPO) in an environment."""

    output_dir: str = opt("runs/grpo", "where checkpoints, metrics and the final actor folder go")
    rollout: RolloutConfig = sub(RolloutConfig, samples_per_prompt=4)  # groups of G = 4 by default
    grpo: GRPOOptions = sub(GRPOOptions)
    teacher: TeacherConfig = sub(TeacherConfig)

    @property
    def policy(self) -> GRPOOptions:
        return self.grpo

    def uses_env_advantage(self) -> bool:
        return self.grpo.teacher is None or self.grpo.teacher_weight < 1.0

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.grpo.teacher_weight <= 1.0:
            raise ChatrlError(f"grpo.teacher_weight={self.grpo.teacher_weight} must be in [0, 1] (1 = pure "
                              "distillation, 0 = the environment's advantage only)")
        if self.grpo.teacher == "":
            raise ChatrlError("grpo.teacher is empty: set a model folder or alias, or null for no teacher")
        if not self.uses_env_advantage():
            return  # pure distillation: the teacher is the only signal, no reward needed
        if not self.reward.any_source() and self.env.name == "chat":
            raise ChatrlError("env.name=chat gives no reward itself: set reward.model=PATH, reward.functions=[...] "
                              "and/or reward.judge.base_url=URL, or choose an environment (env.name=arithmetic)")


@dataclass
class DistillConfig(GRPOConfig):
    """On-policy distillation: GRPO's loop with a teacher (grpo.teacher, required): the student samples, the teacher
    scores its tokens, A_t = log p_teacher - log p_student. Defaults: one sample per prompt, no KL, pure
    distillation (grpo.teacher_weight = 1)."""

    output_dir: str = opt("runs/distill", "where checkpoints, metrics and the final actor folder go")
    rollout: RolloutConfig = sub(RolloutConfig, samples_per_prompt=1)  # per-token advantages need no group

    def check(self) -> None:
        if not self.grpo.teacher:
            raise ChatrlError("chatrl distill needs a teacher: set grpo.teacher to a model folder or alias with the "
                              "actor's tokenizer")
        super().check()
