"""`chatrl env check SPEC`: try an environment before training with it; `chatrl env serve SPEC --port P`: serve
it as an OpenEnv server (openenv_server.py); `chatrl env eval SPEC --base-url URL --model NAME`: play it against
an OpenAI-compatible endpoint (remote_eval.py); `chatrl env demos SPEC --n N --out FILE`: SFT demonstrations from its
reference solutions (demos.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from chatrl.envs import openenv_server
from chatrl.envs.check import ACTIONS, CheckReport, run_check
from chatrl.envs.demos import write_demos
from chatrl.envs.registry import BUILTIN_ENVS
from chatrl.errors import ChatrlError
from chatrl.eval.endpoint_eval import connect, evaluate_endpoint
from chatrl.eval.env_eval import save_env_result
from chatrl.tools.toolbox import ToolOptions

PREVIEW = 160  # characters of the first observation shown


def register(subparsers: Any) -> None:
    env = subparsers.add_parser("env", help="text environments for RL (multi-turn, Gymnasium API)")
    sub = env.add_subparsers(dest="env_command", metavar="ACTION")
    check = sub.add_parser("check", help="play scripted episodes and report contract problems (exit 2 if any)")
    check.add_argument("spec", metavar="SPEC",
                       help=f"a built-in ({', '.join(BUILTIN_ENVS)}), reasoning_gym:TASK, openenv:URL, "
                            "verifiers:MODULE or 'pkg.module:Class' / 'file.py:Class'")
    check.add_argument("--kwargs", default="{}", help="constructor arguments as a JSON object (env.kwargs)")
    check.add_argument("--episodes", type=int, default=5, help="episodes per split (train and eval)")
    check.add_argument("--seed", type=int, default=0, help="seed of the first episode (then +1 per episode)")
    check.add_argument("--max-turns", type=int, default=8,
                       help="turns an episode may take (at least the environment's own max_turns)")
    check.add_argument("--tool-timeout", type=float, default=10.0,
                       help="seconds each of the environment's tools may take when played once (env.tool_timeout)")
    check.add_argument("--tokenizer", default="tiny-random",
                       help="model or tokenizer folder (or built-in alias) whose chat template is audited with tool "
                            "calls, when the environment has tools (default: the built-in models' SmolLM2 template)")
    check.set_defaults(func=cmd_check)
    serve = sub.add_parser("serve", help="serve an environment as an OpenEnv server (needs chatrl[openenv])",
                           description="Any chatrl environment over OpenEnv's HTTP/WebSocket protocol, built with "
                                       "openenv-core's server helpers; play it with env.name=openenv:URL.")
    serve.add_argument("spec", metavar="SPEC", help="an environment as for env.name (built-in, 'file.py:Class', ...)")
    serve.add_argument("--kwargs", default="{}", help="constructor arguments as a JSON object (env.kwargs)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    serve.add_argument("--max-sessions", type=int, default=64,
                       help="concurrent client sessions, one environment each (default 64)")
    serve.set_defaults(func=cmd_serve)
    ev = sub.add_parser("eval", help="play an environment against an OpenAI-compatible endpoint",
                        description="Held-out (eval split) tasks 0..N-1: greedy success and return, pass@K of K "
                                    "sampled episodes, with standard errors over the tasks.")
    ev.add_argument("spec", metavar="SPEC", help="an environment as for env.name")
    ev.add_argument("--base-url", required=True, help="the endpoint, e.g. http://localhost:8000/v1")
    ev.add_argument("--model", required=True, help="model name to request")
    ev.add_argument("--api-key-env", default=None,
                    help="environment variable holding the API key (default: none, for local servers)")
    ev.add_argument("--kwargs", default="{}", help="constructor arguments as a JSON object (env.kwargs)")
    ev.add_argument("--episodes", type=int, default=20, help="tasks, one greedy episode each (default 20)")
    ev.add_argument("--samples", type=int, default=4, help="sampled episodes per task for pass@K (default 4; 0 = none)")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@K (default 1)")
    ev.add_argument("--max-tokens", type=int, default=256, help="reply length limit per turn (default 256)")
    ev.add_argument("--max-turns", type=int, default=1, help="turns an episode may take (default 1)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    ev.add_argument("--out", default=None, help="write eval_env.json / eval_env.md to this folder")
    ev.set_defaults(func=cmd_eval)
    demos = sub.add_parser("demos", help="write SFT demonstrations (chat JSONL) from the environment's reference "
                                          "solutions, tool calls included",
                           description="Plays tasks 0, 1, ... of a split with the environment's solution(tools) "
                                       "replies (tool calls run for real) and writes the successful episodes as chat "
                                       "rows with the tools' schemas (`chatrl sft` reads them).")
    demos.add_argument("spec", metavar="SPEC", help="an environment with a solution(tools) method (e.g. arithmetic)")
    demos.add_argument("--kwargs", default="{}", help="constructor arguments as a JSON object (env.kwargs)")
    demos.add_argument("--n", type=int, default=200, help="demonstrations to write (default 200)")
    demos.add_argument("--out", required=True, help="the JSONL file to write")
    demos.add_argument("--tools", default="", help="comma-separated tools offered (env.tools), e.g. calculator")
    demos.add_argument("--tool-parser", default="auto", help="the call format written (env.tool_parser; auto = hermes)")
    demos.add_argument("--split", default="train", choices=["train", "eval"], help="tasks of this split (default train)")
    demos.add_argument("--seed", type=int, default=0, help="seed of the first episode (then +1 per task)")
    demos.set_defaults(func=cmd_demos)
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
    for call, result in report.tools:
        text = result.content.replace("\n", " ")
        print(f"  tool {call.name}({json.dumps(call.arguments)}): {result.status} in {result.latency:.3f} s -> "
              f"{text[:PREVIEW]}{'...' if len(text) > PREVIEW else ''}")
    if report.problems:
        print(f"{len(report.problems)} problem(s):")
        for problem in report.problems:
            print(f"  - {problem}")
    else:
        print("no problems found")


def cmd_check(args: argparse.Namespace) -> int:
    if args.episodes < 1 or args.max_turns < 1:
        raise ChatrlError("--episodes and --max-turns must be at least 1")
    if not args.tool_timeout > 0:
        raise ChatrlError("--tool-timeout must be a positive number of seconds")
    report = run_check(args.spec, parse_kwargs(args.kwargs), args.episodes, args.seed, args.max_turns,
                       tool_timeout=args.tool_timeout, tokenizer=args.tokenizer)
    print_report(args.spec, report, args.episodes)
    return 2 if report.problems else 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535 or args.max_sessions < 1:
        raise ChatrlError(f"--port must be in 0..65535 and --max-sessions at least 1 (got {args.port}, "
                          f"{args.max_sessions})")
    openenv_server.serve(args.spec, parse_kwargs(args.kwargs), host=args.host, port=args.port,
                         max_sessions=args.max_sessions)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.episodes < 1 or args.samples < 0 or args.max_tokens < 1 or args.max_turns < 1:
        raise ChatrlError("--episodes, --max-tokens and --max-turns must be at least 1 and --samples at least 0")
    endpoint = connect(args.base_url, args.model, args.api_key_env, args.max_tokens)
    score = evaluate_endpoint(endpoint, args.spec, parse_kwargs(args.kwargs), episodes=args.episodes,
                              samples=args.samples, temperature=args.temperature, max_turns=args.max_turns,
                              seed=args.seed)
    if args.out:
        print(f"wrote {save_env_result({args.model: score}, Path(args.out), args.spec)}")
    return 0


def cmd_demos(args: argparse.Namespace) -> int:
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    out = write_demos(args.out, args.spec, parse_kwargs(args.kwargs), args.n,
                      ToolOptions(tools=tools, tool_parser=args.tool_parser), split=args.split, seed=args.seed)
    print(f"wrote {args.n} demonstrations to {out}")
    return 0
