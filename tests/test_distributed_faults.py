"""A rank that dies in a multi-process run: the others stop with an error within a bound (no silent hang)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, cli_env

pytestmark = pytest.mark.slow


def _rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the launcher's worker processes (read from their environment)."""
    out: dict[int, int] = {}
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(child)
    return out


def test_killed_rank_ends_the_run_with_an_error(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "run"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29541", "-m", "chatrl", "sft", "--config",
           "configs/tiny-sft.yaml", f"output_dir={out}", "optim.max_steps=400", "optim.micro_batch_size=1",
           "checkpoint.every=0", "logging.eval_every=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
            assert proc.poll() is None and time.time() < deadline, "the run did not start training"
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)  # rank 1 dies mid-training
        killed_at = time.time()
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 kept running for 120 s after rank 1 died (a silent hang)")
        assert proc.returncode != 0
        print(f"rank 0 stopped {time.time() - killed_at:.1f} s after rank 1 died")
        assert time.time() - killed_at < 120
        assert "exitcode  : -9" in output or "SIGKILL" in output or "Signal 9" in output, output[-3000:]
        assert not (out / "model").exists()  # no final model from a broken run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
