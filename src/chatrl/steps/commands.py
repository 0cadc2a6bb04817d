"""CLI sub-commands of the training steps: `chatrl sft|reward|ppo|grpo|distill|rft|dpo|kto|ilql --config FILE [k=v ...]`,
`chatrl pipeline` and `chatrl demo`.

Each step is registered once from the table `steps.registry.STEPS` (config class, runner, description); `--help`
lists every config field with its type, default and help text (taken from the config dataclasses, written once).
A step's module (and the pipeline's) is imported only when it runs: see steps/registry.py.
"""

from __future__ import annotations

import argparse

from chatrl.config import PipelineConfig
from chatrl.configbase import help_lines, load_config
from chatrl.engine.deepspeed import shutdown_distributed
from chatrl.errors import ChatrlError
from chatrl.paths import REPO_ROOT
from chatrl.steps.registry import STEPS, Step


def _run_step(args: argparse.Namespace) -> int:
    step: Step = args.step
    cfg = load_config(step.config, args.config, args.overrides)  # a bad config fails before the training stack loads
    result = step.load()(cfg)
    try:
        shutdown_distributed()
    finally:
        if result is not None:
            print(f"done: {result}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, step in STEPS.items():
        p = subparsers.add_parser(name, help=step.help, description=step.help,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="config fields (set in YAML or as section.field=value):\n" +
                                         "\n".join(help_lines(step.config)))
        p.add_argument("--config", help="YAML config file (fields below); omitted = defaults")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, applied after the YAML")
        p.set_defaults(func=_run_step, step=step)
    _register_pipeline(subparsers)


def _parse_steps(text: str | None) -> list[int] | None:
    if text is None:  # the algorithm's default
        return None
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        steps = []
    if not steps or any(s not in (1, 2, 3) for s in steps):
        raise ChatrlError(f"--steps {text!r}: expected a comma list of 1 (sft), 2 (reward), 3 (the algorithm's step)")
    return steps


def _run_pipeline(args: argparse.Namespace) -> int:
    config = str(REPO_ROOT / "configs" / "demo.yaml") if args.command == "demo" else args.config
    cfg = load_config(PipelineConfig, config, args.overrides)
    # imported here, as the steps' runners are (steps/registry.py): the pipeline imports the whole training stack
    from chatrl.steps.pipeline import run_pipeline

    run_pipeline(cfg, _parse_steps(args.steps), force=args.force)
    shutdown_distributed()
    return 0


def _register_pipeline(subparsers: argparse._SubParsersAction) -> None:
    for name, desc in (("pipeline", "SFT -> reward model -> PPO|GRPO|RFT (or SFT -> DPO|KTO|ILQL) -> eval -> report"),
                       ("demo", "the built-in demo: the pipeline on SmolLM2-135M-Instruct and hh-rlhf harmless")):
        p = subparsers.add_parser(name, help=desc, description=desc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="config fields:\n" + "\n".join(help_lines(PipelineConfig)))
        if name == "pipeline":
            p.add_argument("--config", help="pipeline YAML (e.g. configs/demo.yaml)")
        p.add_argument("--steps", default=None, help="which steps to run, e.g. 2,3 (default 1,2,3; 1,3 for "
                                                      "algorithm=dpo|kto|ilql|distill; 3 alone for algorithm=grpo|rft|distill in an "
                                                      "environment that rewards by itself)")
        p.add_argument("--force", action="store_true", help="re-run steps whose output already exists")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. sft.optim.lr=2e-5")
        p.set_defaults(func=_run_pipeline, config=None)
