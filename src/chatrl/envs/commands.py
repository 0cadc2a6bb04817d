"""`chatrl env check SPEC [--kwargs JSON] [--episodes N]`: try an environment before training with it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from chatrl.envs.check import ACTIONS, CheckReport, run_check
from chatrl.envs.registry import BUILTIN_ENVS
from chatrl.errors import ChatrlError

PREVIEW = 160  # characters of the first observation shown


def register(subparsers: Any) -> None:
    env = subparsers.add_parser("env", help="text environments for RL (multi-turn, Gymnasium API)")
    sub = env.add_subparsers(dest="env_command", metavar="ACTION")
    check = sub.add_parser("check", help="play scripted episodes and report contract problems (exit 2 if any)")
    check.add_argument("spec", metavar="SPEC",
                       help=f"a built-in ({', '.join(BUILTIN_ENVS)}) or 'pkg.module:Class' / 'file.py:Class'")
    check.add_argument("--kwargs", default="{}", help="constructor arguments as a JSON object (env.kwargs)")
    check.add_argument("--episodes", type=int, default=5, help="episodes per split (train and eval)")
    check.add_argument("--seed", type=int, default=0, help="seed of the first episode (then +1 per episode)")
    check.add_argument("--max-turns", type=int, default=8,
                       help="turns an episode may take (at least the environment's own max_turns)")
    check.set_defaults(func=cmd_check)
    env.set_defaults(func=lambda args: env.print_help() or 1)


def parse_kwargs(text: str, flag: str = "--kwargs") -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatrlError(f"{flag} is not valid JSON ({e.msg} at column {e.colno}): {text[:100]}") from None
    if not isinstance(value, dict):
        raise ChatrlError(f"{flag} must be a JSON object like '{{\"digits\": 3}}', got {type(value).__name__}")
    return value


def print_report(spec: str, report: CheckReport, episodes: int) -> None:
    n = len(report.returns)
    print(f"environment {spec}: {n} of {2 * episodes} episodes finished (train and eval, replies cycling "
          f"through {ACTIONS})")
    if report.first:
        text = " | ".join(f"{m['role']}: {m['content']}" for m in report.first).replace("\n", " ")
        print(f"  first observation: {text[:PREVIEW]}{'...' if len(text) > PREVIEW else ''}")
    if n:
        success = (f"{sum(report.successes)}/{len(report.successes)}" if report.successes else "n/a (no info['success'])")
        print(f"  mean return {sum(report.returns) / n:.3f}  success {success}  "
              f"turns mean {sum(report.turns) / n:.1f} max {max(report.turns)}")
    if report.problems:
        print(f"{len(report.problems)} problem(s):")
        for problem in report.problems:
            print(f"  - {problem}")
    else:
        print("no problems found")


def cmd_check(args: argparse.Namespace) -> int:
    if args.episodes < 1 or args.max_turns < 1:
        raise ChatrlError("--episodes and --max-turns must be at least 1")
    report = run_check(args.spec, parse_kwargs(args.kwargs), args.episodes, args.seed, args.max_turns)
    print_report(args.spec, report, args.episodes)
    return 2 if report.problems else 0
