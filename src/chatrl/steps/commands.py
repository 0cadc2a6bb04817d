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
    "ppo": ("chatrl.config_rl:PPOConfig", "chatrl.steps.rl:run_ppo", "step 3: RLHF with PPO"),
    "dpo": ("chatrl.config_offline:DPOConfig", "chatrl.steps.dpo:run_dpo",
            "offline alignment on preference pairs: DPO, cDPO, IPO, SimPO, ORPO"),
    "grpo": ("chatrl.config_rl:GRPOConfig", "chatrl.steps.rl:run_grpo",
             "critic-free RL (GRPO family) in an environment"),
    "ilql": ("chatrl.config_offline:ILQLConfig", "chatrl.steps.ilql:run_ilql",
             "offline Q-learning for language (ILQL): Q/V heads from scored data, Q-guided decoding"),
    "rft": ("chatrl.config_offline:RFTConfig", "chatrl.steps.rft:run_rft",
            "fine-tuning from evaluation: best-of-n sampling, scoring, SFT on the best; rounds"),
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
    _register_pipeline(subparsers)


def _parse_steps(text: str | None) -> list[int] | None:
    from chatrl.errors import ChatrlError

    if text is None:  # the algorithm's default
        return None
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        steps = []
    if not steps or any(s not in (1, 2, 3) for s in steps):
        raise ChatrlError(f"--steps {text!r}: expected a comma list of 1 (sft), 2 (reward), 3 (ppo, grpo or dpo)")
    return steps


def _run_pipeline(args: argparse.Namespace) -> int:
    from chatrl.config import PipelineConfig
    from chatrl.engine.deepspeed import shutdown_distributed
    from chatrl.steps.pipeline import run_pipeline

    config = args.config
    if args.command == "demo":
        from chatrl.paths import REPO_ROOT

        config = str(REPO_ROOT / "configs" / "demo.yaml")
    cfg = load_config(PipelineConfig, config, args.overrides)
    run_pipeline(cfg, _parse_steps(args.steps), force=args.force)
    shutdown_distributed()
    return 0


def _register_pipeline(subparsers: argparse._SubParsersAction) -> None:
    from chatrl.config import PipelineConfig

    for name, desc in (("pipeline", "SFT -> reward model -> PPO -> eval -> report in one run directory"),
                       ("demo", "the built-in demo: the pipeline on SmolLM2-135M-Instruct and hh-rlhf harmless")):
        p = subparsers.add_parser(name, help=desc, description=desc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="config fields:\n" + "\n".join(help_lines(PipelineConfig)))
        if name == "pipeline":
            p.add_argument("--config", help="pipeline YAML (e.g. configs/demo.yaml)")
        p.add_argument("--steps", default=None, help="which steps to run, e.g. 2,3 (default 1,2,3; 1,3 for "
                                                      "algorithm=dpo; 3 alone for algorithm=grpo in an environment "
                                                      "that rewards by itself)")
        p.add_argument("--force", action="store_true", help="re-run steps whose output already exists")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. sft.optim.lr=2e-5")
        p.set_defaults(func=_run_pipeline, config=None)
