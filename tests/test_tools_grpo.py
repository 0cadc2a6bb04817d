"""`chatrl grpo` with a tool environment on the tiny model, through the real CLI: one iteration in which every
reply calls the built-in calculator (a user parser reads every reply as a call: a random model writes none), the
calls are answered inside the turn and counted in metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from helpers import read_metrics, run_cli


def test_one_grpo_iteration_with_tool_calls(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("grpo", "--config", "configs/tiny-grpo.yaml", f"output_dir={out}", "env.name=arithmetic",
                   "env.tools=[calculator]", "env.tool_parser=tool_fixtures:every_reply_calls", "env.max_tool_calls=1",
                   "data.max_prompt_length=512", "grpo.iterations=1", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = read_metrics(out)
    # 4 prompts x 4 samples, one call each (the budget of 1: the second reply goes to env.step)
    assert row["tool/calls"] == 16 and row["tool/calls_per_episode"] == 1
    assert row["tool/errors"] == 0 and row["tool/timeouts"] == 0 and row["tool/malformed"] == 0
    assert 0 < row["tool/latency_s/calculator"] < 10
    assert row["turns"] == 1  # tool rounds are inside the turn
