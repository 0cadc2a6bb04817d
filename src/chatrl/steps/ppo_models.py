"""The four PPO models and what feeds them: actor (DeepSpeed engine + Hybrid Engine for rollout), critic
(DeepSpeed engine, per-token value head, from the reward model or any model), frozen reference (a copy
of the initial actor) and frozen reward model; prompt rows, ptx batches, reward functions, EMA."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from chatrl.batches import PromptBatch, TokenBatch
from chatrl.config import PPOConfig
from chatrl.engine.deepspeed import initialize
from chatrl.errors import ChatrlError
from chatrl.steps.common import StepContext, finish_model
from chatrl.steps.ppo_experience import call_reward_function, load_reward_function


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


@dataclass
class PPOModels:
    actor: Any                     # DeepSpeed engine
    critic: Any | None             # DeepSpeed engine around a TokenValueModel (None for critic-free estimators)
    reference: torch.nn.Module
    reward_model: torch.nn.Module | None
    hybrid: Any                    # chatrl.rollout.hybrid.HybridEngine around the actor
    tokenizer: Any
    prompts: list[dict]
    collate_prompts: Callable[[list[dict]], PromptBatch]
    function_scores: Callable[[list[Any], list[str], list[dict], list[list[int]]], torch.Tensor]
    ptx_batches: Iterator[TokenBatch] | None
    ema: dict[str, torch.Tensor] | None
    ema_decay: float

    def engines(self) -> dict[str, Any]:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def after_optimizer_steps(self) -> None:
        """The actor changed: the Hybrid Engine's inference copy is stale; fold the weights into the EMA."""
        self.hybrid.mark_weights_updated()
        if self.ema is None:
            return
        import deepspeed

        params = dict(self.actor.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=self.actor.zero_optimization_stage() == 3):
            for name, p in params.items():
                self.ema[name].mul_(self.ema_decay).add_(p.detach().float().cpu(), alpha=1 - self.ema_decay)


def _function_scorer(cfg: PPOConfig) -> Callable[..., torch.Tensor]:
    fns = [(spec, load_reward_function(spec)) for spec in cfg.reward.functions]
    weights = cfg.reward.function_weights or [1.0] * len(fns)

    def score(prompts: list[Any], responses: list[str], rows: list[dict],
              response_ids: list[list[int]]) -> torch.Tensor:
        total = torch.zeros(len(responses))
        columns = {"reference": [row.get("reference") for row in rows], "response_ids": response_ids}
        for key in {k for row in rows for k in row.get("extra", {})}:
            columns[key] = [row.get("extra", {}).get(key) for row in rows]
        for (spec, fn), w in zip(fns, weights, strict=True):
            total += w * call_reward_function(fn, spec, prompts, responses, columns)
        return total

    return score


def build_models(cfg: PPOConfig, ctx: StepContext, plan: dict[str, int]) -> PPOModels:
    from chatrl.algorithms.advantages import NEEDS_CRITIC
    from chatrl.data.pipeline import tokenized_rows
    from chatrl.data.tokenize import collate_prompts, collate_sft
    from chatrl.models.loading import load_causal_lm, load_frozen_causal_lm, resolve_dtype
    from chatrl.models.reward import TokenValueModel, load_reward_model
    from chatrl.rollout.hybrid import HybridEngine

    tok, dev = ctx.tokenizer, ctx.device
    total_steps = cfg.ppo.iterations * cfg.ppo.ppo_epochs * cfg.ppo.mini_batches

    def optim_for(optim):  # PPO derives the per-process micro-batch and accumulation from the batch plan
        return dataclasses.replace(optim, micro_batch_size=cfg.ppo.micro_batch_size, grad_accum=plan["grad_accum"])

    actor_model = load_causal_lm(cfg.actor, dtype=ctx.weights_dtype, tokenizer=tok)
    actor = initialize(actor_model, optim_for(cfg.actor_optim), cfg.deepspeed, bf16=ctx.bf16,
                       total_steps=total_steps, world_size=ctx.world)
    reference = load_frozen_causal_lm(cfg.actor.name_or_path, dtype=cfg.reference.dtype, tokenizer=tok)
    reference = Offloaded(reference, dev) if cfg.reference.offload else reference.to(dev)
    critic = None
    if NEEDS_CRITIC[cfg.ppo.advantage]:
        critic_path = cfg.critic.name_or_path or cfg.reward.model
        if not critic_path:
            raise ChatrlError("the critic needs a model: set critic.name_or_path or reward.model")
        lora = cfg.critic.lora if cfg.critic.lora.r > 0 else None
        critic_model = TokenValueModel(load_reward_model(critic_path, dtype=ctx.weights_dtype, lora_cfg=lora,
                                                         tokenizer=tok,
                                                         gradient_checkpointing=cfg.critic.gradient_checkpointing,
                                                         trainable_layers=cfg.critic.trainable_layers))
        critic = initialize(critic_model, optim_for(cfg.critic_optim), cfg.deepspeed, bf16=ctx.bf16,
                            total_steps=total_steps, world_size=ctx.world)
    reward_model = None
    if cfg.reward.model:
        reward_model = load_reward_model(cfg.reward.model, dtype=cfg.reward.dtype, tokenizer=tok, trainable=False)
        reward_model = Offloaded(reward_model, dev) if cfg.reward.offload else reward_model.to(dev)
    hybrid = HybridEngine(actor, inference_dtype=resolve_dtype(cfg.rollout.inference_dtype),
                          release_after_rollout=cfg.rollout.release_memory,
                          zero3=cfg.deepspeed.zero_stage == 3, compile_decode=cfg.rollout.compile)
    prompts = tokenized_rows(cfg.data, tok, "rlhf", "train")
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        sft_rows = tokenized_rows(cfg.data, tok, "sft", "train")
        mb = cfg.ppo.micro_batch_size
        ptx = (collate_sft(sft_rows[i:i + mb], tok.pad_token_id).to(dev)
               for i in itertools.cycle(range(0, max(len(sft_rows) - mb + 1, 1), mb)))
    ema = None
    if cfg.ppo.ema_decay > 0:
        import deepspeed

        params = dict(actor.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=cfg.deepspeed.zero_stage == 3):
            ema = {k: p.detach().float().cpu().clone() for k, p in params.items()}
    return PPOModels(actor=actor, critic=critic, reference=reference, reward_model=reward_model, hybrid=hybrid,
                     tokenizer=tok,
                     prompts=prompts, collate_prompts=lambda rows: collate_prompts(rows, tok.pad_token_id).to(dev),
                     function_scores=_function_scorer(cfg), ptx_batches=ptx, ema=ema, ema_decay=cfg.ppo.ema_decay)


def save_models(m: PPOModels, ctx: StepContext, cfg: PPOConfig, suffix: str = "") -> None:
    """Actor (chat-ready, LoRA merged), critic and EMA actor as plain HF folders."""
    finish_model(ctx, m.actor, merge_lora=True, dir_name=f"actor{suffix}")
    if m.critic is not None:
        finish_model(ctx, m.critic, merge_lora=True, dir_name=f"critic{suffix}")
    if m.ema is not None and ctx.rank == 0:
        from chatrl.models.saving import save_hf_folder

        save_hf_folder(m.actor.module, ctx.tokenizer, ctx.output_dir / f"actor_ema{suffix}", merge_lora=True,
                       state_dict=m.ema)
