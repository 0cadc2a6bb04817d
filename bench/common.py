"""What every benchmark part shares: the machine's limits, FLOP and byte counts of a model, peak RSS, tables, JSON.

The suite (`bench/run.py`) measures the limits first (`bench/limits.py` writes bench/results/limits.json); every
other part reads them and reports its figures also as a fraction of the limit that bounds them:
- compute-bound phases (prefill, scoring, training): MFU = model FLOPs / seconds / matmul peak of the dtype;
- decode steps: the floor of a step is max(bytes it must read / bandwidth, FLOPs / peak) — weights once per step
  plus each row's KV cache — and we report achieved tokens/s as a fraction of B / floor.
FLOPs count matmuls only (2 per multiply-add): projections + MLP + the LM head where it runs, and attention's
two matmuls (QK^T and PV). Element-wise work, norms and softmax are not counted (what MFU conventionally means).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "src"))

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# Where the parts run: the GPU when there is one (bench/gpu_check.sh), otherwise the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued GPU work before reading a clock (no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that FLOP and byte counts need (read from an HF config)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shape:
        c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim, c.vocab_size)

    @property
    def body_params(self) -> int:
        """Weights of the matmuls in the transformer body (q, k, v, o + gate, up, down per layer)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def forward_flops(self, tokens: int, context: float, lm_head_tokens: int | None = None) -> float:
        """Matmul FLOPs of a forward over `tokens` tokens that each attend to `context` positions on average.
        lm_head_tokens: tokens that go through the vocabulary projection (default all; 0 for value/reward heads)."""
        head = tokens if lm_head_tokens is None else lm_head_tokens
        attention = 4 * self.layers * self.heads * self.head_dim * context  # QK^T + PV per token
        return 2.0 * self.body_params * tokens + attention * tokens + 2.0 * self.head_params * head

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


def decode_floor_tokens_per_s(shape: Shape, batch: int, context: float, itemsize: int, limits: dict,
                              dtype: str) -> dict:
    """Tokens/s a decode step of `batch` rows at mean KV length `context` cannot beat on this machine.
    Bytes: every weight once (body + the tied head) and each row's KV cache; FLOPs: `forward_flops` of one token
    per row. -> {bandwidth: tok/s if only bytes counted, compute: tok/s if only FLOPs counted, floor: the min}."""
    weight_bytes = (shape.body_params + shape.head_params) * itemsize
    step_bytes = weight_bytes + batch * context * shape.kv_bytes_per_token(itemsize)
    t_bytes = step_bytes / (limits["bandwidth_gb_s"] * 1e9)
    t_flops = shape.forward_flops(batch, context) / (peak_flops(limits, dtype))
    return dict(bandwidth=batch / t_bytes, compute=batch / t_flops, floor=batch / max(t_bytes, t_flops),
                bound="bandwidth" if t_bytes >= t_flops else "compute")


def peak_flops(limits: dict, dtype: str) -> float:
    """Matmul FLOP/s of `dtype` ("fp32" / "bf16") measured by bench/limits.py."""
    return limits[f"matmul_{dtype}_gflop_s"] * 1e9


def mfu(flops: float, seconds: float, limits: dict | None, dtype: str) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the measured matmul peak of `dtype` (None without limits)."""
    if not limits or seconds <= 0:
        return None
    return flops / seconds / peak_flops(limits, dtype)


def load_limits(path: str | os.PathLike | None = None) -> dict | None:
    """The limits measured by this suite run (bench/results/limits.json), or None when not measured yet — or when
    they were measured on another kind of CPU (an AVX2 machine's bf16 peak is ~500x below an AVX-512-bf16 one's:
    fractions of it would be nonsense); then the part says so and reports no fractions (run bench/limits.py here)."""
    p = Path(path or os.environ.get("CHATRL_BENCH_LIMITS") or RESULTS / "limits.json")  # run.py sets the variable
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    theirs, ours = data.get("machine", {}).get("cpu_kind"), cpu_kind()
    if theirs != ours:
        print(f"bench: {p} was measured on a {theirs or 'unrecorded'} CPU, this one is {ours}: its limits are not "
              "used (run bench/limits.py on this machine first)", file=sys.stderr)
        return None
    return data["limits"]


def peak_rss_gib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_kind() -> str:
    """'AVX-512-bf16' (native bf16 matmuls: dtype=auto trains in bf16) or 'AVX2' (fp32; bf16 emulated), from the
    kernel's CPU flags; 'unknown' where /proc/cpuinfo does not exist."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return "AVX-512-bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "AVX2"


def machine() -> dict:
    """What the numbers depend on, recorded with every result file."""
    gpu = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else None
    return dict(measured=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(), cpu_kind=cpu_kind(),
                gpu=gpu, cores=os.cpu_count(), load_avg_1min=round(os.getloadavg()[0], 2),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default)"))


def update_readme(text: str, marker: str, readme: Path = ROOT / "README.md") -> None:
    """Replace README's block between `<!-- {marker}:start -->` and `<!-- {marker}:end -->` with `text`: every
    number in such a block is written by the command that measured it."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    doc = readme.read_text()
    if start not in doc or end not in doc:
        sys.exit(f"bench: {readme} has no {start} ... {end} block to write the table into")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")
    print(f"wrote the {marker} table into {readme.name}")


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write atomically (a killed run leaves the previous result file intact)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(p)
    print(f"wrote {os.path.relpath(p, ROOT) if p.is_relative_to(ROOT) else p}")


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (printed as is: readable in a terminal, pasteable into the README)."""
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
