"""CLI sub-commands of the training steps: `chatrl sft|reward|ppo --config FILE [section.field=value ...]`.

Each step is registered once from the table `STEPS`; `--help` lists every config field with its type,
default and help text (taken from the config dataclasses, written once).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from chatrl.configbase import help_lines, load_config

# command -> (config class path, runner path, one-line description)
STEPS: dict[str, tuple[str, str, str]] = {
    "sft": ("chatrl.config:SFTConfig", "chatrl.steps.sft:run_sft", "step 1: supervised fine-tuning"),
    "reward": ("chatrl.config:RewardConfig", "chatrl.steps.reward:run_reward", "step 2: train a reward model"),
    "ppo": ("chatrl.config:PPOConfig", "chatrl.steps.ppo:run_ppo", "step 3: RLHF with PPO"),
}


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _run_step(args: argparse.Namespace) -> int:
    cfg = load_config(_load(args.config_class), args.config, args.overrides)
    runner = _load(args.runner)
    result = runner(cfg)
    try:
        from chatrl.engine.deepspeed import shutdown_distributed

        shutdown_distributed()
    finally:
        if result is not None:
            print(f"done: {result}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (config_path, runner, desc) in STEPS.items():
        try:
            config_cls = _load(config_path)
        except AttributeError:  # step not built yet
            continue
        p = subparsers.add_parser(name, help=desc, description=desc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="config fields (set in YAML or as section.field=value):\n" +
                                         "\n".join(help_lines(config_cls)))
        p.add_argument("--config", help="YAML config file (fields below); omitted = defaults")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, applied after the YAML")
        p.set_defaults(func=_run_step, config_class=config_path, runner=runner)
