"""`chatrl env check` through the real CLI: exit 0 on a clean environment, 2 with the problem named otherwise."""

from __future__ import annotations

from helpers import run_cli


def test_env_check_on_a_builtin_is_clean() -> None:
    proc = run_cli("env", "check", "arithmetic", "--kwargs", '{"digits": 1, "ops": ["+", "*"]}', "--episodes", "3",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "environment arithmetic: 6 of 6 episodes finished" in proc.stdout
    assert "success 0/6" in proc.stdout and "no problems found" in proc.stdout


def test_env_check_on_a_broken_env_names_the_problem() -> None:
    spec = "tests/fixtures/envs/custom_envs.py:NanRewardEnv"
    proc = run_cli("env", "check", spec, "--episodes", "2", timeout=300)
    assert proc.returncode == 2
    assert f"environment '{spec}' step() returned reward nan: expected a finite number" in proc.stdout
    assert "1 problem(s)" in proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_env_check_bad_kwargs_is_a_one_line_error() -> None:
    proc = run_cli("env", "check", "arithmetic", "--kwargs", "{digits: 3}", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("chatrl: error: --kwargs is not valid JSON")
