"""Rollout generation: the Hybrid Engine (eager and compiled decode step) vs `generate()` on the same weights.

    .venv/bin/python bench/generate.py            # ~8 min on 2 cores; writes bench/results/generate.json
    .venv/bin/python bench/generate.py --quick    # tiny model, batch 1/8, 8 tokens: ~30 s

The model is the built-in SmolLM2-135M-Instruct (`--model`; `--quick` uses tiny-random) loaded as chatrl loads an
actor, in the dtype `auto` picks on this machine. Prompts: `--prompt-len` random token ids per row (no padding, so
every path does identical work), every case generates exactly N new tokens (min = max new tokens), sampling at
temperature 1 with no top-k / top-p (the PPO rollout's setting) on all paths. Cases, for each batch size and N:
  hybrid           the Hybrid Engine as `chatrl ppo` runs it (eager decode step; inference-copy refresh included)
  hybrid-compiled  the same with `rollout.compile=true` (its one-time compilation is in the warm-up, reported)
  hf-generate      `model.generate()` on the training model
Each case also reports its fraction of the machine's floor (`common.decode_floor_tokens_per_s`: the prefill's FLOPs
at the matmul peak + every decode step at max(bytes / bandwidth, FLOPs / peak)).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    DEVICE,
    DTYPE_NAMES,
    RESULTS,
    Shape,
    decode_floor_tokens_per_s,
    load_limits,
    machine,
    pct,
    peak_flops,
    sync,
    table,
    write_json,
)

from chatrl.models.loading import load_frozen_causal_lm, resolve_dtype
from chatrl.rollout.hybrid import HybridEngine
from chatrl.rollout.sampling import GenerationSettings

PATHS = ("hybrid", "hybrid-compiled", "hf-generate")


def make_prompts(batch: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, length] token ids (ids 100.. to stay clear of special tokens) and an all-ones mask."""
    gen = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(100, vocab, (batch, length), generator=gen).to(DEVICE)
    return ids, torch.ones_like(ids)


def run_hybrid(engine: HybridEngine, ids, mask, new: int, compiled: bool) -> int:
    """One rollout as a PPO iteration runs it: weights marked updated first, so the refresh is paid."""
    engine.compile_decode = compiled
    engine.mark_weights_updated()
    settings = GenerationSettings(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, seed=0)
    with engine.inference_mode():
        _, rmask = engine.generate(ids, mask, settings, eos_token_id=0, pad_token_id=0)
    return int(rmask.sum())


@torch.no_grad()
def run_hf(model, ids, mask, new: int) -> int:
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                         max_new_tokens=new, min_new_tokens=new, eos_token_id=0, pad_token_id=0)
    return out[:, ids.shape[1]:].numel()


def floor_seconds(shape: Shape, batch: int, prompt: int, new: int, itemsize: int, limits: dict, dtype: str) -> float:
    """The least time this case can take here: prefill FLOPs at peak + (new - 1) decode steps at their floor."""
    prefill = shape.forward_flops(batch * prompt, prompt / 2, lm_head_tokens=batch) / peak_flops(limits, dtype)
    step = batch / decode_floor_tokens_per_s(shape, batch, prompt + new / 2, itemsize, limits, dtype)["floor"]
    return prefill + (new - 1) * step


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in alias or HF folder")
    ap.add_argument("--quick", action="store_true",
                    help="tiny-random model, batch 1 and 8, 8 new tokens, no compiled path (smoke run)")
    ap.add_argument("--no-compile", action="store_true", help="skip the hybrid-compiled path")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--new", default="64,256", help="new tokens per row (comma-separated cases)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "generate.json"))


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.model, args.batches, args.new, args.prompt_len, args.no_compile = "tiny-random", "1,8", "8", 16, True
    torch.set_num_threads(args.threads)
    limits = load_limits()
    dtype = resolve_dtype(args.dtype)
    dname = DTYPE_NAMES[dtype]
    model = load_frozen_causal_lm(args.model, dtype).to(DEVICE)
    shape = Shape.of(model.config)
    engine = HybridEngine(model, inference_dtype=dtype, release_after_rollout=False)
    batches = [int(b) for b in args.batches.split(",")]
    news = [int(n) for n in args.new.split(",")]

    paths = [p for p in PATHS if not (args.no_compile and p == "hybrid-compiled")]

    # Warm-up of every path; the compiled path's first call compiles the decode step (timed, reported).
    ids, mask = make_prompts(batches[-1], args.prompt_len, shape.vocab)
    run_hf(model, ids[:2], mask[:2], 2)
    run_hybrid(engine, ids[:2], mask[:2], 2, compiled=False)
    compile_seconds = None
    if "hybrid-compiled" in paths:
        t0 = time.perf_counter()
        run_hybrid(engine, ids, mask, 3, compiled=True)
        compile_seconds = round(time.perf_counter() - t0, 1)
        for b in batches[:-1]:  # the compiled step specialises per batch size: compile those outside the timing too
            run_hybrid(engine, ids[:b], mask[:b], 3, compiled=True)

    cases: list[dict] = []
    for new in news:
        for batch in batches:
            ids, mask = make_prompts(batch, args.prompt_len, shape.vocab)
            floor = floor_seconds(shape, batch, args.prompt_len, new, dtype.itemsize, limits, dname) if limits else None
            for path in paths:
                t0 = time.perf_counter()
                tokens = (run_hf(model, ids, mask, new) if path == "hf-generate"
                          else run_hybrid(engine, ids, mask, new, compiled=path == "hybrid-compiled"))
                sync()
                secs = time.perf_counter() - t0
                case = dict(path=path, batch=batch, new=new, tokens=tokens, seconds=round(secs, 3),
                            tokens_per_s=round(tokens / secs, 1), of_floor=None if floor is None else floor / secs)
                cases.append(case)
                print(f"{path:<16} batch {batch:>3} x {new:>3}: {case['tokens_per_s']:>8.1f} tok/s "
                      f"({secs:.2f} s, {pct(case['of_floor'])} of the floor)", flush=True)
    payload = dict(cases=cases, ratios=ratios(cases), compile_seconds=compile_seconds,
                   config=dict(model=args.model, dtype=dname, prompt_len=args.prompt_len, batches=batches, new=news,
                               sampling="temperature 1, no top-k/top-p"),
                   limits=limits, machine=machine())
    print(report(payload))
    write_json(args.out, payload)
    return payload


def ratios(cases: list[dict]) -> dict[str, float]:
    """hybrid / hf-generate and hybrid-compiled / hf-generate at each (batch, new) — same work, one run."""
    tps = {(c["path"], c["batch"], c["new"]): c["tokens_per_s"] for c in cases}
    out = {}
    for (path, batch, new), v in tps.items():
        if path != "hf-generate" and ("hf-generate", batch, new) in tps:
            out[f"{path} / hf-generate @ {batch}x{new}"] = round(v / tps[("hf-generate", batch, new)], 2)
    return out


def report(payload: dict) -> str:
    rows = [[c["path"], c["batch"], c["new"], f"{c['tokens_per_s']:.1f}", f"{c['seconds']:.2f}", pct(c["of_floor"])]
            for c in payload["cases"]]
    out = table(["path", "batch", "new tokens", "tok/s", "seconds", "of floor"], rows)
    out += "\n" + "\n".join(f"{k}: {v:.2f}x" for k, v in payload["ratios"].items())
    if payload["compile_seconds"] is not None:
        out += f"\n(one-time compilation of the decode step: {payload['compile_seconds']:.1f} s, not in the cases)"
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
