"""The on-policy distillation demo (issue 22) for bench/demos.py: the base SmolLM2 (student) distils the GRPO demo's
actor (teacher) of the same seed and dtype on two-digit addition (configs/distill-arithmetic.yaml), and is compared
with GRPO from scratch (the teacher's own run) at equal training wall time.

Per iteration both runs log `success_rate`, the share of that iteration's rollout episodes that succeeded: problems
the policy had never trained on (the prompt cursor only moves forward), sampled at temperature 1, before that
iteration's update. Their training time is the sum of the logged phase times (`time_*`: generation, scoring,
rewards, update), so checkpoints, evaluation and start-up count in neither run. Held-out greedy success on the
environment's eval split (200 problems, paired with base) comes from each pipeline's eval.

Bar (issue 22): the distilled student beats the base model on the held-out problems by >= 2 s.e. of the paired
difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import yaml
from common import table

from chatrl.eval.metrics import proportion_se

WINDOW = 5  # iterations averaged per point of a curve: one iteration's 64 episodes give a s.e. of ~6 points


def teacher_run(run_dir: Path) -> Path:
    """The GRPO demo run of the same seed and dtype (runs/demos/grpo-<dtype>-s<seed>): its actor is the teacher."""
    return run_dir.with_name(run_dir.name.replace("distill-", "grpo-", 1))


def curve(metrics: Path) -> list[tuple[float, float]]:
    """(training minutes so far, rollout success) per iteration, from a run's metrics.jsonl (a resumed run logs an
    iteration twice: the last row counts)."""
    rows = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "train":
            rows[row["step"]] = row
    out, seconds = [], 0.0
    for step in sorted(rows):
        seconds += sum(v for k, v in rows[step].items() if k.startswith("time_"))
        out.append((seconds / 60, rows[step]["success_rate"]))
    return out


def episodes_per_iteration(step_dir: Path) -> int | None:
    """Episodes one iteration plays (rollout.prompts_per_rollout x samples_per_prompt of the step's config.yaml)."""
    path = step_dir / "config.yaml"
    if not path.exists():
        return None
    rollout = yaml.safe_load(path.read_text()).get("rollout", {})
    return int(rollout["prompts_per_rollout"]) * int(rollout["samples_per_prompt"])


def success_by(points: list[tuple[float, float]], minutes: float) -> float | None:
    """Mean rollout success of the last WINDOW iterations finished within `minutes` (None: none finished)."""
    done = [s for m, s in points if m <= minutes + 1e-9]
    return mean(done[-WINDOW:]) if done else None


def measure_distill(run_dir: Path) -> dict:
    """The distillation demo's numbers, from the files its pipeline and the teacher's pipeline wrote."""
    models = json.loads((run_dir / "eval" / "eval_env.json").read_text())["models"]
    grpo_dir = teacher_run(run_dir)
    teacher = json.loads((grpo_dir / "eval" / "eval_env.json").read_text())["models"]["grpo"]
    d, g = curve(run_dir / "distill" / "metrics.jsonl"), curve(grpo_dir / "grpo" / "metrics.jsonl")
    equal = min(d[-1][0], g[-1][0])  # the shorter run's training time: both runs had at least that long
    base, student = models["base"], models["distill"]
    return {"base_success": base["success"], "distill_success": student["success"], "gain": student["vs_first"],
            "gain_se": student["vs_first_se"], "teacher_success": teacher["success"],
            "distill_train_minutes": d[-1][0], "grpo_train_minutes": g[-1][0], "equal_minutes": equal,
            "distill_at_equal": success_by(d, equal), "grpo_at_equal": success_by(g, equal),
            "curves": {"distill": d, "grpo": g},
            "episodes": {"distill": episodes_per_iteration(run_dir / "distill"),
                         "grpo": episodes_per_iteration(grpo_dir / "grpo")},
            "holds": student["vs_first"] >= 2 * student["vs_first_se"]}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _window_cell(success: float, episodes: int | None) -> str:
    """A window's mean success with its binomial s.e. over the window's episodes (taken as independent: a GRPO
    group's samples share a prompt, so its s.e. is somewhat larger than shown)."""
    if episodes is None:
        return _pct(success)
    return f"{success:.1%} ({proportion_se(success, WINDOW * episodes) * 100:.1f})"


def curve_table(run: dict) -> str:
    """Both runs' rollout success every WINDOW iterations (mean of the window, s.e.) with the training minutes so
    far."""
    d, g = run["curves"]["distill"], run["curves"]["grpo"]
    episodes = run.get("episodes", {})
    rows = []
    for end in range(WINDOW, max(len(d), len(g)) + 1, WINDOW):
        cells = [end]
        for name, points in (("distill", d), ("grpo", g)):
            window = points[end - WINDOW:end]
            cells += ([f"{window[-1][0]:.1f}", _window_cell(mean(s for _, s in window), episodes.get(name))]
                      if len(window) == WINDOW else ["-", "-"])
        rows.append(cells)
    return table(["iteration", "distill: minutes", "distill: rollout success (s.e.)", "GRPO: minutes",
                  "GRPO: rollout success (s.e.)"], rows)


def distill_table(runs: list[dict]) -> str:
    """One row per seed, then the last seed's curves."""
    rows = [[r["seed"], _pct(r["base_success"]), _pct(r["teacher_success"]), _pct(r["distill_success"]),
             f"{r['gain'] * 100:+.1f} ({r['gain_se'] * 100:.1f})",
             f"{r['distill_train_minutes']:.1f} / {r['grpo_train_minutes']:.1f}",
             f"{_pct(r['distill_at_equal'])} / {_pct(r['grpo_at_equal'])} ({r['equal_minutes']:.1f} min)",
             "yes" if r["holds"] else "**no**"] for r in runs]
    head = table(["seed", "base success", "teacher (GRPO) success", "distilled success",
                  "distilled - base, points (s.e.)", "training minutes: distill / GRPO",
                  f"rollout success at equal time: distill / GRPO (last {WINDOW} iterations)", "holds"], rows)
    return (f"{head}\n\nSuccess: greedy, on the environment's 200 held-out problems. Rollout success: the "
            f"iteration's own fresh problems, sampled at temperature 1, before its update; seed {runs[-1]['seed']} "
            f"every {WINDOW} iterations:\n\n{curve_table(runs[-1])}")
