"""bench/demo_distill.py: the distillation demo's numbers from the files two pipelines wrote (hand-made here), the
equal-wall-time comparison with GRPO from scratch, and its README table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import demos  # noqa: E402  (bench/demos.py)
from demo_distill import curve, success_by  # noqa: E402


def write_run(folder: Path, step_dir: str, models: dict, iterations: list[tuple[float, float]],
              prompts: int = 64, samples: int = 1) -> None:
    """A finished pipeline run: eval/eval_env.json and the step's metrics.jsonl with (seconds, success) per iteration
    (split over two phase times; one eval row in between, which must be ignored)."""
    (folder / "eval").mkdir(parents=True)
    (folder / step_dir).mkdir()
    (folder / "eval" / "eval_env.json").write_text(json.dumps({"env": "arithmetic", "models": models}))
    rows = [{"step": i + 1, "split": "train", "success_rate": s, "time_generate": t / 4, "time_train": 3 * t / 4,
             "time": 1e9 + i} for i, (t, s) in enumerate(iterations)]
    rows.insert(1, {"step": 1, "split": "eval", "time_generate": 999.0})
    (folder / step_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    (folder / step_dir / "config.yaml").write_text(
        f"rollout:\n  prompts_per_rollout: {prompts}\n  samples_per_prompt: {samples}\n")


def test_the_distillation_demo_is_measured_against_grpo_at_equal_training_time(tmp_path: Path) -> None:
    demos_dir = tmp_path / "runs" / "demos"
    distill, grpo = demos_dir / "distill-auto-s1", demos_dir / "grpo-auto-s1"
    base = {"success": 0.18, "vs_first": None, "vs_first_se": None}
    write_run(distill, "distill", {"base": base, "distill": {"success": 0.30, "vs_first": 0.12, "vs_first_se": 0.03}},
              [(60.0, 0.1), (60.0, 0.2), (60.0, 0.3), (60.0, 0.4), (60.0, 0.5), (60.0, 0.6)])
    # GRPO: 30 s per iteration, 10 iterations = 5 minutes; distill: 6 x 60 s = 6 minutes
    write_run(grpo, "grpo", {"base": base, "grpo": {"success": 0.40, "vs_first": 0.22, "vs_first_se": 0.03}},
              [(30.0, 0.05 * k) for k in range(1, 11)], prompts=8, samples=8)
    assert [m for m, _ in curve(grpo / "grpo" / "metrics.jsonl")][:3] == pytest.approx([0.5, 1.0, 1.5])
    out = demos.measure("distill", distill)
    # equal time = the shorter run, GRPO's 5.0 minutes: distill had finished 5 iterations by then, their mean
    # success (0.1 .. 0.5) = 0.3; GRPO's last 5 of 10: 0.30 .. 0.50 -> 0.40
    assert out["equal_minutes"] == pytest.approx(5.0) and out["distill_train_minutes"] == pytest.approx(6.0)
    assert out["distill_at_equal"] == pytest.approx(0.3) and out["grpo_at_equal"] == pytest.approx(0.4)
    assert out["teacher_success"] == 0.40 and out["holds"] is True  # +12 points, 4 s.e.
    assert success_by(out["curves"]["grpo"], 0.4) is None  # nothing finished within 0.4 minutes
    row = {"seed": 1, "minutes": 7.5, "dtype": "auto", "transformers": "5", "machine": {
        "cores": 2, "cpu_kind": "AVX2", "torch": "2.13", "measured": "2026-12-02T08:00", "load_avg_1min": 2.0}}
    text = demos.demo_table("distill", [{**row, **out}])
    assert "| 1 | 18.0% | 40.0% | 30.0% | +12.0 (3.0) | 6.0 / 5.0 | 30.0% / 40.0% (5.0 min) | yes |" in text, text
    # the curve every 5 iterations: distill's 6 iterations give one full window, GRPO's 10 two; s.e. over the
    # window's 5 x 64 = 320 episodes: sqrt(.3 * .7 / 320) = 0.0256, sqrt(.15 * .85 / 320) = 0.0200,
    # sqrt(.4 * .6 / 320) = 0.0274
    assert "| 5 | 5.0 | 30.0% (2.6) | 2.5 | 15.0% (2.0) |" in text, text
    assert "| 10 | - | - | 5.0 | 40.0% (2.7) |" in text, text
    assert "1 of 1 seeds hold the bar" in text


def test_the_distillation_demo_takes_the_same_seeds_grpo_actor_as_its_teacher(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(demos, "ROOT", tmp_path)
    ran = []
    monkeypatch.setattr(demos, "run_demo", lambda *args: ran.append(args))
    overrides = demos.demo_overrides("distill", 2, "fp32")
    assert overrides == [f"distill.grpo.teacher={tmp_path / 'runs/demos/grpo-fp32-s2/grpo/actor'}"]
    assert ran == [("grpo", 2, "fp32", [])]  # the teacher's run had not finished: it runs first
    assert demos.demo_overrides("grpo", 2, "fp32") == []
