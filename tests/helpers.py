"""Helpers shared by test files: driving the real `chatrl` CLI in subprocesses, fake models for the RL loop, the
tiny decoding model and its prompts, the sampler's goodness-of-fit test."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from chatrl.rollout.hybrid import HybridEngine
    from chatrl.rollout.sampling import GenerationSettings

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


# ----------------------------------------------------------------------------- offline steps on one data file (DPO, KTO)


def train_on(step: str, config: str, data: Path, out: Path, *overrides: str) -> str:
    """`chatrl STEP --config CONFIG output_dir=OUT data.paths=[DATA] OVERRIDES`, which must succeed; returns its
    stdout + stderr."""
    proc = run_cli(step, "--config", config, f"output_dir={out}", f"data.paths=[{data}]", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def assert_live_reference_matches_cached(step: str, config: str, data: Path, tmp: Path, steps: int,
                                         keys: tuple[str, ...]) -> None:
    """Two short runs differing only in `STEP.reference` (live: a frozen model in the loop; precompute: log-probs
    cached before training) log the same `keys` at every step."""
    logged = {}
    for mode in ("live", "precompute"):
        train_on(step, config, data, tmp / mode, f"optim.max_steps={steps}", f"{step}.reference={mode}",
                 "logging.eval_every=0")
        logged[mode] = [row[k] for row in read_metrics(tmp / mode) for k in keys]
    assert logged["live"] == pytest.approx(logged["precompute"], abs=1e-5)


def assert_resume_gives_same_weights(step: str, config: str, data: Path, tmp: Path, kill_at: int, seed: int) -> None:
    """A 20-step run SIGKILLed within a second after checkpoint `kill_at`, then resumed, ends with the bit-identical
    (fp32) weights of a straight run."""
    settings = ("optim.max_steps=20", "logging.eval_every=0")
    train_on(step, config, data, tmp / "full", *settings)
    kill_after_checkpoint(tmp / "cut", kill_at, [step, "--config", config, f"output_dir={tmp / 'cut'}",
                                                 f"data.paths=[{data}]", *settings], jitter=1.0, seed=seed)
    assert "resumed from" in train_on(step, config, data, tmp / "cut", *settings)
    assert same_weights(tmp / "full" / "model", tmp / "cut" / "model") == []


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


# ----------------------------------------------------------------------------- decoding: the tiny model, prompts, rollouts


PAD = 2
LENS = [5, 9, 3, 12, 7, 12]
NEW = 10  # new tokens of a Hybrid Engine test rollout


def tiny_model(model_dir: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    """The tiny architecture with a large init, so greedy outputs vary (the default init repeats one token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(model_dir)
    config.initializer_range = 0.3
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def left_padded(lens: list[int] = LENS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, LEFT padded. -> ids, mask [B, max(lens)]."""
    g = torch.Generator().manual_seed(seed)
    width = max(lens)
    ids = torch.full((len(lens), width), PAD)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, width - n:] = torch.randint(3, 1000, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def hf_greedy(model, ids, mask, new: int, eos: int | None) -> torch.Tensor:
    """transformers' greedy continuation [B, R] (R = longest)."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                         eos_token_id=eos, pad_token_id=PAD)
    return out[:, ids.shape[1]:]


def pick_eos(model, ids, mask, new: int) -> int:
    """A token that greedy decoding of row 3 emits at step 2: used as EOS so some rows stop early."""
    return int(hf_greedy(model, ids, mask, new, eos=None)[3, 2])


def greedy(new: int = NEW, **kw) -> GenerationSettings:
    from chatrl.rollout.sampling import GenerationSettings

    return GenerationSettings(max_new_tokens=new, do_sample=False, **kw)


def teacher_forced_logits(model, ids, mask, resp, resp_mask) -> torch.Tensor:
    """float32 logits [B, R, V] that predicted each response token: one forward over prompt + response."""
    full, full_mask = torch.cat([ids, resp], dim=1), torch.cat([mask, resp_mask], dim=1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits.float()
    return logits[:, ids.shape[1] - 1: -1]


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The gap between adjacent bf16 numbers at |x| (8 significant bits): 2^(floor(log2|x|) - 7)."""
    _, exp = torch.frexp(x.abs().float())  # |x| = m * 2^exp, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - 8)


def assert_bf16_greedy_within_rounding(bf16_ref, ids, mask, resp, resp_mask, logps) -> dict[str, float]:
    """Greedy bf16 decoding with our decode attention (`resp`, `logps`) agrees with transformers' bf16 forward
    (`bf16_ref`, SDPA, teacher-forced on OUR tokens) up to bf16 rounding of the logits.

    Derivation. Both paths end in the same bf16 LM head, so their logits lie on the bf16 grid, whose spacing at the
    step's largest logit is ulp_t = 2^(floor(log2 max|z|) - 7) (8 significant bits; 0.0625 here, top logits ~12).
    Before that the paths run the same ops except the attention kernel, which differs only in fp32 summation order
    and in where it rounds to bf16: each such rounding (relative 2^-8) of the hidden state moves a top logit by at
    most ~2^-8 |z| < 1 grid step, and the logit's own rounding adds one. Budget per top logit: 2 steps; logsumexp
    (a softmax-weighted average of all the logits' moves) 1 more. Hence, on every response token:
    - |lp - lp_ref| <= 3 ulp_t for the chosen token's log-prob (lp_v = z_v - logsumexp(z));
    - greedy regret z[best] - z[ours] <= 3 ulp_t: a flip is a near-tie (two tokens on the same or adjacent grid
      points may resolve either way; the row then continues differently, so tokens are not compared one to one);
    - on average |lp - lp_ref| <= 0.5 ulp_t: two values less than half a step apart round to the same grid point
      or to neighbours, differing by one step with probability (their distance / step), so the mean error in steps
      is their mean distance; a systematic error (wrong scale, mask, temperature) moves most tokens instead.
    Measured (this model, seed 0 / worst of 20 model+prompt seeds): chosen-token log-prob error 1.03 / 1.93 ulp at
    most and 0.28 / 0.37 ulp on average, regret 1 / 1 ulp. With deliberate bugs: a 2% wrong attention scale
    gives a 0.56 ulp mean (fails; the old "80% of tokens equal" check passed it with 87% equal), 5% gives 3.04 ulp
    at most (fails), log-probs computed at temperature 1.02 a 1.39 ulp mean (fails); 1% (0.33) is within bf16's
    resolution here. Returns the measured maxima and mean in ulp_t."""
    z = teacher_forced_logits(bf16_ref, ids, mask, resp, resp_mask)
    live = resp_mask.bool()
    ulp = bf16_spacing(z.abs().amax(-1))[live]
    chosen = z.gather(2, resp[..., None]).squeeze(2)
    regret = (z.amax(-1) - chosen)[live] / ulp
    lp_err = (logps - torch.log_softmax(z, -1).gather(2, resp[..., None]).squeeze(2)).abs()[live] / ulp
    stats = {"regret": float(regret.max()), "lp_err": float(lp_err.max()), "lp_err_mean": float(lp_err.mean())}
    assert stats["regret"] <= 3 and stats["lp_err"] <= 3 and stats["lp_err_mean"] <= 0.5, stats
    return stats


def rollout(he: HybridEngine, eos: int) -> torch.Tensor:
    ids, mask = left_padded()
    return he.generate(ids, mask, greedy(), eos_token_id=eos, pad_token_id=PAD)[0]


def train_steps(model, n: int, lr: float = 3e-2) -> None:
    """n AdamW steps of next-token loss on random tokens (big lr so the greedy outputs really change)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(7)
    model.train()
    for _ in range(n):
        x = torch.randint(3, 1000, (2, 8), generator=g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()



# ----------------------------------------------------------------------------- sampling: chi-square goodness of fit


P_MIN = 1e-4  # reject below this p-value: the chi2 quantile at 99.99%
# 8 tokens in a shuffled order (so "the first k columns" is never the right answer), range 2 nats: at T=0.5 the
# least likely token still expects ~150 draws in test_sampling's N = 20,000, enough for the chi-square approximation (>= 5 per cell).
Z = torch.tensor([0.1, 1.0, -0.5, 0.4, -1.0, 0.7, -0.2, -0.8])


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2_{k-1} >= Pearson's statistic) for observed `counts` against `probs` over the k cells with probs > 0.
    Draws in a cell of probability 0 give p = 0."""
    counts, probs = counts.double(), probs.double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference top-p: keep a token while the mass of strictly more likely tokens is < top_p; renormalise."""
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    kept = torch.zeros_like(probs)
    kept[order[before < top_p]] = probs[order[before < top_p]]
    return kept / kept.sum()
