"""The models of an online RL step and what feeds them: actor (DeepSpeed engine + Hybrid Engine for rollout),
critic (PPO's GAE only: DeepSpeed engine, per-token value head, from the reward model or any model), frozen
reference (a copy of the initial actor; only when the KL is on), frozen teacher (on-policy distillation: grpo.teacher),
frozen reward model (when configured); environment instances, reward functions, ptx batches, EMA."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gymnasium
import torch
from transformers import PreTrainedTokenizerBase

from chatrl.batches import TokenBatch
from chatrl.config_rl import BatchPlan, GRPOConfig, PPOConfig, RLStepConfig
from chatrl.config_sources import ReferenceConfig, TeacherConfig
from chatrl.data.prepare import tokenized_rows
from chatrl.data.tokenize import collate_sft
from chatrl.engine.deepspeed import gathered, initialize
from chatrl.envs.registry import make_env
from chatrl.errors import ChatrlError
from chatrl.judge import Judge
from chatrl.models.loading import (
    check_same_tokenizer,
    load_causal_lm,
    load_frozen_causal_lm,
    load_tokenizer,
    resolve_dtype,
)
from chatrl.models.reward import TokenValueModel, load_reward_model
from chatrl.models.saving import save_hf_folder
from chatrl.reward_functions import RewardFunctions
from chatrl.rollout.hybrid import HybridEngine
from chatrl.steps.common import StepContext, finish_model, model_card


class Offloaded(torch.nn.Module):
    """A frozen model kept in CPU memory and moved to `device` only for the duration of a forward."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model.to("cpu")
        self.device = device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.device.type == "cpu":
            return self.model(*args, **kwargs)
        self.model.to(self.device)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.model.to("cpu")


class EMA:
    """Exponential moving average of the actor's weights (fp32, CPU): ema = decay * ema + (1 - decay) * w."""

    def __init__(self, actor: Any, decay: float, zero3: bool) -> None:
        self.actor, self.decay, self.zero3 = actor, decay, zero3
        params = dict(actor.module.named_parameters())
        with gathered(params.values(), enabled=zero3):
            self.weights = {k: p.detach().float().cpu().clone() for k, p in params.items()}

    def update(self) -> None:
        params = dict(self.actor.module.named_parameters())
        with gathered(params.values(), enabled=self.zero3):
            for name, p in params.items():
                self.weights[name].mul_(self.decay).add_(p.detach().float().cpu(), alpha=1 - self.decay)


@dataclass
class RLModels:
    actor: Any                              # DeepSpeed engine
    critic: Any | None                      # DeepSpeed engine around a TokenValueModel (GAE only)
    reference: torch.nn.Module | None       # None when the KL is off (kl_coef = 0)
    reward_model: torch.nn.Module | None
    hybrid: HybridEngine
    tokenizer: PreTrainedTokenizerBase
    envs: list[gymnasium.Env]               # one instance per rollout row of this process
    functions: RewardFunctions
    ptx_batches: Iterator[TokenBatch] | None
    ema: EMA | None
    teacher: torch.nn.Module | None = None  # on-policy distillation's frozen teacher (grpo.teacher)
    judge: Judge | None = None              # the LLM judge of reward.judge (chatrl.judge)

    def engines(self) -> dict[str, Any]:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def trainable(self) -> list[torch.nn.Module]:
        return [self.actor.module] + ([self.critic.module] if self.critic is not None else [])

    def eval_mode(self) -> None:
        """Scoring runs with dropout off (LoRA dropout included), so the first update's ratio is exactly 1."""
        for module in self.trainable():
            module.eval()

    def train_mode(self) -> None:
        for module in self.trainable():
            module.train()

    def after_optimizer_steps(self) -> None:
        """The actor changed: the Hybrid Engine's inference copy is stale; fold the weights into the EMA."""
        self.hybrid.mark_weights_updated()
        if self.ema is not None:
            self.ema.update()


def _ptx_batches(cfg: PPOConfig, tok: PreTrainedTokenizerBase, dev: torch.device) -> Iterator[TokenBatch]:
    sft_rows = tokenized_rows(cfg.data, tok, "sft", "train")
    mb = cfg.ppo.micro_batch_size
    return (collate_sft(sft_rows[i:i + mb], tok.pad_token_id).to(dev)
            for i in itertools.cycle(range(0, max(len(sft_rows) - mb + 1, 1), mb)))


def build_models(cfg: RLStepConfig, ctx: StepContext, plan: BatchPlan) -> RLModels:
    tok, dev, p = ctx.tokenizer, ctx.device, cfg.policy
    total_steps = p.iterations * p.ppo_epochs * p.mini_batches

    def optim_for(optim):  # the per-process micro-batch and accumulation come from the batch plan
        return dataclasses.replace(optim, micro_batch_size=p.micro_batch_size, grad_accum=plan.grad_accum)

    distill = isinstance(cfg, GRPOConfig) and cfg.grpo.teacher
    if distill:  # before any model loads: a wrong teacher fails in seconds
        check_same_tokenizer(tok, load_tokenizer(cfg.grpo.teacher), "grpo.teacher", cfg.grpo.teacher)
    actor_model = load_causal_lm(cfg.actor, dtype=ctx.weights_dtype, tokenizer=tok)
    actor = initialize(actor_model, optim_for(cfg.actor_optim), cfg.deepspeed, bf16=ctx.bf16,
                       total_steps=total_steps, world_size=ctx.world)
    reference = None
    if cfg.needs_reference():
        reference = frozen_lm(cfg.actor.name_or_path, cfg.reference, tok, dev, allow_pickle=cfg.actor.allow_pickle)
    teacher = None
    if distill:
        teacher = frozen_lm(cfg.grpo.teacher, cfg.teacher, tok, dev, allow_pickle=cfg.teacher.allow_pickle)
    critic = None
    if isinstance(cfg, PPOConfig) and cfg.needs_critic():
        critic_path = cfg.critic.name_or_path or cfg.reward.model
        if not critic_path:
            raise ChatrlError("the critic needs a model: set critic.name_or_path or reward.model")
        lora = cfg.critic.lora if cfg.critic.lora.r > 0 else None
        critic_model = TokenValueModel(load_reward_model(critic_path, dtype=ctx.weights_dtype, lora_cfg=lora,
                                                         tokenizer=tok,
                                                         gradient_checkpointing=cfg.critic.gradient_checkpointing,
                                                         trainable_layers=cfg.critic.trainable_layers,
                                                         allow_pickle=cfg.critic.allow_pickle))
        critic = initialize(critic_model, optim_for(cfg.critic_optim), cfg.deepspeed, bf16=ctx.bf16,
                            total_steps=total_steps, world_size=ctx.world)
    reward_model = None
    if cfg.reward.model:
        reward_model = load_reward_model(cfg.reward.model, dtype=cfg.reward.dtype, tokenizer=tok, trainable=False)
        reward_model = Offloaded(reward_model, dev) if cfg.reward.offload else reward_model.to(dev)
    if p.disable_dropout:
        for model in (actor_model, critic.module if critic is not None else None):
            for module in model.modules() if model is not None else ():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
    hybrid = HybridEngine(actor, inference_dtype=resolve_dtype(cfg.rollout.inference_dtype),
                          release_after_rollout=cfg.rollout.release_memory,
                          zero3=cfg.deepspeed.zero_stage == 3, compile_decode=cfg.rollout.compile)
    envs = [make_env(cfg.env.name, cfg.env.kwargs, data=cfg.data) for _ in range(plan.per_process)]
    ptx = _ptx_batches(cfg, tok, dev) if isinstance(cfg, PPOConfig) and cfg.ppo.ptx_coef > 0 else None
    ema = None
    if isinstance(cfg, PPOConfig) and cfg.ppo.ema_decay > 0:
        ema = EMA(actor, cfg.ppo.ema_decay, zero3=cfg.deepspeed.zero_stage == 3)
    return RLModels(actor=actor, critic=critic, reference=reference, reward_model=reward_model, hybrid=hybrid,
                    tokenizer=tok, envs=envs,
                    functions=RewardFunctions(cfg.reward.functions, cfg.reward.function_weights),
                    ptx_batches=ptx, ema=ema, teacher=teacher,
                    judge=Judge(cfg.reward.judge, cfg.output_dir) if cfg.reward.judge.base_url else None)


def frozen_lm(path: str, section: ReferenceConfig | TeacherConfig, tok: PreTrainedTokenizerBase, dev: torch.device,
              allow_pickle: bool) -> torch.nn.Module:
    """A frozen causal LM that scores log-probs (the reference, the teacher), in `section.dtype`, on `dev` or
    offloaded to CPU between forwards (`section.offload`)."""
    model = load_frozen_causal_lm(path, dtype=section.dtype, tokenizer=tok, allow_pickle=allow_pickle)
    return Offloaded(model, dev) if section.offload else model.to(dev)


def save_models(m: RLModels, ctx: StepContext, suffix: str = "") -> None:
    """Actor (chat-ready, LoRA merged), critic and EMA actor as plain HF folders, each with its model card."""
    cfg = ctx.config
    data = rl_data_paths(cfg, m.envs)
    finish_model(ctx, m.actor, merge_lora=True, dir_name=f"actor{suffix}", data=data)
    if m.critic is not None:
        finish_model(ctx, m.critic, merge_lora=True, dir_name=f"critic{suffix}", data=data,
                     base=cfg.critic.name_or_path or cfg.reward.model)
    if m.ema is not None and ctx.rank == 0:
        out = ctx.output_dir / f"actor_ema{suffix}"
        save_hf_folder(m.actor.module, ctx.tokenizer, out, merge_lora=True, state_dict=m.ema.weights,
                       card=model_card(ctx, out, m.actor.module, data=data))


def rl_data_paths(cfg: RLStepConfig, envs: list[gymnasium.Env]) -> list[str]:
    """The data an RL step trained on, for its model cards: the prompts of the `chat` environment or of the ptx
    loss (data.paths), and a file an environment reads its tasks from (its `path`, e.g. `math`'s GSM8K)."""
    paths = []
    if cfg.env.name == "chat" or (isinstance(cfg, PPOConfig) and cfg.ppo.ptx_coef > 0):
        paths += list(cfg.data.paths)
    env_path = getattr(envs[0].unwrapped, "path", None) if envs else None
    if isinstance(env_path, str):
        paths.append(env_path)
    return paths
