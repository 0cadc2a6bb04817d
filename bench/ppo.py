"""PPO benchmark: the rollout of one PPO iteration with the Hybrid Engine vs `generate()` on the training model,
and a full PPO iteration broken down by phase, measured in one run.

    .venv/bin/python bench/ppo.py                  # ~5 min on 2 cores; writes bench/results/ppo.json
    .venv/bin/python bench/ppo.py --quick --tiny   # smoke run (tiny random model, few tokens), ~30 s

The models are built exactly as `chatrl ppo` builds them (`chatrl.steps.rl_models.build_models`): the actor is
a DeepSpeed engine in bf16 ZeRO-1 (the TRAINING model), plus critic (DeepSpeed), frozen reference and reward
model, all from the built-in SmolLM2-135M-Instruct (`--model`); prompts are the built-in RLHF data's first rows.
Cases (every case generates exactly `--new` tokens per prompt: min_new_tokens = max_new_tokens):
  hybrid-all        Hybrid Engine rollout of all prompts decoded together (inference-copy refresh included)
  hf-ppo-batch      HF `generate()` on the actor's module, `--batch` prompts per call (the PPO micro-batch)
  hybrid-ppo-batch  Hybrid Engine, `--batch` prompts per call (one refresh for all calls)
  hf-all            HF `generate()`, all prompts in one call
  *-compiled        the Hybrid Engine cases again with `rollout.compile=true` (torch.compile'd decode step;
                    its one-time compilation happens in the warm-up and is reported separately)
then one full PPO iteration (generate / score / rewards+GAE / train; compiled decode step unless --no-compile).
Sampling follows the PPO rollout config (temperature 1, no top-k / top-p) on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from chatrl.config_rl import BatchPlan, PPOConfig  # noqa: E402
from chatrl.configbase import load_config  # noqa: E402
from chatrl.data.prepare import tokenized_rows  # noqa: E402
from chatrl.data.tokenize import collate_prompts  # noqa: E402
from chatrl.rollout.sampling import GenerationSettings  # noqa: E402
from chatrl.steps.common import start_step  # noqa: E402
from chatrl.steps.rl import collect, make_experience  # noqa: E402
from chatrl.steps.rl_models import RLModels, build_models  # noqa: E402
from chatrl.steps.rl_update import policy_update  # noqa: E402

PHASES = ("generate", "score", "rewards", "train")
TARGETS = {"hybrid-all / hf-ppo-batch": 3.0, "hybrid-all / hf-all": 1.5, "hybrid-ppo-batch / hf-ppo-batch": 1.5,
           "hybrid-all-compiled / hf-ppo-batch": 3.0, "hybrid-all-compiled / hf-all": 1.5,
           "hybrid-ppo-batch-compiled / hf-ppo-batch": 1.5}


def make_config(args: argparse.Namespace, out_dir: str) -> PPOConfig:
    """The PPO config of the benchmark: `args.prompts` prompts per rollout, micro-batch `args.batch`, bf16 ZeRO-1."""
    return load_config(PPOConfig, overrides=[
        f"output_dir={out_dir}", f"actor.name_or_path={args.model}", f"critic.name_or_path={args.model}",
        f"reward.model={args.model}", "deepspeed.zero_stage=1", f"rollout.prompts_per_rollout={args.prompts}",
        f"rollout.max_new_tokens={args.new}", f"rollout.min_new_tokens={args.new}",
        f"ppo.micro_batch_size={args.batch}", f"data.max_prompt_length={args.prompt_len}",
        f"data.max_rows={max(4 * args.prompts, 200)}", "logging.report_to=[]", "logging.progress=false"])


def settings_for(cfg: PPOConfig, new: int, seed: int = 0) -> GenerationSettings:
    r = cfg.rollout
    return GenerationSettings(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k, seed=seed)


def run_hybrid(m: RLModels, ids: torch.Tensor, mask: torch.Tensor, batch: int, settings: GenerationSettings,
               eos: int, pad: int, compiled: bool = False) -> int:
    """Hybrid Engine rollout in calls of `batch` rows (one inference layout for all). -> new tokens."""
    m.hybrid.compile_decode = compiled
    m.hybrid.mark_weights_updated()  # as after a PPO step: the rollout pays for refreshing the inference copy
    n = 0
    with m.hybrid.inference_mode():
        for s in range(0, ids.shape[0], batch):
            _, rmask = m.hybrid.generate(ids[s:s + batch], mask[s:s + batch], settings, eos_token_id=eos,
                                         pad_token_id=pad)
            n += int(rmask.sum())
    return n


@torch.no_grad()
def run_hf(m: RLModels, ids: torch.Tensor, mask: torch.Tensor, batch: int, settings: GenerationSettings,
           eos: int, pad: int) -> int:
    """HF `generate()` on the training model (the DeepSpeed engine's module). -> new tokens."""
    module = m.actor.module
    was_training = module.training
    module.eval()
    n = 0
    try:
        for s in range(0, ids.shape[0], batch):
            out = module.generate(input_ids=ids[s:s + batch], attention_mask=mask[s:s + batch], do_sample=True,
                                  temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                  max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                                  eos_token_id=eos, pad_token_id=pad)
            n += out[:, ids.shape[1]:].numel()
    finally:
        module.train(was_training)
    return n


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, tokens


def refresh_seconds(m: RLModels) -> float:
    """Time of one inference-copy refresh alone (gather + cast + LoRA fold + weight packing)."""
    m.hybrid.mark_weights_updated()
    t0 = time.perf_counter()
    with m.hybrid.inference_mode():
        pass
    return time.perf_counter() - t0


def ppo_iteration(m: RLModels, cfg: PPOConfig, plan: BatchPlan, settings: GenerationSettings) -> dict[str, float]:
    """One PPO iteration exactly as `run_rl` runs it (steps 1-5), timed per phase. -> seconds per phase + counts."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    scored, _, _ = collect(m, cfg, 0, settings, 0, 1)
    times["generate"] = time.perf_counter() - t0
    exp = make_experience(m, cfg, scored, cfg.ppo.kl_coef, times)
    t0 = time.perf_counter()
    policy_update(m, exp, cfg, plan)
    m.after_optimizer_steps()
    times["train"] = time.perf_counter() - t0
    mask = exp.rollout.action_mask
    times["new_tokens"] = float(mask.sum())
    times["sequence_tokens"] = float(exp.rollout.prompt_mask.sum() + mask.sum())
    return times


def prompt_rows(cfg: PPOConfig, tok, n: int) -> list[dict]:
    rows = tokenized_rows(cfg.data, tok, "rlhf", "train")[:n]
    return (rows * -(-n // len(rows)))[:n]  # fewer rows than prompts: wrap around


def print_tables(results: dict, iteration: dict, ratios: dict, refresh: float) -> None:
    print(f"\n{'rollout case':<26} {'batch':>5} {'calls':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for name, r in results.items():
        print(f"{name:<26} {r['batch']:>5} {r['calls']:>5} {r['tokens']:>7} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>8.1f}")
    print(f"(inference-copy refresh alone: {refresh:.2f} s, included once in each hybrid case)")
    print(f"\n{'PPO iteration':<18} {'seconds':>8} {'share':>6} {'tok/s':>8}")
    total = iteration["total_seconds"]
    for phase in PHASES:
        p = iteration["phases"][phase]
        print(f"{phase:<18} {p['seconds']:>8.2f} {p['seconds'] / total:>6.1%} {p['tokens_per_s']:>8.1f}")
    print(f"{'total':<18} {total:>8.2f}")
    print("(generate tok/s = new tokens; score/train tok/s = prompt + response tokens)\n")
    for k, v in ratios.items():
        print(f"{k:<43} {v:5.2f}x   target {TARGETS[k]:.1f}x  {'met' if v >= TARGETS[k] else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in alias or HF folder")
    ap.add_argument("--tiny", action="store_true", help="use the tiny-random built-in model (smoke runs)")
    ap.add_argument("--quick", action="store_true", help="16 prompts x 8 new tokens, prompt length 32")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64, help="max prompt tokens (longer prompts left-truncated)")
    ap.add_argument("--batch", type=int, default=8, help="PPO micro-batch = HF generate batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd Hybrid Engine cases")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo.json"))
    args = ap.parse_args()
    if args.tiny:
        args.model = "tiny-random"
    if args.quick:
        args.prompts, args.new, args.prompt_len = 16, 8, 32
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as out_dir:
        cfg = make_config(args, out_dir)
        ctx = start_step(cfg, "ppo", model_cfg=cfg.actor)
        plan = cfg.batch_plan(ctx.world)
        m = build_models(cfg, ctx, plan)
        tok = ctx.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        rows = prompt_rows(cfg, tok, args.prompts)
        prompts = collate_prompts(rows, tok.pad_token_id).to(ctx.device)
        ids, mask = prompts.input_ids, prompts.attention_mask
        settings = settings_for(cfg, args.new)

        # Warm-up of every path (allocator, oneDNN primitives, DeepSpeed optimizer states) on a small slice.
        warm = settings_for(cfg, 2)
        run_hf(m, ids[: args.batch], mask[: args.batch], args.batch, warm, eos, pad)
        run_hybrid(m, ids, mask, args.prompts, warm, eos, pad)
        run_hybrid(m, ids[: args.batch], mask[: args.batch], args.batch, warm, eos, pad)
        compile_seconds = None
        if not args.no_compile:  # the one-time compilation, then a warm-up of the compiled step
            compile_seconds, _ = timed(lambda: run_hybrid(m, ids, mask, args.prompts, warm, eos, pad, True))
            run_hybrid(m, ids[: args.batch], mask[: args.batch], args.batch, warm, eos, pad, True)
            print(f"compiling the decode step (first call, incl. a 2-token rollout): {compile_seconds:.1f} s")
        ppo_iteration(m, cfg, plan, warm)

        n = args.prompts
        cases = {"hybrid-all": (run_hybrid, n, False), "hf-ppo-batch": (run_hf, args.batch, None),
                 "hybrid-ppo-batch": (run_hybrid, args.batch, False), "hf-all": (run_hf, n, None)}
        if not args.no_compile:
            cases |= {"hybrid-all-compiled": (run_hybrid, n, True),
                      "hybrid-ppo-batch-compiled": (run_hybrid, args.batch, True)}
        results = {}
        for name, (fn, batch, compiled) in cases.items():
            extra = {} if compiled is None else {"compiled": compiled}
            secs, tokens = timed(lambda fn=fn, batch=batch, extra=extra: fn(m, ids, mask, batch, settings, eos, pad,
                                                                             **extra))
            results[name] = dict(seconds=round(secs, 3), tokens=tokens, tokens_per_s=round(tokens / secs, 1),
                                 batch=batch, calls=-(-n // batch))
            print(f"{name}: {tokens / secs:.1f} tok/s ({secs:.2f} s)", flush=True)
        refresh = refresh_seconds(m)
        m.hybrid.compile_decode = not args.no_compile
        t = ppo_iteration(m, cfg, plan, settings_for(cfg, args.new, seed=1))
    counts = {"generate": t["new_tokens"], "score": t["sequence_tokens"], "rewards": t["new_tokens"],
              "train": t["sequence_tokens"]}
    iteration = {"phases": {p: dict(seconds=round(t[p], 3), tokens_per_s=round(counts[p] / max(t[p], 1e-9), 1))
                            for p in PHASES},
                 "total_seconds": round(sum(t[p] for p in PHASES), 3), "new_tokens": int(t["new_tokens"]),
                 "sequence_tokens": int(t["sequence_tokens"])}
    tps = {k: r["tokens_per_s"] for k, r in results.items()}
    ratios = {k: round(tps[a] / tps[b], 2) for k in TARGETS if (a := k.split(" / ")[0]) in tps
              and (b := k.split(" / ")[1]) in tps}
    print_tables(results, iteration, ratios, refresh)
    if compile_seconds is not None:
        print(f"(one-time compilation of the decode step: {compile_seconds:.1f} s, not in the cases above)")
    config = dict(vars(args) | {"out": os.path.relpath(args.out, ROOT)}, dtype="bfloat16 (DeepSpeed bf16, ZeRO-1)",
                  prompt_tokens_mean=round(float(mask.sum(1).float().mean()), 1), prompt_len_padded=ids.shape[1],
                  sampling=dict(temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p),
                  ppo=dict(micro_batch_size=cfg.ppo.micro_batch_size, mini_batches=cfg.ppo.mini_batches,
                           ppo_epochs=cfg.ppo.ppo_epochs, grad_accum=plan.grad_accum),
                  torch=torch.__version__, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default)"),
                  machine=platform.processor() or platform.machine(), load_avg=os.getloadavg()[0])
    payload = dict(config=config, rollout=results, refresh_seconds=round(refresh, 3),
                   compile_seconds=None if compile_seconds is None else round(compile_seconds, 1),
                   iteration=iteration, ratios=ratios,
                   targets={k: dict(target=TARGETS[k], met=v >= TARGETS[k]) for k, v in ratios.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
