"""Step 1 through the real CLI: learning, plain-transformers output, kill + resume, 2-process ZeRO-2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (
    REPO,
    cli_env,
    final_by_step,
    kill_after_checkpoint,
    load_with_plain_transformers,
    read_metrics,
    run_cli,
    same_weights,
)

TINY = "configs/tiny-sft.yaml"


@pytest.fixture(scope="module")
def sft_cli(tmp_path_factory, tiny_model_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sft")
    proc = run_cli("sft", "--config", TINY, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def sft_run(sft_cli) -> Path:
    return sft_cli[0]


def test_sft_says_the_device_once_in_its_own_words(sft_cli) -> None:
    # DeepSpeed's accelerator probe logs this (to stdout) in every process on a machine without a GPU
    _, proc = sft_cli
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    expected = "the CPU (no GPU found)" if not torch.cuda.is_available() else "cuda:0"
    assert proc.stderr.count("chatrl: training on") == 1 and f"chatrl: training on {expected}" in proc.stderr


def test_sft_eval_loss_goes_down_and_model_loads_without_chatrl(sft_run: Path) -> None:
    evals = read_metrics(sft_run, "eval")
    assert len(evals) >= 2
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05
    train = read_metrics(sft_run)
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(row["tokens_per_s"] > 0 for row in train)
    assert "OK True" in load_with_plain_transformers(sft_run / "model")
    assert (sft_run / "config.yaml").exists() and list((sft_run / "tensorboard").iterdir())


def test_sft_rejects_bad_config_before_work(tmp_path: Path) -> None:
    proc = run_cli("sft", "--config", TINY, f"output_dir={tmp_path}", "optim.lrr=1")
    assert proc.returncode == 2
    assert "unknown config key 'optim.lrr'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("sft", "--config", TINY, f"output_dir={tmp_path}", "optim.micro_batch_size=two")
    assert proc.returncode == 2 and "optim.micro_batch_size" in proc.stderr and "integer" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_sft_help_lists_every_field() -> None:
    proc = run_cli("sft", "--help")
    assert proc.returncode == 0
    for key in ("optim.lr", "model.lora.r", "data.split", "deepspeed.zero_stage", "checkpoint.every",
                "sft.train_on_prompt", "sft.packing"):
        assert key in proc.stdout


@pytest.mark.slow
def test_sft_killed_and_resumed_matches_uninterrupted(tmp_path: Path, sft_run: Path) -> None:
    out = tmp_path / "resumed"
    args = ["sft", "--config", TINY, f"output_dir={out}"]
    kill_after_checkpoint(out, 4, args, jitter=0.5, seed=4)  # in steps 5-8 or the step-8 checkpoint write
    assert not (out / "model").exists()
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr + proc.stdout
    assert max(final_by_step(read_metrics(out), "loss")) == 12
    assert same_weights(sft_run / "model", out / "model") == []  # bit-exact in fp32


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_sft_two_process_zero2_matches_one_process(tmp_path: Path) -> None:
    """2 processes x micro-batch 1 == 1 process x micro-batch 2 (both 4 accumulation steps, ZeRO-2, fp32).

    Both see the same 8 rows per optimizer step (see the trainer docstring), and the loss of a step is ONE token mean
    over all 8 rows (the trainer counts the step's tokens over micro-batches and ranks and divides each micro-batch's
    token sum by that share), so only fp32 summation order and padding differ. Before that normalisation the two were
    different computations (each micro-batch a token mean of its own rows), measured: eval loss 3.1e-5 relative
    apart at step 12, weights 0.14 (largest per-tensor relative norm). Now: eval loss 1.7e-7 / 6e-9 (steps 6 / 12),
    weights 6.9e-7. Bounds: about 3x those."""
    args = ["sft", "--config", TINY, "deepspeed.zero_stage=2", "checkpoint.every=0", "optim.grad_accum=4"]
    one, two = tmp_path / "one", tmp_path / "zero2"
    proc = run_cli(*args, f"output_dir={one}", "optim.micro_batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "chatrl", *args, f"output_dir={two}",
           "optim.micro_batch_size=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("chatrl: training on") == 1 and ", 2 processes" in proc.stderr  # rank 0 says it
    eval_one = final_by_step(read_metrics(one, "eval"), "loss")
    eval_two = final_by_step(read_metrics(two, "eval"), "loss")
    assert sorted(eval_one) == sorted(eval_two) == [6, 12]
    for step in (6, 12):
        assert eval_two[step] == pytest.approx(eval_one[step], rel=5e-7, abs=0)
    w_one, w_two = _weights(one / "model"), _weights(two / "model")
    assert w_one.keys() == w_two.keys()
    for name, w in w_one.items():
        w, w2 = w.double(), w_two[name].double()
        assert (w - w2).norm() <= 2e-6 * w.norm(), name
    assert eval_one[12] < eval_one[6] - 0.05  # it did train (the comparison is not between two untouched models)
    assert load_with_plain_transformers(two / "model").startswith("OK")
