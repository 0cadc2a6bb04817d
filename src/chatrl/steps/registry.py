"""The one table of chatrl's training steps: each step's config class, the function that runs it, its help line.

`chatrl sft|reward|ppo|...` (steps/commands.py) registers a sub-command per entry; the pipeline (steps/pipeline.py)
adds what it needs to know about a step-3 algorithm on top of the same entries.

A runner is named by its module path and imported only when its step runs (`Step.load`): the step modules import
DeepSpeed and peft (seconds of start-up, and DeepSpeed's accelerator probe), which the commands that train nothing
(`chatrl chat`, `serve`, `data inspect`, `env check`, `eval`, ...) never need. The config classes are light and
are imported here, since every `--help` lists their fields.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatrl.config import RewardConfig, SFTConfig
from chatrl.config_offline import DPOConfig, ILQLConfig, KTOConfig, RFTConfig
from chatrl.config_rl import DistillConfig, GRPOConfig, PPOConfig


@dataclass(frozen=True)
class Step:
    config: type
    runner: str  # "module:function", imported by `load` when the step runs (see the module docstring)
    help: str

    def load(self) -> Callable[[Any], Path]:
        """The function that runs this step (imports its module, and with it the training stack)."""
        module, name = self.runner.split(":")
        return getattr(importlib.import_module(module), name)


STEPS: dict[str, Step] = {
    "sft": Step(SFTConfig, "chatrl.steps.sft:run_sft", "step 1: supervised fine-tuning"),
    "reward": Step(RewardConfig, "chatrl.steps.reward:run_reward", "step 2: train a reward model"),
    "ppo": Step(PPOConfig, "chatrl.steps.rl:run_ppo", "step 3: RLHF with PPO"),
    "grpo": Step(GRPOConfig, "chatrl.steps.rl:run_grpo", "critic-free RL (GRPO family) in an environment"),
    "distill": Step(DistillConfig, "chatrl.steps.rl:run_distill", "on-policy distillation: the student samples, a "
                                                                  "teacher (grpo.teacher) scores every token"),
    "rft": Step(RFTConfig, "chatrl.steps.rft:run_rft", "fine-tuning from evaluation: best-of-n sampling, scoring, "
                                                      "SFT on the best; rounds"),
    "dpo": Step(DPOConfig, "chatrl.steps.dpo:run_dpo", "offline alignment on preference pairs: DPO, cDPO, IPO, "
                                                      "SimPO, ORPO"),
    "kto": Step(KTOConfig, "chatrl.steps.kto:run_kto", "offline alignment on unpaired feedback (KTO): completions "
                                                      "labelled desirable or undesirable, or pairs split in two"),
    "ilql": Step(ILQLConfig, "chatrl.steps.ilql:run_ilql", "offline Q-learning for language (ILQL): Q/V heads from "
                                                          "scored data, Q-guided decoding"),
}
