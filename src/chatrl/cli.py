"""The `chatrl` command: thin. Parses arguments, then hands over to one step or tool.

Each feature module exposes `register(subparsers)` that adds its sub-command(s); commands set
`func(args) -> int | None`. Any `ChatrlError` is printed without a traceback (exit code 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# OpenMP's wait policy is left to the user: libgomp's default (spin briefly, then sleep) makes decoding ~2x
# faster than OMP_WAIT_POLICY=PASSIVE on an idle machine (bench/README.md); on cores shared with other busy
# processes, spinning threads can stall every op (40x measured here), and PASSIVE is the fix (README).
from chatrl.errors import ChatrlError

# Modules that add sub-commands; each has `register(subparsers)`.
COMMAND_MODULES = [
    "chatrl.steps.commands",     # sft, reward, ppo, pipeline, demo
    "chatrl.data.commands",      # data inspect, data prepare
    "chatrl.eval.commands",      # eval, compare, report, score
    "chatrl.serve.commands",     # chat, serve
    "chatrl.envs.commands",      # env check (text environments for RL)
    "chatrl.export.commands",    # export --format gguf (llama.cpp, ollama)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatrl", description="RLHF for chat models: SFT -> reward model -> PPO.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # feature not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come before or after flags (argparse would only take them in one block)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except ChatrlError as e:
        print(f"chatrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
