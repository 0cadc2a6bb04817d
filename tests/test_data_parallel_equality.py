"""Data parallelism changes nothing but summation order (fp32): 1 process x micro-batch 2b equals 2 processes x
micro-batch b for the pair losses (reward model, DPO: means over pairs), and ZeRO stages 0-3 give one result on
one process. (SFT's 2-process check lives in test_steps_sft.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    REPO,
    ROUNDING_EPS,
    SAME_UP_TO_ROUNDING,
    cli_env,
    final_by_step,
    max_rel_diff,
    read_metrics,
    run_cli,
    write_marker_pairs,
)

pytestmark = pytest.mark.slow


def _torchrun(args: list[str], port: int) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "chatrl", *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("step,config,port", [("reward", "configs/tiny-reward.yaml", 29551),
                                              ("dpo", "configs/tiny-dpo.yaml", 29552)])
def test_one_process_2b_equals_two_processes_b(tmp_path: Path, tiny_model_dir, step: str, config: str,
                                               port: int) -> None:
    data = write_marker_pairs(tmp_path / "pairs.jsonl", 200)
    args = [step, "--config", config, f"data.paths=[{data}]", "data.split=0,1,0", "optim.max_steps=8",
            "logging.eval_every=4", "checkpoint.every=0", "deepspeed.zero_stage=1",
            f"optim.eps={ROUNDING_EPS}"]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_cli(*args, f"output_dir={one}", "optim.micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun([*args, f"output_dir={two}", "optim.micro_batch_size=2"], port)
    assert proc.returncode == 0, proc.stderr[-4000:]
    key = "accuracy" if step == "reward" else "rewards/accuracy"
    value = "margin" if step == "reward" else "loss"  # a continuous eval number of each step
    loss_one, loss_two = (final_by_step(read_metrics(d, "eval"), value) for d in (one, two))
    assert sorted(loss_one) == sorted(loss_two) == [4, 8]
    for s in (4, 8):
        assert loss_two[s] == pytest.approx(loss_one[s], rel=1e-5, abs=0)
    assert final_by_step(read_metrics(two, "eval"), key)[8] == final_by_step(read_metrics(one, "eval"), key)[8]
    # padding differs (4 pairs padded together vs 2 + 2), so matmul rounding differs at ~1e-7 (see ROUNDING_EPS)
    assert max_rel_diff(one / "model", two / "model") < SAME_UP_TO_ROUNDING
    assert loss_one[8] != loss_one[4]  # it trained (the weights moved between the two evaluations)


def test_zero_stages_give_one_result(tmp_path: Path, tiny_model_dir) -> None:
    outs = {}
    for stage in (0, 1, 2, 3):
        outs[stage] = tmp_path / f"z{stage}"
        proc = run_cli("sft", "--config", "configs/tiny-sft.yaml", f"output_dir={outs[stage]}", "optim.max_steps=6",
                       "logging.eval_every=3", "checkpoint.every=0", f"deepspeed.zero_stage={stage}",
                       f"optim.eps={ROUNDING_EPS}", "optim.max_grad_norm=0")
        assert proc.returncode == 0, proc.stderr[-3000:]
    base = final_by_step(read_metrics(outs[0], "eval"), "loss")
    for stage in (1, 2, 3):
        other = final_by_step(read_metrics(outs[stage], "eval"), "loss")
        assert other[6] == pytest.approx(base[6], rel=1e-6, abs=0), stage
        # stage 0 steps torch's AdamW, stages 1-3 DeepSpeed's flat-buffer optimizer. Clipping is off: DeepSpeed clips
        # in two implementations (the engine's at stage 0, ZeRO's own at 1-3) whose coefficients differ in rounding,
        # which Adam carried to 2.8e-5 on every tensor after 6 steps (clipping off here: bit-identical)
        assert max_rel_diff(outs[0] / "model", outs[stage] / "model") < SAME_UP_TO_ROUNDING, stage
