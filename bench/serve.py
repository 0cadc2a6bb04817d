"""Serve benchmark: aggregate completion tokens/s of `chatrl serve` with 1 stream and with 8 concurrent streams,
and the time to first token (TTFT), measured through the official `openai` client over loopback HTTP.

    .venv/bin/python bench/serve.py            # SmolLM2-135M-Instruct, 64 tokens per stream; ~1-2 min on 2 cores
    .venv/bin/python bench/serve.py --quick    # smoke run (tiny random model, 8 tokens, 1 repeat), ~20 s
    .venv/bin/python bench/serve.py --tiny     # the tiny random model with the full settings

The server is the real `chatrl serve` (`python -m chatrl serve --port 0`) in a subprocess, so the client threads
do not share its interpreter lock; `--src` serves another checkout's `src/` (a before/after comparison). Every
request is a streamed chat completion of a distinct "write a long story" prompt with `max_tokens = --tokens`,
temperature 1 and its own seed. The API has no "ignore EOS" switch, so a stream may end early: the tokens counted
are those the server reports (`stream_options.include_usage`), and the finish reasons are reported too.
Cases: `1-stream` (one request at a time) and `8-streams` (8 threads start together). Per case: aggregate
completion tokens/s (all tokens / wall time of the case), TTFT mean, p50, p90 (request sent -> first content
chunk), total seconds. One warm-up request first. The ratio `8-streams / 1-stream` is compared with the 4.0x target.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time

from common import DTYPE_NAMES, RESULTS, ROOT, machine, table, write_json

from chatrl.models.loading import resolve_dtype

TARGET = 4.0
TOPICS = ["a lighthouse keeper", "a lost robot", "a dragon who bakes bread", "two rival chess players",
          "a city under the sea", "a time-travelling cat", "the last tree on Mars", "a haunted violin"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options (the suite driver adds them to its own parser)."""
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in alias or HF folder")
    ap.add_argument("--tiny", action="store_true", help="use the tiny-random built-in model (smoke runs)")
    ap.add_argument("--quick", action="store_true", help="tiny-random model, 8 tokens per stream, 1 repeat (< 60 s)")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams of the second case")
    ap.add_argument("--repeats", type=int, default=2, help="times each case runs (rates pool all of them)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--src", default=str(ROOT / "src"), help="the chatrl sources the server runs (before/after)")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`chatrl serve` on a free port; returns (process, base URL) once it listens."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.src, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "chatrl", "serve", "--model", args.model, "--port", "0", "--dtype", args.dtype,
           "--max-active", str(max(8, args.streams))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def drain() -> None:  # keep reading: a full pipe would block the server's access log
        for line in proc.stdout:
            log.append(line)
            lines.put(line)
        lines.put("")

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if match := re.search(r"OpenAI API at (\S+)/v1", line):
            return proc, match.group(1)
        if line == "":
            break
    proc.kill()
    raise RuntimeError("chatrl serve did not start:\n" + "".join(log[-40:]))


def stream_one(client, index: int, tokens: int) -> dict:
    """One streamed completion; TTFT = request sent -> first chunk with content."""
    t0 = time.perf_counter()
    ttft, usage, finish = None, 0, None
    stream = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": f"Write a long story about {TOPICS[index % 8]}."}],
        max_tokens=tokens, temperature=1.0, seed=index, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if ttft is None and choice.delta.content:
                ttft = time.perf_counter() - t0
            finish = choice.finish_reason or finish
    return {"tokens": usage, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "seconds": time.perf_counter() - t0, "finish": finish}


def run_round(client, streams: int, tokens: int, first_index: int) -> tuple[list[dict], float]:
    """`streams` requests started together (a barrier); returns (per-request results, wall seconds)."""
    out: list[dict] = [{} for _ in range(streams)]
    barrier = threading.Barrier(streams)

    def worker(i: int) -> None:
        barrier.wait()
        out[i] = stream_one(client, first_index + i, tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def run_case(client, streams: int, tokens: int, repeats: int) -> dict:
    """`repeats` rounds of `streams` concurrent requests; rates and TTFT pool every round."""
    results, wall = [], 0.0
    for r in range(repeats):
        out, seconds = run_round(client, streams, tokens, r * streams)
        results += out
        wall += seconds
    ttfts = sorted(r["ttft"] for r in results)
    total = sum(r["tokens"] for r in results)
    finishes: dict[str, int] = {}
    for r in results:
        finishes[str(r["finish"])] = finishes.get(str(r["finish"]), 0) + 1
    return dict(streams=streams, requests=len(results), tokens=total, seconds=round(wall, 3),
                tokens_per_s=round(total / wall, 1), ttft_mean=round(statistics.fmean(ttfts), 3),
                ttft_p50=round(_quantile(ttfts, 0.5), 3), ttft_p90=round(_quantile(ttfts, 0.9), 3),
                finish_reasons=finishes)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def run(args: argparse.Namespace) -> dict:
    """Start the server, measure both cases, write `args.out`; returns the JSON payload."""
    import openai

    if args.tiny or args.quick:
        args.model = "tiny-random"
    if args.quick:
        args.tokens, args.repeats = 8, 1
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews every number: recorded
    proc, url = start_server(args)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        stream_one(client, 99, min(args.tokens, 8))  # warm-up: allocator, oneDNN primitives, tokenizer
        cases = {"1-stream": run_case(client, 1, args.tokens, args.repeats * 2),
                 f"{args.streams}-streams": run_case(client, args.streams, args.tokens, args.repeats)}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    one, many = (c["tokens_per_s"] for c in cases.values())
    ratio = round(many / one, 2)
    config = dict(model=args.model, dtype=DTYPE_NAMES[resolve_dtype(args.dtype)], tokens=args.tokens, streams=args.streams, repeats=args.repeats,
                  src=os.path.relpath(args.src, ROOT), sampling="temperature 1, per-request seed",
                  load_avg_1min_at_start=load_at_start)
    payload = dict(cases=cases, ratio=ratio, ratio_name=f"{args.streams}-streams / 1-stream", target=TARGET,
                   met=ratio >= TARGET, config=config, machine=machine())
    print(report(payload))
    write_json(args.out, payload)
    return payload


def report(payload: dict) -> str:
    rows = [[name, c["requests"], c["tokens"], f"{c['seconds']:.2f}", f"{c['tokens_per_s']:.1f}",
             f"{c['ttft_mean']:.3f}", f"{c['ttft_p50']:.3f}", f"{c['ttft_p90']:.3f}", c["finish_reasons"]]
            for name, c in payload["cases"].items()]
    met = "met" if payload["met"] else "NOT met"
    return (table(["case", "requests", "tokens", "seconds", "tok/s", "TTFT mean s", "TTFT p50", "TTFT p90", "finish"],
                  rows)
            + f"\n{payload['ratio_name']}: {payload['ratio']:.2f}x aggregate tokens/s (target {TARGET:.1f}x: {met})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
