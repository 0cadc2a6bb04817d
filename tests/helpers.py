"""Helpers for tests that drive the real `chatrl` CLI in subprocesses."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CHATRL_HOME", str(REPO / ".cache" / "test-home"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_cli(*args: str, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    """`python -m chatrl ARGS` in a fresh process (its own process group), output captured."""
    return subprocess.run([sys.executable, "-m", "chatrl", *args], cwd=REPO, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row.get("split") == split]


def final_by_step(rows: list[dict], key: str) -> dict[int, float]:
    """The last logged value of `key` per step (a resumed run may log a step twice)."""
    return {row["step"]: row[key] for row in rows if key in row}


LOAD_PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert 'chatrl' not in sys.modules
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])
ids = t.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt",
                            return_dict=True)
out = m.generate(**ids, max_new_tokens=3, do_sample=False)
print("OK", out.shape[1] > ids["input_ids"].shape[1])
"""


def load_with_plain_transformers(model_dir: Path) -> str:
    """Load a saved folder in a process that never imports chatrl; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_PLAIN, str(model_dir)], capture_output=True, text=True,
                          timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


WORDS = "the a cat dog sun rain tree road blue green small quick old new house river stone banana".split()


def write_word_chats(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Synthetic prompt/response data whose replies are 4-10 words from WORDS (so 'banana' is ~1 in 18)."""
    import random

    rng = random.Random(seed)
    questions = ["Tell me something.", "Say a few words.", "What do you see?", "Describe the view."]
    with path.open("w") as f:
        for i in range(n):
            reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
            f.write(json.dumps({"prompt": f"{rng.choice(questions)} ({i})", "response": reply}) + "\n")
    return path


def sft_word_model(tmp: Path) -> Path:
    """A tiny model fine-tuned on `write_word_chats` data (speaks the 18-word language); returns its folder."""
    data = write_word_chats(tmp / "words.jsonl")
    out = tmp / "sft"
    proc = run_cli("sft", "--config", "configs/tiny-sft.yaml", f"output_dir={out}", f"data.paths=[{data}]",
                   "data.split=1,0,1", "optim.lr=1e-2", "optim.max_steps=30", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "model"


def kill_after_checkpoint(out: Path, step: int, args: list[str], timeout: float = 600, jitter: float = 0.0,
                          seed: int = 0) -> float:
    """Start `chatrl ARGS`, SIGKILL its process group once checkpoint `step` is complete plus a random delay in
    [0, jitter) seconds (seeded), so the kill lands anywhere in the following step(s): mid forward/backward, mid
    optimizer step, or mid-write of the next checkpoint. Asserts the run was still going; returns the delay."""
    import signal
    import time

    delay = random.Random(seed).uniform(0, jitter)
    proc = subprocess.Popen([sys.executable, "-m", "chatrl", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "checkpoints" / f"step-{step:06d}" / "COMPLETE"
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    seen = marker.exists()
    time.sleep(delay)
    still_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen, "run ended before the checkpoint to kill at"
    assert still_running, (f"run finished within {delay:.2f} s after checkpoint {step}: nothing was interrupted "
                           "(give the run more steps after it, or a smaller jitter)")
    return delay


def _two_folders_weights(a: Path, b: Path) -> tuple[dict, dict]:
    """The tensors of two saved HF folders, which must hold the same names."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return wa, wb


def same_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (not bit-identical) between two saved HF folders."""
    wa, wb = _two_folders_weights(a, b)
    return [k for k in wa if not (wa[k].dtype == wb[k].dtype and wa[k].equal(wb[k]))]


def max_rel_diff(a: Path, b: Path) -> float:
    """The largest per-tensor relative difference ||a - b|| / ||a|| (float64) between two saved HF folders."""
    wa, wb = _two_folders_weights(a, b)
    return max(((wa[k].double() - wb[k].double()).norm() / wa[k].double().norm().clamp(min=1e-30)).item()
               for k in wa)


# Equality tests of runs that differ only in summation order (1 process vs 2, ZeRO stages) compare weights after a
# few Adam steps. Adam divides by sqrt(v) + eps: with the default eps = 1e-8 an element whose gradient is ~0 takes a
# full +-lr step whose sign is decided by ~1e-7 rounding, so one tensor lands 3.6e-5 (this machine) to 2.4e-4 (CI's)
# apart. eps = 1e-6 bounds what rounding can do to a step (measured here: largest tensor difference 3.8e-6 DPO, 1.2e-6 PPO actor); a real
# fault (wrong rows per rank, a loss scaled by the world size) moves every tensor by ~1e-2.
ROUNDING_EPS = "1e-6"
SAME_UP_TO_ROUNDING = 5e-5


def write_marker_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """Preference pairs whose chosen reply always ends with the word 'banana' and whose rejected reply (words from
    WORDS without it) never has it."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w != "banana"]
    with path.open("w") as f:
        for i in range(n):
            body = " ".join(rng.choice(plain) for _ in range(rng.randint(3, 8)))
            other = " ".join(rng.choice(plain) for _ in range(rng.randint(3, 8)))
            f.write(json.dumps({"prompt": f"Question {i}: say something about {rng.choice(plain)}",
                                "chosen": f"{body} banana", "rejected": other}) + "\n")
    return path


# ----------------------------------------------------------------------------- fake models for unit tests of the RL loop


class FixedLogitsLM(nn.Module):
    """A causal LM stand-in: the same next-token logits (a learnable [V] vector) at every position, so its log-probs,
    entropy and their gradients are worked out by hand. Takes the keyword arguments the RL code passes."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=None):
        out = self.logits.expand(*input_ids.shape, -1)
        return SimpleNamespace(logits=out if logits_to_keep is None else out[:, logits_to_keep])


class FakeEngine(nn.Module):
    """A DeepSpeed engine as the RL update uses it: forward; backward of loss / grad_accum (DeepSpeed averages the
    micro-batches of a step); no optimizer step, so the gradients of a whole mini-batch accumulate for reading."""

    def __init__(self, module: nn.Module, grad_accum: int = 1) -> None:
        super().__init__()
        self.module, self.grad_accum = module, grad_accum

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return False

    def step(self) -> None:
        pass


class SavingEngine:
    """What save_checkpoint needs of a DeepSpeed engine: a save that writes a file under its tag."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def save_checkpoint(self, folder: str, tag: str, save_latest: bool) -> None:
        (Path(folder) / tag).mkdir()
        (Path(folder) / tag / "weights.bin").write_bytes(self.payload)
