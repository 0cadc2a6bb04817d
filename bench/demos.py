"""Every demo, for N seeds: its effect on held-out work and whether it holds the bar (issue 19), written into the
README by the run that measured it.

    make demos-check                                   # = bench/demos.py --seeds 1,2,3 --readme  (time: README)
    .venv/bin/python bench/demos.py rlhf --seeds 7     # one demo, one seed
    .venv/bin/python bench/demos.py --table-only --readme  # rebuild the tables from bench/results/demos/*.json

Demos (each a `chatrl pipeline` run in runs/demos/<demo>-<dtype>-s<seed>, its own seed for every step):
  rlhf  configs/demo.yaml           SFT -> reward model (+ judge) -> PPO -> eval on held-out prompts
  dpo   configs/demo-dpo.yaml       SFT -> DPO -> eval, scored by the judge
  grpo  configs/grpo-arithmetic.yaml  GRPO on two-digit addition -> held-out problems
  distill configs/distill-arithmetic.yaml  base SmolLM2 distils the grpo demo's actor (same seed; run first if
        missing) -> held-out problems, and rollout success against GRPO from scratch at equal training time
        (bench/demo_distill.py)
  tools configs/demo-tools.yaml     SFT on the environment's tool-use demonstrations -> GRPO with the calculator on
        two-digit multiplication -> held-out problems without tools, and with tools before and after training
        (bench/demo_tools.py)
Bars (issue 19): rlhf: PPO beats SFT and base by >= 2 s.e. of the paired difference (training reward model) and
the independent judge does not rank it below SFT (judge gain > -1 s.e.); dpo: held-out implicit-reward accuracy
>= 60% and judge gain over SFT >= 2 s.e.; grpo: >= +15 points held-out success with paired s.e. <= 4; distill
(issue 22): held-out success above base by >= 2 s.e.; tools (issue 20): with tools after GRPO >= +20 points over the
base model, with and without tools.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import transformers
from common import RESULTS, ROOT, machine, table, update_readme, write_json
from demo_distill import distill_table, measure_distill, teacher_run
from demo_tools import measure_tools, tools_table

from chatrl.eval.metrics import paired_difference, proportion_se

DEMOS = {"rlhf": "configs/demo.yaml", "dpo": "configs/demo-dpo.yaml", "grpo": "configs/grpo-arithmetic.yaml",
         "distill": "configs/distill-arithmetic.yaml", "tools": "configs/demo-tools.yaml"}
OUT = RESULTS / "demos"


def run_demo(demo: str, seed: int, dtype: str, overrides: list[str]) -> tuple[Path, float | None]:
    """Run one demo's pipeline; (run folder, seconds — None when an earlier, interrupted run had finished steps
    that this one skipped, so its time is not the pipeline's)."""
    run_dir = ROOT / "runs" / "demos" / f"{demo}-{dtype}-s{seed}"  # a run of another dtype is not a finished step
    cmd = [str(Path(sys.executable).with_name("chatrl")), "pipeline", "--config", DEMOS[demo], f"seed={seed}",
           f"run_dir={run_dir}", *overrides]
    print(f"\n=== {demo} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    # finished steps are skipped: not timed (the tools demo's step 3 is grpo)
    resumed = (run_dir / "sft").is_dir() or (run_dir / demo).is_dir() or (run_dir / "grpo").is_dir()
    t0 = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"demos: {demo} seed {seed} failed (its error is above)")
    return run_dir, None if resumed else time.perf_counter() - t0


def demo_overrides(demo: str, seed: int, dtype: str) -> list[str]:
    """The distillation demo's teacher: the grpo demo's actor of the same seed and dtype (that demo runs first when
    it has not finished: its finished steps are skipped)."""
    if demo != "distill":
        return []
    grpo_dir = teacher_run(ROOT / "runs" / "demos" / f"{demo}-{dtype}-s{seed}")
    if not (grpo_dir / "eval" / "eval_env.json").exists():
        run_demo("grpo", seed, dtype, [])
    return [f"distill.grpo.teacher={grpo_dir / 'grpo' / 'actor'}"]


def _last_eval(metrics: Path) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
    return rows[-1] if rows else {}


def _gain(samples: list[dict], key: str, new: str, old: str) -> dict | None:
    pairs = [(s[key][new], s[key][old]) for s in samples if new in s.get(key, {}) and old in s.get(key, {})]
    if not pairs:
        return None
    d = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    return {"mean": d.mean, "se": d.se, "wins": d.wins, "losses": d.losses, "n": len(pairs)}


def measure(demo: str, run_dir: Path) -> dict:
    """The demo's effect, from the files its pipeline wrote."""
    if demo == "distill":
        return measure_distill(run_dir)
    if demo == "tools":
        return measure_tools(run_dir)
    if demo == "grpo":
        env = json.loads((run_dir / "eval" / "eval_env.json").read_text())["models"]
        base, rl = env["base"], env["grpo"]
        return {"base_success": base["success"], "rl_success": rl["success"], "gain": rl["vs_first"],
                "gain_se": rl["vs_first_se"], "holds": rl["vs_first"] >= 0.15 and rl["vs_first_se"] <= 0.04}
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    policy = "ppo" if demo == "rlhf" else "dpo"
    out = {"reward": {m: v["reward_mean"] for m, v in ev["metrics"].items()},
           "kl": {m: v["kl"] for m, v in ev["metrics"].items()},
           "vs_sft": _gain(ev["samples"], "rewards", policy, "sft"),
           "vs_base": _gain(ev["samples"], "rewards", policy, "base"),
           "judge_vs_sft": _gain(ev["samples"], "judge", policy, "sft"),
           "judge_vs_base": _gain(ev["samples"], "judge", policy, "base")}
    judge_ok = out["judge_vs_sft"] is not None
    if demo == "rlhf":
        rm = _last_eval(run_dir / "reward" / "metrics.jsonl")
        out["rm_accuracy"], out["rm_pairs"] = rm.get("accuracy"), rm.get("pairs")
        judge = _last_eval(run_dir / "judge" / "metrics.jsonl") if (run_dir / "judge").is_dir() else {}
        out["judge_accuracy"] = judge.get("accuracy")
        g, b, j = out["vs_sft"], out["vs_base"], out["judge_vs_sft"]
        out["holds"] = (g["mean"] >= 2 * g["se"] and b["mean"] >= 2 * b["se"] and judge_ok
                        and j["mean"] > -j["se"])
    else:
        dpo = _last_eval(run_dir / "dpo" / "metrics.jsonl")
        out["implicit_accuracy"], out["dpo_pairs"] = dpo.get("accuracy"), dpo.get("pairs")
        j = out["judge_vs_sft"]
        out["holds"] = bool(dpo.get("accuracy", 0) >= 0.6 and judge_ok and j["mean"] >= 2 * j["se"])
    return out


def _fmt_acc(acc: float | None, n: float | None) -> str:
    """An accuracy on n held-out pairs with its binomial s.e."""
    if acc is None:
        return "-"
    return f"{acc:.1%} ({proportion_se(acc, int(n)):.1%})" if n else f"{acc:.1%}"


def _fmt_gain(g: dict | None) -> str:
    return "-" if g is None else f"{g['mean']:+.3f} ({g['se']:.3f}); {g['wins']}/{g['losses']}"


def _minutes(run: dict) -> str:
    return "resumed" if run["minutes"] is None else f"{run['minutes']:.1f}"


def demo_table(demo: str, runs: list[dict]) -> str:
    if demo == "distill":
        body = distill_table(runs)
    elif demo == "tools":
        body = tools_table(runs)
    elif demo == "grpo":
        rows = [[r["seed"], f"{r['base_success']:.1%}", f"{r['rl_success']:.1%}",
                 f"{r['gain'] * 100:+.1f} ({r['gain_se'] * 100:.1f})", _minutes(r),
                 "yes" if r["holds"] else "**no**"] for r in runs]
        body = table(["seed", "base success", "GRPO success", "GRPO - base, points (s.e.)", "minutes", "holds"], rows)
    else:
        policy = "PPO" if demo == "rlhf" else "DPO"
        extra = "RM held-out acc." if demo == "rlhf" else "implicit-reward acc."
        acc = (lambda r: _fmt_acc(r.get("rm_accuracy"), r.get("rm_pairs"))) if demo == "rlhf" else (
            lambda r: _fmt_acc(r.get("implicit_accuracy"), r.get("dpo_pairs")))
        rows = [[r["seed"], _fmt_gain(r["vs_sft"]), _fmt_gain(r["vs_base"]), _fmt_gain(r["judge_vs_sft"]),
                 f"{r['kl'].get(policy.lower()) or 0:.2f}", acc(r),
                 _fmt_acc(r.get("judge_accuracy"), r.get("rm_pairs")),
                 _minutes(r), "yes" if r["holds"] else "**no**"] for r in runs]
        body = table(["seed", f"{policy} - SFT, RM (s.e.); wins/losses", f"{policy} - base, RM",
                      f"{policy} - SFT, judge", "KL to SFT", extra, "judge held-out acc.", "minutes", "holds"], rows)
    m = runs[-1]["machine"]
    return (f"{body}\n\nWritten by `bench/demos.py` ({DEMOS[demo]}) on {m['cores']} cores, {m['cpu_kind']} CPU, "
            f"dtype {runs[-1]['dtype']}, torch {m['torch']}, transformers {runs[-1]['transformers']}, "
            f"{m['measured'][:10]}; {sum(r['holds'] for r in runs)} of {len(runs)} seeds hold the bar. Minutes are "
            f"wall time with the machine's load at the end (1-min average: "
            f"{', '.join(str(r['machine']['load_avg_1min']) for r in runs)}; 2 = one job on 2 idle cores).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demos", nargs="*", default=list(DEMOS), metavar="DEMO", help=f"default: all of {list(DEMOS)}")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32"],
                    help="fp32 forces fp32 everywhere (how an AVX2 machine runs) on a bf16 machine")
    ap.add_argument("--readme", action="store_true", help="write each demo's table into README.md")
    ap.add_argument("--table-only", action="store_true", help="run nothing: tables from bench/results/demos/")
    args = ap.parse_args()
    if args.dtype == "fp32":  # what "auto" means in every step of the runs (models/loading.resolve_dtype)
        os.environ["CHATRL_AUTO_DTYPE"] = "fp32"
    for demo in args.demos:
        dest = OUT / f"{demo}-{args.dtype}.json"
        seeds = [] if args.table_only else [int(s) for s in args.seeds.split(",")]
        # earlier runs of other seeds stay in the table; a seed run again replaces its row
        runs = [r for r in (json.loads(dest.read_text())["runs"] if dest.exists() else []) if r["seed"] not in seeds]
        for seed in seeds:
            run_dir, seconds = run_demo(demo, seed, args.dtype, demo_overrides(demo, seed, args.dtype))
            runs.append({"seed": seed, "minutes": None if seconds is None else seconds / 60, "dtype": args.dtype,
                         "machine": machine(),
                         "transformers": transformers.__version__, **measure(demo, run_dir)})
            write_json(dest, {"demo": demo, "runs": runs})
        text = demo_table(demo, runs)
        print(text)
        if args.readme:
            update_readme(text, f"demo-{demo}-{args.dtype}")


if __name__ == "__main__":
    main()
