"""Online RL: `chatrl ppo` and `chatrl grpo`. One iteration = the numbered steps in `run_rl`; the math is in
`chatrl.algorithms`, episodes in `chatrl.rollout.episodes`, rewards and log-probs in `rl_experience`, the update
in `rl_update`, model set-up in `rl_models`. PPO and GRPO differ only in their options (critic or not, where the
KL goes, the advantage estimator), not in their loop."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from chatrl.algorithms.advantages import compute_advantages
from chatrl.algorithms.controllers import AdaptiveKLController, FixedKLController
from chatrl.algorithms.distill import distill_advantages
from chatrl.algorithms.kl import kl_penalty
from chatrl.algorithms.rewards import shape_rewards
from chatrl.config_rl import BatchPlan, DistillConfig, GRPOConfig, GRPOOptions, PPOConfig, PPOOptions, RLStepConfig
from chatrl.engine import checkpoint as ckpt
from chatrl.engine.collectives import any_rank, global_mean, global_means, global_moments
from chatrl.engine.faults import BadSteps, StopRequest
from chatrl.judge import METRICS as JUDGE_COUNTS
from chatrl.log import MetricsLogger
from chatrl.rollout.episodes import Task, run_episodes
from chatrl.rollout.sampling import GenerationSettings
from chatrl.steps.common import start_step
from chatrl.steps.rl_agreement import agreement_metrics, probe_before_update
from chatrl.steps.rl_alarms import Alarms
from chatrl.steps.rl_experience import Scored, episode_tensors, score_episodes, score_rollout
from chatrl.steps.rl_models import RLModels, build_models, save_models
from chatrl.steps.rl_update import Experience, policy_update, single_on_policy_step
from chatrl.tools.stats import tool_metrics
from chatrl.tools.toolbox import toolbox_for

# ----------------------------------------------------------------------------- steps 1-2: episodes and rewards


def tasks_for(first_prompt: int, cfg: RLStepConfig, rank: int, world: int) -> list[Task]:
    """This rank's share of prompts first_prompt .. first_prompt + prompts_per_rollout, each repeated G times
    (the G samples of a group play the same task)."""
    prompts = range(first_prompt, first_prompt + cfg.rollout.prompts_per_rollout)[rank::world]
    return [Task("train", p, cfg.seed * 1_000_003 + p) for p in prompts for _ in range(cfg.rollout.samples_per_prompt)]


def play_and_score(m: RLModels, cfg: RLStepConfig, first_prompt: int, settings: GenerationSettings,
                   rank: int, world: int) -> Scored:
    """One round: episodes of prompts_per_rollout tasks x G samples, then their rewards."""
    r, p = cfg.rollout, cfg.policy
    episodes = run_episodes(m.hybrid, m.tokenizer, m.envs, cfg.env.name, tasks_for(first_prompt, cfg, rank, world),
                            settings, max_turns=cfg.env.max_turns, max_prompt_tokens=cfg.data.max_prompt_length,
                            max_context=cfg.env.max_context, tool_settings=cfg.env)
    tensors = episode_tensors(episodes, m.tokenizer.pad_token_id, cfg.env.gamma, m.hybrid.device)
    return score_episodes(episodes, tensors, m.functions, m.reward_model, model_weight=cfg.reward.model_weight,
                          eos_penalty=cfg.reward.eos_penalty, overlong_buffer=p.overlong_buffer,
                          overlong_factor=p.overlong_penalty, max_new_tokens=r.max_new_tokens, clip=cfg.reward.clip,
                          eos_id=m.tokenizer.eos_token_id, judge=m.judge, group_size=r.samples_per_prompt)


def collect(m: RLModels, cfg: RLStepConfig, cursor: int, settings: GenerationSettings, rank: int,
            world: int) -> tuple[Scored, int, dict[str, float]]:
    """Steps 1-2 with DAPO's dynamic sampling: rounds of episodes until the rollout holds only groups whose
    rewards differ (at most max_sampling_rounds rounds; a batch still short is filled with tied groups, whose
    advantage is 0). Returns the scored rollout, the new prompt cursor and the sampling counts."""
    p, g = cfg.policy, cfg.rollout.samples_per_prompt
    wanted = len(m.envs) // g  # groups on this process
    kept: Scored | None = None
    spare: list[Scored] = []
    seed, dropped, rounds = settings.seed, 0, 0
    while True:
        settings.seed = None if seed is None else seed + rounds * 7919
        scored = play_and_score(m, cfg, cursor, settings, rank, world)
        cursor += cfg.rollout.prompts_per_rollout
        rounds += 1
        if not p.dynamic_sampling:
            kept = scored
            break
        varied = varied_groups(scored.outcome, g)
        rows = [i for k, ok in enumerate(varied) if ok for i in range(k * g, (k + 1) * g)]
        dropped += varied.count(False)
        if rows:
            kept = scored.select(rows) if kept is None else kept + scored.select(rows)
        spare.append(scored.select([i for k, ok in enumerate(varied) if not ok for i in range(k * g, (k + 1) * g)]))
        full = kept is not None and len(kept.episodes) >= wanted * g
        if not any_rank(not full) or rounds >= p.max_sampling_rounds:
            break
    settings.seed = seed
    for extra in spare:  # the cap was reached: tied groups (advantage 0) fill the rest of the batch
        if kept is not None and len(kept.episodes) >= wanted * g:
            break
        kept = extra if kept is None else kept + extra
    assert kept is not None
    kept = kept.select(list(range(wanted * g)))
    tied = varied_groups(kept.outcome, g).count(False) if p.dynamic_sampling else 0
    return kept, cursor, {"sampling_rounds": rounds, "groups_dropped": dropped, "groups_tied_in_batch": tied}


def varied_groups(outcome: torch.Tensor, g: int) -> list[bool]:
    """Per group of g consecutive rows: do its rewards differ? (A tied group has advantage 0: nothing to learn.)"""
    groups = outcome.reshape(-1, g)
    return (groups.max(dim=1).values > groups.min(dim=1).values).tolist()


# ----------------------------------------------------------------------------- steps 3-4: log-probs, rewards, advantages


def make_experience(m: RLModels, cfg: RLStepConfig, scored: Scored, beta: float,
                    times: dict[str, float]) -> Experience:
    """Log-probs (models in eval mode), KL, token rewards and advantages of a scored rollout."""
    p, g = cfg.policy, cfg.rollout.samples_per_prompt
    t0 = time.perf_counter()
    tensors = episode_tensors(scored.episodes, m.tokenizer.pad_token_id, cfg.env.gamma, m.hybrid.device)
    on_policy = single_on_policy_step(cfg, m.reference is not None, m.critic is not None, m.teacher is not None)
    m.eval_mode()
    try:
        rollout = score_rollout(actor=None if on_policy else m.actor, reference=m.reference, critic=m.critic,
                                tensors=tensors, scores=scored.score, temperature=cfg.rollout.temperature,
                                teacher=m.teacher)
    finally:
        m.train_mode()
    times["score"] = times.get("score", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    # 3. rewards: the score (already clipped and discounted: Scored) at the last generated token, per-turn env
    #    rewards, -beta * kl_t if the KL is a reward
    mask = rollout.action_mask
    if scored.kept is not None:  # groups the judge could not score (on_error=skip): out of the rewards and the loss
        mask = rollout.action_mask = mask * scored.kept.to(mask.dtype).unsqueeze(1)
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, p.kl_estimator) * mask
    reward_beta = beta if p.kl_in == "reward" and m.reference is not None else 0.0
    rewards = shape_rewards(rollout.scores, kl, mask, reward_beta) + tensors.env_rewards
    # 4. advantages (GAE over generated tokens, or group-relative over episode returns); whitening across ranks;
    #    with a distillation teacher, log p_teacher - log p_student per token (mixed with those by teacher_weight)
    adv = returns = None
    if cfg.uses_env_advantage():
        adv, returns = compute_advantages(p.advantage, rewards, rollout.values if m.critic is not None else None,
                                          mask, gamma=p.gamma, lam=p.lam if isinstance(p, PPOOptions) else 1.0,
                                          group_size=g, whiten=isinstance(p, PPOOptions) and p.whiten_advantages,
                                          moments=global_moments)
    if m.teacher is not None and isinstance(p, GRPOOptions):
        adv = returns = distill_advantages(rollout.teacher_logprobs, rollout.logprobs, mask, adv, p.teacher_weight)
    assert adv is not None and returns is not None
    if p.mask_truncated:  # replies cut at max_new_tokens stay in their group's baseline but out of the loss
        keep = scored.has_eos.to(mask.dtype).unsqueeze(1)
        rollout.action_mask = mask * keep
        adv = adv * keep
    times["rewards"] = time.perf_counter() - t0
    return Experience(rollout, kl, adv, returns, on_policy, kl_coef=beta)


# ----------------------------------------------------------------------------- the loop


def iteration_metrics(scored: Scored, exp: Experience, stats: dict[str, float], sampling: dict[str, float],
                      times: dict[str, float], beta: float, world: int, g: int) -> dict[str, float]:
    """Step 6: one row of metrics.jsonl, over ALL ranks' rollouts (every rank holds the same number of episodes, so
    means of ranks' means are global means; counts are summed; times are rank 0's)."""
    ep = scored.episodes
    lengths = exp.rollout.response_mask.new_tensor([sum(a) for a in ep.action_mask])
    varied = varied_groups(scored.outcome, g)  # rows always come in whole groups
    means = {"reward_mean": scored.outcome.mean().item(),
             "success_rate": sum(ep.success) / len(ep), "env_return": sum(map(sum, ep.turn_rewards)) / len(ep),
             # groups of one (distillation, REINFORCE++ with G = 1) have no variance to lose: not logged, no alarm
             **({"zero_variance_groups": varied.count(False) / len(varied)} if g > 1 else {}),
             "kl": exp.kl.sum(-1).mean().item(), "response_length": lengths.mean().item(),
             "eos_rate": scored.has_eos.float().mean().item(), "turns": sum(map(len, ep.turn_rewards)) / len(ep),
             "context_truncated": sum(ep.context_truncated), "empty_responses": int((lengths == 0).sum()),
             **{f"reward_fn/{k}": v.mean().item() for k, v in scored.by_function.items()}, **stats}
    if scored.rm_score is not None:
        means["rm_score_raw"] = scored.rm_score.mean().item()
    if scored.kept is not None:  # the reward of the rows the judge scored (on_error=skip drops groups), all ranks
        means.update(kept_reward_sum=scored.outcome[scored.kept].sum().item(), kept_rows=int(scored.kept.sum()))
    out = global_means(means, sums=frozenset({"context_truncated", "empty_responses", "kept_reward_sum",
                                              "kept_rows"}))
    if scored.kept is not None:  # NaN when nothing was scored: the nonfinite alarm says so
        kept_sum, kept_rows = out.pop("kept_reward_sum"), out.pop("kept_rows")
        out["reward_mean"] = kept_sum / kept_rows if kept_rows else math.nan
    _, reward_var = global_moments(scored.outcome, torch.ones_like(scored.outcome))
    adv_mean, adv_var = global_moments(exp.advantages, exp.rollout.action_mask)
    if g > 1:  # what group-relative advantages see (within) against what they remove (between prompts; per process)
        groups = scored.outcome.reshape(-1, g)
        spread = {"reward_sd_within_group": groups.var(dim=1).mean().item(),
                  "reward_sd_between_groups": groups.mean(dim=1).var().item() if len(groups) > 1 else 0.0}
        out.update({k: math.sqrt(max(v, 0.0)) for k, v in global_means(spread).items()})
    r = exp.rollout
    if r.teacher_logprobs is not None:  # on-policy distillation: mean over the actions of all ranks
        teacher, _ = global_moments(r.teacher_logprobs, r.action_mask)
        student, _ = global_moments(r.logprobs, r.action_mask)
        out.update({"distill/reverse_kl": (student - teacher).item(), "distill/teacher_logprob": teacher.item(),
                    "distill/student_logprob": student.item()})
    out.update(reward_std=reward_var.sqrt().item(), truncation_rate=1 - out["eos_rate"], kl_coef=beta,
               advantage_mean=adv_mean.item(), advantage_std=adv_var.sqrt().item(), **sampling,
               **{f"time_{k}": v for k, v in times.items()},
               generate_tokens_per_s=lengths.sum().item() * world / max(times["generate"], 1e-9))
    return out


def run_rl(cfg: RLStepConfig, name: str) -> Path:
    """Train the actor; saves `<output_dir>/actor` (chat-ready HF folder), and `critic` when there is one.

    SIGTERM / SIGINT: the current iteration finishes, a checkpoint is written and the process exits 0. An optimizer
    step with a non-finite loss or gradients is skipped; `actor_optim.max_bad_steps` in a row raise a ChatrlError."""
    ctx = start_step(cfg, name, model_cfg=cfg.actor)
    p, r = cfg.policy, cfg.rollout
    if ckpt.finished_without_state(cfg.output_dir, cfg.checkpoint.resume, p.iterations):
        return ctx.output_dir / "actor"
    plan: BatchPlan = cfg.batch_plan(ctx.world)
    m = build_models(cfg, ctx, plan)
    adaptive = isinstance(p, PPOOptions) and p.kl_target
    kl_ctl = AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if adaptive else FixedKLController(p.kl_coef)
    bad = BadSteps(cfg.actor_optim.max_bad_steps, setting="actor_optim.max_bad_steps")
    start, cursor = resume(m, cfg, kl_ctl, bad)
    alarms = Alarms(cfg.output_dir, rank=ctx.rank)
    log = MetricsLogger(cfg.output_dir, rank=ctx.rank, total_steps=p.iterations, start_step=start,
                        report_to=cfg.logging.report_to, progress=cfg.logging.progress, desc=name)
    settings = GenerationSettings(max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, do_sample=True,
                                  temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    tools = toolbox_for(m.envs[0], cfg.env.name, cfg.env)  # None: the environment offers no tools
    with StopRequest() as stop:
        for it in range(start, p.iterations):
            times: dict[str, float] = {}
            done = it + 1
            settings.seed = cfg.seed * 100003 + it * 101 + ctx.rank
            bad.where = f"[{name}] iteration {done}"
            # 1-2. episodes with the Hybrid Engine (all unfinished episodes of a turn in one batch), then rewards:
            #      environment, reward functions, reward model; dynamic sampling drops tied groups
            t0 = time.perf_counter()
            scored, cursor, sampling = collect(m, cfg, cursor, settings, ctx.rank, ctx.world)
            times["generate"] = time.perf_counter() - t0
            # 3-4. log-probs (actor, reference, critic), KL, token rewards, advantages
            exp = make_experience(m, cfg, scored, kl_ctl.value, times)
            probe = probe_before_update(m, exp, r.temperature, settings.seed)  # sampler vs actor, full vocabulary
            # 5. policy (and critic) update over mini-batches (a step whose loss or gradients are not finite is
            #    skipped), then the Hybrid Engine's copy is marked stale
            t0 = time.perf_counter()
            stats = policy_update(m, exp, cfg, plan, bad)
            m.after_optimizer_steps()
            times["train"] = time.perf_counter() - t0
            rollout_kl = global_mean(exp.kl.sum(-1).mean().item())
            if math.isfinite(rollout_kl):  # a poisoned rollout must not poison beta for the rest of the run
                kl_ctl.update(rollout_kl, plan.rollout)  # the same beta on every rank
            # 6. log rewards, success, KL, lengths, losses, clip fractions, sampling counts, phase times
            metrics = iteration_metrics(scored, exp, stats, sampling, times, kl_ctl.value, ctx.world,
                                        r.samples_per_prompt)
            metrics.update(agreement_metrics(exp.rollout, *probe))  # the inference copy vs the trainer
            if m.judge is not None:  # this iteration's requests, cache hits, errors, skipped rows; mean latency
                metrics.update(global_means(m.judge.take_metrics(), sums=frozenset(JUDGE_COUNTS)))
            if tools is not None:  # calls, errors, timeouts, calls per episode, latency per tool (all ranks)
                metrics.update(tool_metrics(scored.episodes.tool_results, tools.names, reduce=global_means))
            log.log(done, {**metrics, "bad_steps": bad.total})
            alarms.check(done, metrics)  # a warning line and alarms.jsonl (the report's red box)
            log.advance(1, reward=metrics["reward_mean"], kl=metrics["kl"], len=metrics["response_length"],
                        gen_tok_s=metrics["generate_tokens_per_s"])
            # 7. resumable checkpoint: periodic, at the end, or now when any rank got SIGTERM / SIGINT
            stopping = stop.agreed() and done < p.iterations
            if stopping or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == p.iterations:
                path = ckpt.save_checkpoint(cfg.output_dir, done, m.engines(),
                                            {"kl_ctl": kl_ctl.state_dict(), "prompt_cursor": cursor,
                                             "bad_steps": bad.state_dict()},
                                            keep_last=cfg.checkpoint.keep_last,
                                            tensors={"ema": m.ema.weights} if m.ema else None)
            if stopping:
                log.close()
                stop.exit(done, p.iterations, path)
            if p.save_every and done % p.save_every == 0 and done != p.iterations:
                save_models(m, ctx, suffix=f"-iter{done:05d}")
    log.close()
    save_models(m, ctx)
    ckpt.mark_finished(cfg.output_dir, p.iterations, keep_state=cfg.checkpoint.keep_final_state)
    return ctx.output_dir / "actor"


def resume(m: RLModels, cfg: RLStepConfig, kl_ctl: AdaptiveKLController | FixedKLController,
           bad: BadSteps) -> tuple[int, int]:
    """Restore the newest checkpoint (engines, RNG, KL controller, EMA, bad-step count); (iteration, prompt cursor)."""
    resume_from = ckpt.find_resume_point(cfg.output_dir, cfg.checkpoint.resume)
    if resume_from is None:
        return 0, 0
    state = ckpt.load_checkpoint(resume_from, m.engines())
    kl_ctl.load_state_dict(state["kl_ctl"])
    bad.load_state_dict(state.get("bad_steps", {}))
    if m.ema is not None:  # the EMA continues where it was, not from the restored actor
        m.ema.weights = ckpt.load_checkpoint_tensors(resume_from, "ema") or m.ema.weights
    m.hybrid.mark_weights_updated()
    return state["step"], state.get("prompt_cursor", state["step"] * cfg.rollout.prompts_per_rollout)


def run_ppo(cfg: PPOConfig) -> Path:
    """`chatrl ppo`: actor + critic (GAE) or a critic-free estimator, KL in the reward (fixed or adaptive)."""
    return run_rl(cfg, "ppo")


def run_grpo(cfg: GRPOConfig) -> Path:
    """`chatrl grpo`: critic-free group-relative RL in an environment (GRPO, Dr. GRPO, RLOO, REINFORCE++,
    DAPO's clip-higher / dynamic sampling / overlong shaping, GSPO)."""
    return run_rl(cfg, "grpo")


def run_distill(cfg: DistillConfig) -> Path:
    """`chatrl distill`: on-policy distillation: GRPO's loop with a frozen teacher (grpo.teacher) whose per-token
    log-probs of the student's samples give the advantages (algorithms/distill.py)."""
    return run_rl(cfg, "distill")
