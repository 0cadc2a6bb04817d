"""bench/demo_tools.py: the tool-use demo's numbers from the eval_env.json its pipeline wrote (hand-made here):
paired differences against the base model with and without tools, the bar, and its README table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

from demo_tools import measure_tools, tools_table  # noqa: E402  (bench/demo_tools.py)

CALL = [{"role": "user", "content": "What is 47 * 86?"},
        {"role": "assistant", "content": '<tool_call>{"name": "calculator", "arguments": {"expression": "47*86"}}'
                                         '</tool_call>'},
        {"role": "tool", "name": "calculator", "content": "4042"},
        {"role": "assistant", "content": "The answer is 4042."}]


def model(per_task: list[bool], called: float, examples: list[dict] | None = None) -> dict:
    return {"success": sum(per_task) / len(per_task), "per_task": per_task, "n_tasks": len(per_task),
            "called_tools": called, "failed_calls": 0.0, "examples": examples or []}


def write_eval(run: Path, grpo: list[bool]) -> None:
    (run / "eval").mkdir(parents=True)
    models = {"base_no_tools": model([True, False, False, False], 0.0),
              "base": model([False, False, False, False], 0.0),
              "sft": model([True, True, False, False], 1.0),
              "grpo": model(grpo, 1.0, [{"conversation": CALL[:1], "success": False},
                                        {"conversation": CALL, "success": True}])}
    (run / "eval" / "eval_env.json").write_text(json.dumps({"env": "arithmetic", "models": models}))


def test_gains_are_paired_per_problem_and_the_bar_needs_both(tmp_path: Path) -> None:
    write_eval(tmp_path / "a", [True, True, True, False])
    m = measure_tools(tmp_path / "a")
    # grpo - base: diffs 1,1,1,0 -> mean 0.75, s.e. = sd(1,1,1,0)/2 = 0.5/2 = 0.25
    assert m["vs_tools"]["mean"] == pytest.approx(0.75) and m["vs_tools"]["se"] == pytest.approx(0.25)
    # grpo - no tools: diffs 0,1,1,0 -> mean 0.5, sd 0.5774, s.e. 0.2887; wins 2, no losses
    assert m["vs_no_tools"]["mean"] == pytest.approx(0.5) and m["vs_no_tools"]["se"] == pytest.approx(0.57735 / 2)
    assert (m["vs_no_tools"]["wins"], m["vs_no_tools"]["losses"]) == (2, 0)
    assert m["vs_sft"]["mean"] == pytest.approx(0.25) and m["holds"]
    assert m["called"] == {"no_tools": 0.0, "base": 0.0, "sft": 1.0, "grpo": 1.0}
    assert m["example"].startswith("user: What is 47 * 86? → assistant: <tool_call>")  # the solved episode
    write_eval(tmp_path / "b", [True, False, False, False])  # +25 over base with tools, 0 over no tools: misses
    assert not measure_tools(tmp_path / "b")["holds"]


def test_table_has_a_row_per_seed_and_an_episode(tmp_path: Path) -> None:
    write_eval(tmp_path, [True, True, True, False])
    runs = [{"seed": 1, "minutes": 12.5, "machine": {"threads": 1}, **measure_tools(tmp_path)},
            {"seed": 2, "minutes": None, "machine": {"threads": 2}, **measure_tools(tmp_path)}]
    text = tools_table(runs)
    assert "| 1 | 25.0% | 0.0% (0% called) | 50.0% (100% called) | 75.0% (100% called) | +75.0 (25.0) | +50.0 (28.9) " \
           "| +25.0 (25.0) | 12.5 | yes |" in text
    assert "| 2 |" in text and "resumed" in text and "4 held-out problems" in text and "tool: 4042" in text
    assert "Torch threads per run: 1, 2" in text
