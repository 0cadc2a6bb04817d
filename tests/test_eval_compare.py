"""Side-by-side text layout of `chatrl compare --plain` (pure functions, no model)."""

from __future__ import annotations

from chatrl.eval.compare import format_plain, side_by_side


def test_side_by_side_wraps_both_columns():
    text = side_by_side("one two three four", "alpha", width=9)
    # left wraps to "one two" / "three" / "four"; right is "alpha" on the first line only
    assert text.splitlines() == ["one two   | alpha", "three     |", "four      |"]


def test_format_plain_lists_each_prompt_with_both_replies():
    rows = [{"prompt": "Hi?", "baseline": "hello", "model": ""},
            {"prompt": "Count", "baseline": "1 2", "model": "1 2 3"}]
    out = format_plain(rows, ("sft", "ppo"), "greedy", width=60)
    lines = out.splitlines()
    assert lines[0] == "========== Prompt 1 ==========" and lines[1] == "Hi?"
    assert lines[2].startswith("[sft: greedy]") and lines[2].endswith("[ppo: greedy]")
    assert lines[3].startswith("hello") and lines[3].endswith("(empty)")
    assert "========== Prompt 2 ==========" in lines and lines[-1].endswith("| 1 2 3")
