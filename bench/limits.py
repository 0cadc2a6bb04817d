"""The machine's limits, measured at the start of every suite run: matmul peak (fp32, bf16) and memory bandwidth.

    .venv/bin/python bench/limits.py [--quick]      # ~20 s (--quick ~3 s); writes bench/results/limits.json

- matmul peak: best of several square `torch.mm` at the threads the benchmarks use (n = 2048; 1024 with --quick;
  bf16 on a CPU at most 768),
  2 n^3 FLOPs each. This is what the BLAS reaches on this CPU, not the datasheet number: a fraction of it is the
  honest MFU here. bf16 on a CPU without native bf16 is emulated (slower than fp32) — recorded, not hidden.
- bandwidth: best of several full reads of a 512 MiB fp32 tensor (`sum`; 64 MiB with --quick), bytes / second.
  A decode step streams the weights once, so reading is the relevant direction; a copy (read + write) is recorded
  too.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import DEVICE, RESULTS, machine, sync, table, write_json


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: thread pool, page faults, oneDNN/MKL kernel selection
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflop_s(n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n).to(DEVICE, dtype)
    b = torch.randn(n, n).to(DEVICE, dtype)
    out = torch.empty(n, n, dtype=dtype, device=DEVICE)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b, out=out), repeats) / 1e9


def bandwidth_gb_s(mib: int, repeats: int) -> tuple[float, float]:
    """(read GB/s, copy GB/s counting read + write)."""
    a = torch.ones(mib * 2**20 // 4, device=DEVICE)
    b = torch.empty_like(a)
    read = a.numel() * 4 / best_seconds(lambda: a.sum(), repeats) / 1e9
    copy = 2 * a.numel() * 4 / best_seconds(lambda: b.copy_(a), repeats) / 1e9
    return read, copy


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "limits.json"))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    n, mib, repeats = (1024, 64, 3) if args.quick else (2048, 512, 5)
    fp32 = matmul_gflop_s(n, torch.float32, repeats)
    # a CPU without native bf16 emulates it at ~0.3 GFLOP/s: one n = 2048 product would take a minute there
    bf16 = matmul_gflop_s(n if DEVICE.type == "cuda" else min(n, 768), torch.bfloat16, max(2, repeats // 2))
    read, copy = bandwidth_gb_s(mib, repeats)
    limits = dict(matmul_fp32_gflop_s=round(fp32, 1), matmul_bf16_gflop_s=round(bf16, 1),
                  bandwidth_gb_s=round(read, 2), copy_gb_s=round(copy, 2))
    print(table(["limit", "value"], [["matmul fp32", f"{fp32:.0f} GFLOP/s (n={n})"],
                                     ["matmul bf16", f"{bf16:.1f} GFLOP/s"],
                                     ["memory read", f"{read:.1f} GB/s ({mib} MiB)"],
                                     ["memory copy", f"{copy:.1f} GB/s (read + write)"]]))
    payload = dict(limits=limits, config=dict(matrix=n, buffer_mib=mib, repeats=repeats), machine=machine())
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
