"""The tool-use demo (issue 20) for bench/demos.py: SmolLM2-135M-Instruct learns to call the calculator on
two-digit multiplication (configs/demo-tools.yaml: SFT on the environment's demonstrations, then GRPO with the
calculator offered).

The pipeline's eval plays the same 200 held-out problems (greedy) with: (a) the base model with no tools offered
(`base_no_tools`), (b) the base model with the calculator, the SFT model with it, and (c) the GRPO model with it.
Differences are per problem, so their s.e. is the paired one (`chatrl.eval.metrics.paired_difference`).

Bar (issue 20): (c) - (b) >= 20 points and (c) - (a) >= 20 points.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import table

from chatrl.eval.metrics import paired_difference

BAR = 0.20
ROWS = {"no_tools": "base_no_tools", "base": "base", "sft": "sft", "grpo": "grpo"}


def _diff(models: dict, new: str, old: str) -> dict:
    d = paired_difference([float(x) for x in models[new]["per_task"]], [float(x) for x in models[old]["per_task"]])
    return {"mean": d.mean, "se": d.se, "wins": d.wins, "losses": d.losses}


def example_line(models: dict, name: str) -> str:
    """One of the model's sample episodes (a solved one if any), its messages on one line."""
    examples = models[name]["examples"]
    ex = next((e for e in examples if e["success"]), examples[0] if examples else None)
    if ex is None:
        return "-"
    return " → ".join(f"{m['role']}: {' '.join(m['content'].split())}" for m in ex["conversation"])


def measure_tools(run_dir: Path) -> dict:
    """The demo's numbers, from the eval_env.json its pipeline wrote."""
    models = json.loads((run_dir / "eval" / "eval_env.json").read_text())["models"]
    out = {key: models[name]["success"] for key, name in ROWS.items()}
    out.update(n_tasks=models["grpo"]["n_tasks"], vs_tools=_diff(models, "grpo", "base"),
               vs_no_tools=_diff(models, "grpo", "base_no_tools"), vs_sft=_diff(models, "grpo", "sft"),
               called={key: models[name].get("called_tools", 0.0) for key, name in ROWS.items()},
               failed_calls={key: models[name].get("failed_calls", 0.0) for key, name in ROWS.items()},
               example=example_line(models, "grpo"))
    out["holds"] = out["vs_tools"]["mean"] >= BAR and out["vs_no_tools"]["mean"] >= BAR
    return out


def _points(d: dict) -> str:
    return f"{d['mean'] * 100:+.1f} ({d['se'] * 100:.1f})"


def _with_calls(run: dict, key: str) -> str:
    """Success, and the share of episodes that called the calculator."""
    return f"{run[key]:.1%} ({run['called'][key]:.0%} called)"


def tools_table(runs: list[dict]) -> str:
    """One row per seed, then one GRPO episode of the last seed."""
    rows = [[r["seed"], f"{r['no_tools']:.1%}", _with_calls(r, "base"), _with_calls(r, "sft"), _with_calls(r, "grpo"),
             _points(r["vs_tools"]), _points(r["vs_no_tools"]), _points(r["vs_sft"]),
             "resumed" if r["minutes"] is None else f"{r['minutes']:.1f}", "yes" if r["holds"] else "**no**"]
             for r in runs]
    head = table(["seed", "(a) base, no tools", "(b) base + calculator", "SFT + calculator", "(c) GRPO + calculator",
                  "c - b, points (s.e.)", "c - a", "c - SFT", "minutes", "holds"], rows)
    threads = [str(r["machine"]["threads"]) for r in runs if "machine" in r]
    note = f" Torch threads per run: {', '.join(threads)} (minutes at 1 thread are not 2 cores' minutes)." if threads else ""
    return (f"{head}\n\nSuccess: greedy, on the environment's {runs[-1]['n_tasks']} held-out problems (the same for "
            f"every row; differences are paired); in brackets, the share of episodes with at least one tool call. "
            f"A GRPO episode (seed {runs[-1]['seed']}): `{runs[-1]['example']}`.{note}")
