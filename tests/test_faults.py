"""Faults a real run meets: SIGTERM / SIGINT (finish the step, checkpoint, exit 0, resume to the same weights),
non-finite losses (skip, count, stop after max_bad_steps in a row), failed writes (one line, previous checkpoint and
model intact), and a finished step's checkpoints deleted unless checkpoint.keep_final_state=true."""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium
import pytest
import torch

from chatrl.config import CheckpointConfig, DeepSpeedConfig, LoggingConfig, OptimConfig
from chatrl.engine import checkpoint as ckpt
from chatrl.engine.faults import StopRequest
from chatrl.errors import ChatrlError
from chatrl.steps.supervised import LoopSettings, TrainTask, train
from helpers import REPO, SavingEngine, cli_env, read_metrics, run_cli, same_weights

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
RESUME_LINE = re.compile(r"stopped by (SIG\w+) after step (\d+)/(\d+).*\n.*to resume, run the same command: chatrl ")


class PoisonedRewardEnv(gymnasium.Env):
    """BananaEnv's reward, but tasks in [first, last) reward 3e38: finite (the environment contract holds), yet a
    group of them overflows fp32 in GRPO's group mean/std, so the advantages and the loss are NaN."""

    def __init__(self, first: int = 0, last: int = 0) -> None:
        self.first, self.last = first, last

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.task = (options or {}).get("task", 0)
        return [{"role": "user", "content": f"Say a few words. ({self.task})"}], {}

    def step(self, action):
        words = action.split()
        share = words.count("banana") / len(words) if words else 0.0
        return [], 3e38 if self.first <= self.task < self.last else share, True, False, {}


# ----------------------------------------------------------------------------- SIGTERM / SIGINT


def test_stop_request_sets_a_flag_restores_handlers_and_a_second_signal_interrupts() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopRequest() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes
        assert stop.signal_name == "SIGTERM" and stop.agreed()
        os.kill(os.getpid(), signal.SIGINT)  # asked twice: stop now
        time.sleep(0.05)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def signal_after_first_step(out: Path, args: list[str], sig: signal.Signals, timeout: float = 600) -> tuple[int, str]:
    """Start `chatrl ARGS`, send `sig` once its first step is logged; returns (exit code, stdout + stderr)."""
    log = out.parent / f"{out.name}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "chatrl", *args], cwd=REPO, env=cli_env(), stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        metrics, deadline = out / "metrics.jsonl", time.time() + timeout
        while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.05)
        proc.send_signal(sig)
        code = proc.wait(timeout=timeout)
    return code, log.read_text()


def assert_stopped_and_resumable(code: int, output: str, out: Path, sig: str) -> int:
    assert code == 0, output[-3000:]
    found = RESUME_LINE.search(output)
    assert found and found.group(1) == sig, output[-3000:]
    step, total = int(found.group(2)), int(found.group(3))
    assert 1 <= step < total, "the signal must land before the last step for the test to mean anything"
    assert ckpt.find_resume_point(out, "auto") == out / "checkpoints" / f"step-{step:06d}"
    assert "Traceback" not in output
    return step


@pytest.mark.slow  # three CLI runs each, like the kill/resume tests
def test_sigterm_stops_sft_with_a_checkpoint_and_the_same_command_resumes(tmp_path: Path) -> None:
    def args(out: Path, *extra: str) -> list[str]:
        return ["sft", "--config", "configs/tiny-sft.yaml", f"output_dir={out}", *extra]

    straight = tmp_path / "straight"
    proc = run_cli(*args(straight, "checkpoint.keep_final_state=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(straight)] == ["step-000008", "step-000012"]  # kept

    out = tmp_path / "stopped"
    code, output = signal_after_first_step(out, args(out), signal.SIGTERM)
    step = assert_stopped_and_resumable(code, output, out, "SIGTERM")
    assert not (out / "model").exists()  # a stopped step writes no final model
    proc = run_cli(*args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{step:06d}'}" in proc.stdout + proc.stderr
    assert same_weights(straight / "model", out / "model") == []
    # keep_final_state=false (the default): the finished step deleted its optimizer state, kept its model
    assert ckpt.list_checkpoints(out) == [] and (out / "model" / "model.safetensors").exists()
    # running the finished step again neither retrains nor fails: it says so and leaves the model alone
    mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    proc = run_cli(*args(out))
    assert proc.returncode == 0 and "already finished at step 12/12" in proc.stdout, proc.stderr[-3000:]
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    proc = run_cli(*args(out, "optim.max_steps=14"))  # cannot continue without state: said, not done silently
    assert proc.returncode == 2 and "finished at step 12 and kept no checkpoint" in proc.stderr


def grpo_args(out: Path, *extra: str) -> list[str]:
    return ["grpo", "--config", "configs/tiny-grpo.yaml", f"output_dir={out}", "checkpoint.every=0", *extra]


@pytest.mark.slow  # three CLI runs each, like the kill/resume tests
def test_sigint_stops_grpo_after_the_iteration_and_the_same_command_resumes(tmp_path: Path) -> None:
    common = ["grpo.iterations=4"]
    straight = tmp_path / "straight"
    proc = run_cli(*grpo_args(straight, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "stopped"
    code, output = signal_after_first_step(out, grpo_args(out, *common), signal.SIGINT)
    step = assert_stopped_and_resumable(code, output, out, "SIGINT")
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1)) and not (out / "actor").exists()
    proc = run_cli(*grpo_args(out, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert same_weights(straight / "actor", out / "actor") == []


# ----------------------------------------------------------------------------- non-finite losses


def test_grpo_skips_a_poisoned_iteration_and_finishes(tmp_path: Path) -> None:
    out = tmp_path / "poisoned"
    # iteration 2 plays tasks 4..7 (4 prompts per rollout): every group overflows, both mini-batches are NaN
    proc = run_cli(*grpo_args(out, "grpo.iterations=3", "env.name=test_faults:PoisonedRewardEnv",
                              "env.kwargs={first: 4, last: 8}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("non-finite loss or gradients, update skipped") == 2
    assert [r["bad_steps"] for r in read_metrics(out)] == [0, 2, 2]
    from safetensors.torch import load_file

    weights = load_file(str(out / "actor" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_grpo_stops_after_max_bad_steps_in_a_row_with_the_last_checkpoint_intact(tmp_path: Path) -> None:
    out = tmp_path / "poisoned"
    proc = run_cli(*grpo_args(out, "grpo.iterations=6", "checkpoint.every=2", "actor_optim.max_bad_steps=3",
                              "env.name=test_faults:PoisonedRewardEnv", "env.kwargs={first: 8, last: 1000}"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "3 optimizer steps in a row had a non-finite loss or gradients" in proc.stderr
    assert "[grpo] iteration 4; actor_optim.max_bad_steps=3" in proc.stderr and "Traceback" not in proc.stderr
    last = out / "checkpoints" / "step-000002"
    assert ckpt.list_checkpoints(out) == [last] and ckpt.checkpoint_problem(last) is None
    assert not (out / "actor").exists()


def linear_task(poison: set[int], seen: list[torch.Tensor]) -> TrainTask:
    """y = 3x on 64 rows; optimizer steps in `poison` get a NaN loss; `seen` collects the weight at every step."""
    rows = [{"x": float(i) / 64} for i in range(64)]

    def loss(engine, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        step = len(seen)
        seen.append(engine.module.weight.detach().clone())
        value = ((engine(x) - 3 * x) ** 2).mean() * (math.nan if step in poison else 1.0)
        return value, {"loss": value.item()}

    return TrainTask(name="linear", train_rows=rows, eval_rows=[], collate=lambda r: torch.tensor([[x["x"]] for x in r]),
                     loss=loss, evaluate=lambda engine, rows: {}, count_tokens=len)


@pytest.fixture(scope="module")
def single_process() -> None:
    """A one-rank gloo group for in-process DeepSpeed. Its env vars are restored after the module (CLI subprocesses
    must not inherit MASTER_PORT); the group itself stays, since DeepSpeed caches its groups for the process."""
    import socket

    from chatrl.engine.deepspeed import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            mp.setenv(key, value)
        init_distributed()
        yield


def settings(out: Path, zero: int, max_bad: int, steps: int) -> LoopSettings:
    return LoopSettings(output_dir=str(out), seed=0, deepspeed=DeepSpeedConfig(zero_stage=zero),
                        optim=OptimConfig(lr=0.1, micro_batch_size=4, grad_accum=1, max_steps=steps,
                                          max_bad_steps=max_bad, scheduler="constant"),
                        logging=LoggingConfig(report_to=[], progress=False),
                        checkpoint=CheckpointConfig(every=2, keep_last=5))


@pytest.mark.parametrize("zero", [0, 1])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path: Path, single_process: None, zero: int) -> None:
    seen: list[torch.Tensor] = []
    torch.manual_seed(0)
    train(linear_task({2}, seen), torch.nn.Linear(1, 1, bias=False), settings(tmp_path, zero, 3, 5), bf16=False,
          rank=0, world=1, on_done=lambda engine: None)
    assert len(seen) == 5 and all(torch.isfinite(w).all() for w in seen)
    assert seen[3].equal(seen[2]) and not seen[2].equal(seen[1]) and not seen[4].equal(seen[3])  # step 3 skipped
    rows = read_metrics(tmp_path)
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 1, 1]


def test_max_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path: Path, single_process: None) -> None:
    seen: list[torch.Tensor] = []
    with pytest.raises(ChatrlError, match=r"3 optimizer steps in a row .* step 5; optim.max_bad_steps=3"):
        train(linear_task({2, 3, 4, 5}, seen), torch.nn.Linear(1, 1, bias=False), settings(tmp_path, 0, 3, 8),
              bf16=False, rank=0, world=1, on_done=lambda engine: None)
    assert len(seen) == 5  # steps 3, 4, 5 were bad: stopped there, no step 6
    # the checkpoint at step 4 was written between two skipped steps: same weights as after step 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    assert all(ckpt.checkpoint_problem(p) is None for p in ckpt.list_checkpoints(tmp_path))


# ----------------------------------------------------------------------------- failed writes


class FullDiskEngine(SavingEngine):
    def save_checkpoint(self, folder: str, tag: str, save_latest: bool) -> None:
        (Path(folder) / tag).mkdir()
        (Path(folder) / tag / "weights.bin").write_bytes(self.payload[:10])  # half written, then the disk is full
        raise ENOSPC


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path: Path, monkeypatch) -> None:
    first = ckpt.save_checkpoint(tmp_path, 1, {"actor": SavingEngine(b"a" * 4096)}, {}, keep_last=1)
    with pytest.raises(ChatrlError) as err:
        ckpt.save_checkpoint(tmp_path, 2, {"actor": FullDiskEngine(b"b" * 4096)}, {}, keep_last=1)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message and f"{first} is intact" in message
    assert ckpt.find_resume_point(tmp_path, "auto") == first and ckpt.checkpoint_problem(first) is None
    assert sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()) == ["step-000001"]  # no temp left

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)  # torch.save reports ENOSPC as a RuntimeError
    with pytest.raises(ChatrlError, match="could not write checkpoint .*step-000002 .*PytorchStreamWriter"):
        ckpt.save_checkpoint(tmp_path, 2, {"actor": SavingEngine(b"b" * 4096)}, {}, keep_last=1)
    assert ckpt.list_checkpoints(tmp_path) == [first]


def test_a_failed_final_model_write_keeps_the_previous_folder(tmp_path: Path, tiny_model_dir: str,
                                                              monkeypatch) -> None:
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatrl.models.saving import save_hf_folder

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    out = save_hf_folder(model, tok, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tensors, filename, *args, **kwargs) -> None:
        Path(filename).write_bytes(b"half")
        raise ENOSPC

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(ChatrlError) as err:
        save_hf_folder(model, tok, out)
    assert "\n" not in str(err.value) and "No space left on device" in str(err.value)
    assert f"the previous {out} is unchanged" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind


# ----------------------------------------------------------------------------- a finished step's checkpoints


def test_mark_finished_deletes_state_unless_kept(tmp_path: Path) -> None:
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    for out, keep in ((kept, True), (dropped, False)):
        ckpt.save_checkpoint(out, 3, {"actor": SavingEngine(b"a")}, {}, keep_last=2)
        ckpt.mark_finished(out, 3, keep_state=keep)
    assert [p.name for p in ckpt.list_checkpoints(kept)] == ["step-000003"]
    assert not ckpt.finished_without_state(kept, "auto", 3)  # resumes from its checkpoint as before
    assert ckpt.list_checkpoints(dropped) == []
    assert ckpt.finished_without_state(dropped, "auto", 3)
    assert not ckpt.finished_without_state(dropped, "never", 3)  # an explicit fresh start trains again
    with pytest.raises(ChatrlError, match="finished at step 3 and kept no checkpoint .* continue to step 5"):
        ckpt.finished_without_state(dropped, "auto", 5)
