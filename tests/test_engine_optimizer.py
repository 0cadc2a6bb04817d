"""The optimizer DeepSpeed steps: torch's AdamW with the config's betas, eps and fused flag (stage 0 and ZeRO)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, cli_env

# In a fresh process: the engine's process group is per process, and DeepSpeed caches it.
SCRIPT = """
import json, sys, torch
from chatrl.config import DeepSpeedConfig, OptimConfig
from chatrl.engine.deepspeed import init_distributed, initialize
init_distributed()
model = torch.nn.Linear(4, 2)
optim = OptimConfig(lr=1e-3, eps=1e-6, betas=[0.8, 0.9], fused=sys.argv[1] == "1", max_steps=1)
engine = initialize(model, optim, DeepSpeedConfig(zero_stage=int(sys.argv[2])), bf16=False, total_steps=1, world_size=1)
inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
loss = model(torch.ones(3, 4)).sum()
engine.backward(loss)
engine.step()
print(json.dumps({"type": type(inner).__name__, **{k: inner.defaults[k] for k in ("fused", "eps", "betas")}}))
"""


@pytest.mark.parametrize("fused,stage", [(0, 0), (1, 2)])
def test_adamw_gets_the_configured_settings(fused: int, stage: int) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(fused), str(stage)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["type"] == "AdamW" and got["eps"] == 1e-6 and list(got["betas"]) == [0.8, 0.9]
    assert bool(got["fused"]) is bool(fused)
