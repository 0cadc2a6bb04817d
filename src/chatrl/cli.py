"""The `chatrl` command: thin. Parses arguments, then hands over to one step or tool.

Each feature module exposes `register(subparsers)` that adds its sub-command(s); commands set
`func(args) -> int | None`. Any `ChatrlError` is printed without a traceback (exit code 2).
"""

from __future__ import annotations

import argparse
import sys

# OpenMP's wait policy is left to the user: libgomp's default (spin briefly, then sleep) makes decoding ~2x
# faster than OMP_WAIT_POLICY=PASSIVE on an idle machine (bench/README.md, machine note); on cores shared with other busy
# processes, spinning threads can stall every op (40x measured here), and PASSIVE is the fix (README).
from chatrl.data import commands as data_commands
from chatrl.envs import commands as env_commands
from chatrl.errors import ChatrlError
from chatrl.eval import commands as eval_commands
from chatrl.export import commands as export_commands
from chatrl.feedback import commands as feedback_commands
from chatrl.serve import commands as serve_commands
from chatrl.steps import commands as step_commands

# Modules that add sub-commands; each has `register(subparsers)`.
COMMAND_MODULES = [
    step_commands,     # sft, reward, ppo, grpo, rft, dpo, ilql, pipeline, demo
    data_commands,     # data inspect, data prepare
    eval_commands,     # eval, compare, report, score
    serve_commands,    # chat, serve
    env_commands,      # env check (text environments for RL)
    export_commands,   # export --format gguf (llama.cpp, ollama)
    feedback_commands, # users add|list, feedback stats|export (chatrl serve --db)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatrl", description="Chat models by RL: SFT -> reward model -> "
                                                                "PPO/GRPO/RFT, or DPO/ILQL offline.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
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
