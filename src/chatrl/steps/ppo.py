"""Step 3: RLHF with PPO. One iteration = the six numbered steps in `run_ppo`; the math is in
`chatrl.algorithms`, experience making in `ppo_experience`, model set-up in `ppo_models`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatrl.algorithms.advantages import compute_advantages
from chatrl.algorithms.controllers import AdaptiveKLController, FixedKLController
from chatrl.algorithms.kl import kl_penalty
from chatrl.algorithms.losses import mean_entropy, policy_loss, token_logprobs, value_loss
from chatrl.algorithms.masked import masked_mean, masked_whiten
from chatrl.algorithms.rewards import contains_eos, eos_penalty, shape_rewards
from chatrl.batches import Rollout
from chatrl.config import PPOConfig
from chatrl.engine import checkpoint as ckpt
from chatrl.log import MetricsLogger
from chatrl.rollout.sampling import GenerationSettings
from chatrl.steps.common import start_step
from chatrl.steps.ppo_experience import joined, response_logits, response_values, score_rollout, select
from chatrl.steps.ppo_models import PPOModels, build_models, save_models


def prompt_rows_for(iteration: int, n_rows: int, cfg: PPOConfig, rank: int, world: int) -> list[int]:
    """Indices of this process's prompts for `iteration`: a seeded permutation per pass over the shard."""
    per_iter = cfg.rollout.prompts_per_rollout
    per_epoch = max(n_rows // per_iter, 1)
    epoch, k = divmod(iteration, per_epoch)
    perm = np.random.default_rng(cfg.seed + epoch).permutation(n_rows)
    chosen = perm[k * per_iter:(k + 1) * per_iter]
    if len(chosen) < per_iter:  # fewer prompts than one rollout: wrap around
        chosen = np.resize(perm, per_iter)
    return chosen[rank::world].tolist()


def ppo_update(m: PPOModels, rollout: Rollout, adv: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig,
               plan: dict[str, int], ptx_batches) -> dict[str, float]:
    """Step 5: `ppo_epochs` passes over shuffled mini-batches; DeepSpeed accumulates `grad_accum` micro-batches
    into one optimizer step per mini-batch."""
    p, n = cfg.ppo, rollout.response_ids.shape[0]
    micro, plen = p.micro_batch_size, rollout.prompt_ids.shape[1]
    sums: dict[str, float] = {}
    count = 0
    for _ in range(p.ppo_epochs):
        for idx in torch.randperm(n).split(micro):
            mb, extra = select(rollout, idx, adv=adv, ret=returns)
            mask = mb.response_mask
            ids, full_mask = joined(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mask.long())
            # actor: clipped surrogate - entropy bonus (+ ptx LM loss)
            logits = response_logits(m.actor, ids, full_mask, plen, cfg.rollout.temperature)
            logprobs = token_logprobs(logits, mb.response_ids)
            pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, extra["adv"], mask, p.clip_eps)
            entropy = mean_entropy(logits, mask)
            loss = pg_loss - p.entropy_coef * entropy
            if p.ptx_coef > 0:
                batch = next(ptx_batches)
                loss = loss + p.ptx_coef * m.actor(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                   labels=batch.labels, use_cache=False).loss
            m.actor.backward(loss)
            m.actor.step()
            stats = {"policy_loss": pg_loss.item(), "entropy": entropy.item(),
                     **{f"policy_{k}": float(v) for k, v in pg_stats.items()}}
            # critic: clipped value regression to the GAE returns
            if m.critic is not None:
                values = response_values(m.critic, ids, full_mask, plen)
                v_loss, v_stats = value_loss(values, mb.values, extra["ret"], mask, p.value_clip_eps)
                m.critic.backward(v_loss)
                m.critic.step()
                stats.update(value_loss=v_loss.item(), **{f"value_{k}": float(v) for k, v in v_stats.items()})
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


@dataclass
class Experience:
    """Steps 1-4 of an iteration: the scored rollout, its KL, advantages and returns (all [B, R] but scores)."""

    rollout: Rollout
    raw_scores: torch.Tensor  # [B] before the no-EOS penalty
    has_eos: torch.Tensor     # [B] bool
    kl: torch.Tensor          # [B, R] per-token KL estimate (0 on padding)
    advantages: torch.Tensor
    returns: torch.Tensor


def make_experience(m: PPOModels, cfg: PPOConfig, rows: list[dict], settings: GenerationSettings, beta: float,
                    times: dict[str, float]) -> Experience:
    """Steps 1-4 for prompt `rows` (already repeated per sample); fills `times` per phase."""
    tok = m.tokenizer
    # 1. generate responses with the Hybrid Engine
    t0 = time.perf_counter()
    prompts = m.collate_prompts(rows)
    response_ids, response_mask = m.hybrid.generate(prompts.input_ids, prompts.attention_mask, settings,
                                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    times["generate"] = time.perf_counter() - t0
    # 2. score: reward functions + reward model at the end token; actor/reference log-probs; critic values
    t0 = time.perf_counter()
    texts = tok.batch_decode(response_ids.masked_fill(response_mask == 0, tok.pad_token_id), skip_special_tokens=True)
    ids_lists = [ids[: int(n)].tolist() for ids, n in zip(response_ids, response_mask.sum(-1), strict=True)]
    fn_scores = m.function_scores([row["messages"] for row in rows], texts, rows, ids_lists)
    rollout = score_rollout(actor=m.actor, reference=m.reference, critic=m.critic, reward_model=m.reward_model,
                            prompt_ids=prompts.input_ids, prompt_mask=prompts.attention_mask,
                            response_ids=response_ids, response_mask=response_mask,
                            function_scores=fn_scores, model_weight=cfg.reward.model_weight,
                            temperature=cfg.rollout.temperature)
    raw_scores = rollout.scores.clone()
    has_eos = contains_eos(rollout.response_ids, rollout.response_mask, tok.eos_token_id)
    rollout.scores = eos_penalty(rollout.scores, has_eos, cfg.reward.eos_penalty)
    times["score"] = time.perf_counter() - t0
    # 3. rewards: -beta * kl_t per token, clipped score added at the last response token
    t0 = time.perf_counter()
    mask = rollout.response_mask
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, cfg.ppo.kl_estimator) * mask
    rewards = shape_rewards(rollout.scores, kl, mask, beta, cfg.reward.clip)
    # 4. advantages (GAE over response tokens only, or group-relative) and returns; optional whitening
    adv, returns = compute_advantages(cfg.ppo.advantage, rewards, rollout.values, mask, gamma=cfg.ppo.gamma,
                                      lam=cfg.ppo.lam, group_size=cfg.rollout.samples_per_prompt)
    if cfg.ppo.whiten_advantages:
        adv = masked_whiten(adv, mask)
    times["rewards"] = time.perf_counter() - t0
    return Experience(rollout, raw_scores, has_eos, kl, adv, returns)


def train_on(m: PPOModels, exp: Experience, cfg: PPOConfig, plan: dict[str, int],
             times: dict[str, float]) -> dict[str, float]:
    """Step 5: the PPO update on one experience, then the Hybrid Engine's copy is marked stale."""
    t0 = time.perf_counter()
    stats = ppo_update(m, exp.rollout, exp.advantages, exp.returns, cfg, plan, m.ptx_batches)
    m.after_optimizer_steps()
    times["train"] = time.perf_counter() - t0
    return stats


def run_ppo(cfg: PPOConfig) -> Path:
    """Train the actor with PPO; saves `<output_dir>/actor` (chat-ready HF folder) and `critic`."""
    ctx = start_step(cfg, "ppo", model_cfg=cfg.actor)
    plan = cfg.batch_plan(ctx.world)
    m = build_models(cfg, ctx, plan)
    r = cfg.rollout
    kl_ctl = (AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
              if cfg.ppo.kl_target else FixedKLController(cfg.ppo.kl_coef))
    start = 0
    resume_from = ckpt.find_resume_point(cfg.output_dir, cfg.checkpoint.resume)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, m.engines())
        start = state["step"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        if m.ema is not None:  # the EMA continues where it was, not from the restored actor
            m.ema = ckpt.load_checkpoint_tensors(resume_from, "ema") or m.ema
        m.hybrid.mark_weights_updated()
    log = MetricsLogger(cfg.output_dir, rank=ctx.rank, total_steps=cfg.ppo.iterations, start_step=start,
                        tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress, desc="ppo")
    settings = GenerationSettings(max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, do_sample=True,
                                  temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    for it in range(start, cfg.ppo.iterations):
        times: dict[str, float] = {}
        rows = [m.prompts[i] for i in prompt_rows_for(it, len(m.prompts), cfg, ctx.rank, ctx.world)]
        settings.seed = cfg.seed * 100003 + it * 101 + ctx.rank
        # 1-4. generate with the Hybrid Engine, score, shape rewards with the KL penalty, advantages
        exp = make_experience(m, cfg, [row for row in rows for _ in range(r.samples_per_prompt)], settings,
                              kl_ctl.value, times)
        rollout, kl, adv, mask = exp.rollout, exp.kl, exp.advantages, exp.rollout.response_mask
        # 5. PPO epochs over shuffled mini-batches (policy + value losses), then refresh the inference copy
        stats = train_on(m, exp, cfg, plan, times)
        seq_kl = (kl.sum(-1)).mean().item()
        kl_ctl.update(seq_kl, plan["rollout"])
        # 6. log rewards, KL, lengths, losses, EOS rate and per-phase time / throughput
        lengths = mask.sum(-1)
        new_tokens = float(lengths.sum()) * ctx.world
        metrics = {"reward_mean": rollout.scores.mean().item(), "reward_std": rollout.scores.std().item()
                   if len(rollout.scores) > 1 else 0.0, "rm_score_raw": exp.raw_scores.mean().item(),
                   "kl": seq_kl, "kl_coef": kl_ctl.value, "response_length": lengths.float().mean().item(),
                   "eos_rate": exp.has_eos.float().mean().item(),
                   "empty_responses": int((lengths == 0).sum()), "advantage_mean": masked_mean(adv, mask).item(),
                   **stats, **{f"time_{k}": v for k, v in times.items()},
                   "generate_tokens_per_s": new_tokens / max(times["generate"], 1e-9)}
        log.log(it + 1, metrics)
        log.advance(1, reward=metrics["reward_mean"], kl=seq_kl, len=metrics["response_length"],
                    gen_tok_s=metrics["generate_tokens_per_s"])
        done = it + 1
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.ppo.iterations:
            ckpt.save_checkpoint(cfg.output_dir, done, m.engines(), {"kl_ctl": kl_ctl.state_dict()},
                                 keep_last=cfg.checkpoint.keep_last, tensors={"ema": m.ema} if m.ema else None)
        if cfg.ppo.save_every and done % cfg.ppo.save_every == 0 and done != cfg.ppo.iterations:
            save_models(m, ctx, cfg, suffix=f"-iter{done:05d}")
    log.close()
    save_models(m, ctx, cfg)
    return ctx.output_dir / "actor"
