"""`chatrl env check` on an environment with tools: every tool is played once with arguments from its schema
(result, latency, errors), a hanging tool is a timeout within --tool-timeout, and the chat template is audited."""

from __future__ import annotations

import time

from chatrl.envs.check import run_check
from chatrl.models.loading import load_tokenizer
from helpers import run_cli
from test_tools_audit import DRIFTING
from tool_fixtures import RELEASE


def test_each_tool_is_played_and_failures_are_problems():
    RELEASE.clear()
    t0 = time.perf_counter()
    try:
        report = run_check("tool_fixtures:AddEnv", {"tools": ["tool_fixtures:add", "tool_fixtures:hang",
                                                              "tool_fixtures:explode"]},
                           episodes=1, tool_timeout=0.3, tokenizer="tiny-random")
    finally:
        RELEASE.set()
    assert time.perf_counter() - t0 < 5  # the hanging tool costs its timeout, not its 60 s
    assert [(c.name, c.arguments, r.status, r.content) for c, r in report.tools] == [
        ("add", {"a": 2, "b": 2}, "ok", "4"), ("hang", {"a": 2}, "timeout", "Error: hang timed out after 0.3 s"),
        ("explode", {"a": 2}, "error", "Error: explode raised RuntimeError: the tool broke / second line")]
    assert report.problems == [
        "tool hang: called with {'a': 2}: Error: hang timed out after 0.3 s",
        "tool explode: called with {'a': 2}: Error: explode raised RuntimeError: the tool broke / second line"]


def test_env_check_audits_the_template(tmp_path):
    tok = load_tokenizer("tiny-random")
    tok.chat_template = DRIFTING
    tok.save_pretrained(tmp_path / "drift")
    report = run_check("tool_fixtures:AddEnv", {}, episodes=1, tokenizer=str(tmp_path / "drift"))
    [problem] = report.problems
    assert problem.startswith(f"template of {tmp_path / 'drift'}: chat template audit: adding message 4")


def test_env_check_cli_shows_tool_results():
    proc = run_cli("env", "check", "arithmetic", "--kwargs", '{"tools": ["calculator"]}', "--episodes", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert 'tool calculator({"expression": "1 + 2"}): ok in ' in proc.stdout and "-> 3" in proc.stdout
    bad = run_cli("env", "check", "arithmetic", "--kwargs", '{"tools": ["abacus"]}', "--episodes", "1")
    assert bad.returncode == 2 and "arithmetic: tools: unknown tool 'abacus'" in bad.stdout


def test_the_readme_example_passes_env_check(tmp_path, repo_root):
    readme = (repo_root / "README.md").read_text()
    start = readme.index("# tool_envs.py  ->")
    code = readme[readme.index("\n", start) + 1:readme.index("```", start)]
    (tmp_path / "tool_envs.py").write_text(code)
    report = run_check(f"{tmp_path / 'tool_envs.py'}:Shop", {}, episodes=2, tokenizer="tiny-random")
    assert report.problems == [] and len(report.returns) == 4
    assert [(c.name, c.arguments, r.content) for c, r in report.tools] == [
        ("price", {"item": "apple"}, "0.5"), ("calculator", {"expression": "1 + 2"}, "3")]
