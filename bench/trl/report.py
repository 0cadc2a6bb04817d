"""Pure arithmetic and printing of `bench/vs_trl.py`: per-run medians, medians over runs, TRL/chatrl ratios, the
equal-work check and the tables. No I/O besides returning strings (tested in tests/test_bench_vs_trl.py)."""

from __future__ import annotations

import statistics
from typing import Any

PHASES = ("generate", "score", "train")
TARGETS = {"ppo": 4.0, "grpo": 3.0}  # TRL s/iteration / chatrl s/iteration the speed issue asks for


def steady(iterations: list[dict[str, float]]) -> list[dict[str, float]]:
    """Iterations 2..K (the first one pays for warm-ups on both sides); all of them when there is only one."""
    return iterations[1:] if len(iterations) > 1 else iterations


def run_summary(iterations: list[dict[str, float]], peak_rss_gib: float | None) -> dict[str, Any]:
    """Medians of one run over its steady iterations: seconds and each phase it measured."""
    its = steady(iterations)
    out: dict[str, Any] = {"seconds": statistics.median(i["seconds"] for i in its), "iterations_used": len(its),
                           "peak_rss_gib": peak_rss_gib}
    for p in PHASES:
        vals = [i[p] for i in its if p in i]
        out[p] = statistics.median(vals) if len(vals) == len(its) else None
    return out


def compare(chatrl_runs: list[dict[str, Any]], trl_runs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Median over runs per system, the ratio TRL/chatrl per pair (run i of each) and overall (of the medians)."""
    def over(runs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    med = {name: {k: over(runs, k) for k in ("seconds", *PHASES, "peak_rss_gib")}
           for name, runs in (("chatrl", chatrl_runs), ("trl", trl_runs))}
    pairs = [t["seconds"] / c["seconds"] for c, t in zip(chatrl_runs, trl_runs, strict=True)]
    overall = med["trl"]["seconds"] / med["chatrl"]["seconds"]
    phase_ratios = {p: med["trl"][p] / med["chatrl"][p] for p in PHASES
                    if med["trl"][p] and med["chatrl"][p]}
    return {"median": med, "ratio_per_pair": pairs, "ratio": overall, "phase_ratios": phase_ratios,
            "target": TARGETS[kind], "met": overall >= TARGETS[kind]}


def work_mismatches(chatrl_counts: list[dict[str, Any]], trl_counts: list[dict[str, Any]]) -> list[str]:
    """What differs between the per-iteration token counts of the two sides ([] = the same work)."""
    problems = []
    if len(chatrl_counts) != len(trl_counts):
        problems.append(f"iterations: chatrl {len(chatrl_counts)}, trl {len(trl_counts)}")
    for k, (c, t) in enumerate(zip(chatrl_counts, trl_counts, strict=False), start=1):
        for key in ("sequences", "prompt_tokens", "new_tokens"):
            if c.get(key) != t.get(key):
                problems.append(f"iteration {k} {key}: chatrl {c.get(key)}, trl {t.get(key)}")
    return problems


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(title: str, chatrl_runs: list[dict[str, Any]], trl_runs: list[dict[str, Any]],
          cmp: dict[str, Any], trl_version: str) -> str:
    """A markdown table: one row per system (s/iteration of each run, median phases, peak RSS), then ratios."""
    lines = [f"### {title}", "",
             "| system | s/iteration (each run) | median | generate | score | train | peak RSS GiB (each run) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, runs in (("chatrl", chatrl_runs), (f"TRL {trl_version}", trl_runs)):
        med = cmp["median"]["trl" if name.startswith("TRL") else "chatrl"]
        lines.append(f"| {name} | {', '.join(_f(r['seconds']) for r in runs)} | {_f(med['seconds'])} | "
                     f"{_f(med['generate'])} | {_f(med['score'])} | {_f(med['train'])} | "
                     f"{', '.join(_f(r['peak_rss_gib']) for r in runs)} |")
    per_pair = ", ".join(f"{r:.2f}x" for r in cmp["ratio_per_pair"])
    phases = ", ".join(f"{p} {r:.2f}x" for p, r in cmp["phase_ratios"].items())
    lines += ["", f"TRL/chatrl s/iteration: per pair {per_pair}; overall {cmp['ratio']:.2f}x "
                  f"(target >= {cmp['target']:.1f}x: {'met' if cmp['met'] else 'NOT met'}); by phase: {phases}"]
    return "\n".join(lines)
