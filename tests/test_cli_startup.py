"""What `chatrl` loads at start-up: the commands that train nothing (chat, serve, data, env, eval) must not import the
training stack (DeepSpeed, peft: seconds, and DeepSpeed's accelerator probe); a step's module loads when it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatrl.steps.registry import STEPS
from helpers import REPO, cli_env

# in a fresh interpreter: everything `chatrl chat` / `serve` / `data inspect` / `env check` import before they run,
# then the PPO step's runner (its module loads the stack only when it runs, like every step's), then what a running
# step calls first (its device), which does load DeepSpeed
PROBE = """
import sys
import chatrl.cli
import chatrl.data.commands, chatrl.envs.commands, chatrl.eval.commands, chatrl.serve.chat, chatrl.serve.server
chatrl.cli.build_parser()
print("start-up:", sorted(m for m in ("deepspeed", "peft") if m in sys.modules))
from chatrl.steps.registry import STEPS
STEPS["ppo"].load()
print("ppo:", sorted(m for m in ("deepspeed", "peft") if m in sys.modules))
from chatrl.engine.deepspeed import device
device()
print("running:", sorted(m for m in ("deepspeed", "peft") if m in sys.modules))
"""


def test_cli_start_up_does_not_import_deepspeed_or_peft() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "start-up: []" in proc.stdout
    assert "ppo: []" in proc.stdout
    # the probe can see the stack when it is loaded; peft itself waits for a LoRA model (models.lora.apply_lora)
    assert "running: ['deepspeed']" in proc.stdout


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_step_runner_is_found_by_its_module_path(name: str) -> None:
    module, function = STEPS[name].runner.split(":")
    run = STEPS[name].load()
    assert callable(run) and (run.__module__, run.__name__) == (module, function)
