"""One RL iteration of `chatrl ppo` / `chatrl grpo` by phase: seconds, tokens/s, MFU, peak RSS against its budget.

    .venv/bin/python bench/rl.py ppo            # ~3 min on 2 cores; writes bench/results/ppo.json
    .venv/bin/python bench/rl.py grpo           # writes bench/results/grpo.json
    .venv/bin/python bench/rl.py ppo --quick    # tiny model, 2 iterations: ~40 s

The work is the speed issue's (and `vs_trl.py`'s): SmolLM2-135M-Instruct as actor, frozen reference, critic and
reward model (PPO; GRPO: actor + a rule reward, KL off as in both systems' defaults), prompts of exactly
`--prompt-len` tokens after the chat template (`trl/prompts.py`), exactly `--new` new tokens (min = max), 1 epoch,
1 mini-batch, micro-batch 8, in the dtype `auto` picks here. The models and the loop are `chatrl ppo`'s own
(`build_models`, `collect`, `make_experience`, `policy_update`); one warm-up iteration, then the median of
`--iterations`. FLOPs per phase (matmuls; `common.Shape`):
  generate  the floor of `generate.py` (prefill at peak + decode steps at max(bytes/bandwidth, FLOPs/peak)), plus
            the reward model's forward at peak: `collect` scores each episode as it ends, so it is in this phase
  score     one forward over prompt + response per model that scores: reference and actor (LM head on the
            response only), critic (no LM head); the actor is skipped where chatrl skips it
  train     3 x forward (forward + backward) of the actor and, for PPO, the critic
RSS budget: what the models must hold — 4 bytes x parameters x (1 frozen | 4 trained: weights, gradients, Adam's
two moments) in fp32 (bf16 weights: 2 bytes + an fp32 master copy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    DTYPE_NAMES,
    RESULTS,
    ROOT,
    Shape,
    load_limits,
    machine,
    mfu,
    pct,
    peak_flops,
    peak_rss_gib,
    table,
    write_json,
)
from generate import floor_seconds

from chatrl.config_rl import GRPOConfig, PPOConfig, RLStepConfig
from chatrl.configbase import load_config
from chatrl.models.loading import load_tokenizer
from chatrl.rollout.sampling import GenerationSettings
from chatrl.steps.common import start_step
from chatrl.steps.rl import collect, make_experience
from chatrl.steps.rl_models import RLModels, build_models
from chatrl.steps.rl_update import policy_update, single_on_policy_step

sys.path.insert(0, str(ROOT / "bench" / "trl"))  # the prompt builder vs_trl.py gives both systems (not `import trl`:
from prompts import make_prompts, write_prompts  # noqa: E402  that name is the TRL package in the TRL venvs)

PHASES = ("generate", "score", "train")
REWARD_FN = f"{Path(__file__).parent / 'trl' / 'rewards.py'}:length_mod"  # GRPO's rule reward, the one TRL gets


def make_config(args: argparse.Namespace, out_dir: str, prompts: Path) -> RLStepConfig:
    common = [f"output_dir={out_dir}", f"actor.name_or_path={args.model}", f"data.paths=[{prompts}]",
              "data.split=0,0,1", "data.eval_fraction=0", f"data.max_prompt_length={args.prompt_len}",
              f"rollout.max_new_tokens={args.new}", f"rollout.min_new_tokens={args.new}",
              "logging.report_to=[]", "logging.progress=false"]
    if args.algorithm == "ppo":
        return load_config(PPOConfig, overrides=common + [
            f"critic.name_or_path={args.model}", f"reward.model={args.model}", f"rollout.prompts_per_rollout={args.prompts}",
            f"ppo.micro_batch_size={args.batch}"])
    return load_config(GRPOConfig, overrides=common + [
        f"reward.functions=[{REWARD_FN}]", f"rollout.prompts_per_rollout={args.prompts}",
        f"rollout.samples_per_prompt={args.group}", f"grpo.micro_batch_size={args.batch}"])


def iteration(m: RLModels, cfg: RLStepConfig, plan, it: int) -> dict[str, float]:
    """One iteration as `run_rl` runs it (steps 1-5), timed per phase (score includes rewards + advantages)."""
    r = cfg.rollout
    settings = GenerationSettings(max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, do_sample=True,
                                  temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=it)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    scored, _, _ = collect(m, cfg, 0, settings, 0, 1)
    times["generate"] = time.perf_counter() - t0
    times["rss_generate"] = peak_rss_gib()  # the process's peak so far: which phase sets it
    exp = make_experience(m, cfg, scored, cfg.policy.kl_coef, times)
    times["score"] += times.pop("rewards")
    times["rss_score"] = peak_rss_gib()
    t0 = time.perf_counter()
    policy_update(m, exp, cfg, plan)
    m.after_optimizer_steps()
    times["train"] = time.perf_counter() - t0
    times["rss_train"] = peak_rss_gib()
    times["rows"] = float(exp.rollout.action_mask.shape[0])
    times["new_tokens"] = float(exp.rollout.action_mask.sum())
    times["tokens"] = float(exp.rollout.prompt_mask.sum() + exp.rollout.action_mask.sum())
    return times


def phase_flops(m: RLModels, cfg: RLStepConfig, shape: Shape, rows: int, prompt: int, new: int) -> dict[str, float]:
    """Matmul FLOPs of the score and train phases for `rows` sequences of prompt + new tokens."""
    t = rows * (prompt + new)
    ctx = (prompt + new) / 2
    lm = shape.forward_flops(t, ctx, lm_head_tokens=rows * (new + 1))  # LM head on the response positions only
    body = shape.forward_flops(t, ctx, lm_head_tokens=0)
    skip_actor = single_on_policy_step(cfg, m.reference is not None, m.critic is not None)
    score = lm * ((m.reference is not None) + (not skip_actor)) + body * (m.critic is not None)
    return dict(score=score, train=3 * lm + 3 * body * (m.critic is not None),
                reward_model=body * (m.reward_model is not None))  # in the generate phase (see the docstring)


def rss_budget_gib(m: RLModels) -> float:
    """Bytes the models must hold (weights; + gradients and Adam's two moments for trained ones)."""
    def params(model) -> list[torch.Tensor]:
        return list(model.parameters()) if model is not None else []
    total = 0
    for model, trained in ((m.actor, True), (m.critic, True), (m.reference, False), (m.reward_model, False)):
        for p in params(model):
            n, size = p.numel(), p.element_size()
            total += n * size + (n * (size + 8) + (4 * n if size < 4 else 0) if trained and p.requires_grad else 0)
    return total / 2**30


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("algorithm", choices=("ppo", "grpo"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=4, help="GRPO: samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=64, help="tokens of every prompt (chat template included)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per response (min = max)")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    ap.add_argument("--quick", action="store_true", help="tiny-random model, 48-token prompts, 8 new tokens, 2 iterations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="default bench/results/<algorithm>.json")


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.model, args.prompt_len, args.new, args.iterations = "tiny-random", 48, 8, 2
    torch.set_num_threads(args.threads)
    limits = load_limits()
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.algorithm}-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts, make_prompts(load_tokenizer(args.model), args.prompts, args.prompt_len))
        cfg = make_config(args, str(Path(tmp) / "run"), prompts)
        ctx = start_step(cfg, args.algorithm, model_cfg=cfg.actor)
        plan = cfg.batch_plan(ctx.world)
        m = build_models(cfg, ctx, plan)
        dtype = DTYPE_NAMES[next(m.hybrid.module.parameters()).dtype]
        shape = Shape.of(m.hybrid.module.config)
        warm = iteration(m, cfg, plan, 0)  # warm-up: allocator, optimizer states, kernels
        runs = [iteration(m, cfg, plan, it) for it in range(1, args.iterations + 1)]
        rows = int(runs[0]["rows"])
        flops = phase_flops(m, cfg, shape, rows, args.prompt_len, args.new)
        budget = rss_budget_gib(m)
    med = {k: statistics.median(r[k] for r in runs) for k in (*PHASES, "new_tokens", "tokens")}
    floor = (floor_seconds(shape, rows, args.prompt_len, args.new, 4 if dtype == "fp32" else 2, limits, dtype)
             + flops["reward_model"] / peak_flops(limits, dtype)) if limits else None
    phases = {p: dict(seconds=round(med[p], 3),
                      tokens_per_s=round((med["new_tokens"] if p == "generate" else med["tokens"]) / med[p], 1),
                      of_limit=(floor / med[p] if floor else None) if p == "generate" else mfu(flops[p], med[p], limits, dtype))
              for p in PHASES}
    rss = peak_rss_gib()
    payload = dict(algorithm=args.algorithm, phases=phases, seconds=round(sum(med[p] for p in PHASES), 3),
                   iterations=[{p: round(r[p], 3) for p in PHASES} for r in runs], rows=rows,
                   new_tokens=int(med["new_tokens"]), tokens=int(med["tokens"]),
                   peak_rss_gib=round(rss, 2), rss_budget_gib=round(budget, 2), rss_over_budget=round(rss / budget, 2),
                   peak_rss_after_first={p: round(warm[f"rss_{p}"], 2) for p in PHASES},
                   config=dict(model=args.model, dtype=dtype, prompts=args.prompts, group=args.group if args.algorithm == "grpo" else 1,
                               prompt_len=args.prompt_len, new=args.new, micro_batch=args.batch,
                               iterations=args.iterations, flops={k: round(v / 1e9, 1) for k, v in flops.items()}),
                   limits=limits, machine=machine())
    print(report(payload))
    write_json(args.out or RESULTS / f"{args.algorithm}.json", payload)
    return payload


def report(payload: dict) -> str:
    rows = [[p, f"{v['seconds']:.2f}", f"{v['tokens_per_s']:.0f}", pct(v["of_limit"])] for p, v in payload["phases"].items()]
    rows.append(["total", f"{payload['seconds']:.2f}", "", ""])
    return (f"{payload['algorithm']} iteration ({payload['rows']} sequences, {payload['tokens']} tokens):\n"
            + table(["phase", "seconds", "tok/s", "of limit (generate: floor; others: MFU)"], rows)
            + f"\npeak RSS {payload['peak_rss_gib']:.2f} GiB = {payload['rss_over_budget']:.2f}x the "
              f"{payload['rss_budget_gib']:.2f} GiB the models, gradients and Adam states hold (peak after each "
              f"phase of the first iteration: {payload['peak_rss_after_first']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
