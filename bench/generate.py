"""Rollout generation speed: HF `generate()` vs our Hybrid Engine, on a random-init model of SmolLM2-135M's
shape (bf16, CPU, 2 threads; no download needed).

    .venv/bin/python bench/generate.py [--prompts 64] [--prompt-len 64] [--new 64] [--repeats 2]

Cases (all in one run, same weights, same sampling settings):
  hf-8     HF generate(), batches of 8 prompts
  hf-64    HF generate(), one batch of 64 prompts
  ours-64  HybridEngine rollout of all 64 prompts decoded together
  ours-8   HybridEngine, batches of 8 prompts
Every case generates exactly `--new` tokens per prompt (min_new_tokens = max_new_tokens), so tokens/s compare
like for like. Results: a table on stdout and bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from chatrl.rollout.decode import GenerationSettings  # noqa: E402
from chatrl.rollout.hybrid import HybridEngine  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
TOP_K = 50  # HF's default sampling setting, used by both sides


def build_model(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype).eval()
    model.generation_config.pad_token_id = 2
    return model


def make_prompts(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n left-padded prompts whose real lengths vary in [length/2, length]. -> ids, mask [n, length]."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SMOLLM2_135M["vocab_size"], (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    lens = torch.randint(length // 2, length + 1, (n,), generator=gen)
    for i, n_real in enumerate(lens.tolist()):
        mask[i, : length - n_real] = 0
        ids[i, : length - n_real] = SMOLLM2_135M["pad_token_id"]
    return ids, mask


def run_hf(model, ids, mask, batch: int, new: int) -> int:
    n = 0
    for s in range(0, ids.shape[0], batch):
        out = model.generate(input_ids=ids[s:s + batch], attention_mask=mask[s:s + batch], do_sample=True,
                             top_k=TOP_K, top_p=1.0, temperature=1.0, max_new_tokens=new, min_new_tokens=new,
                             eos_token_id=2, pad_token_id=2)
        n += out[:, ids.shape[1]:].numel()
    return n


def run_ours(engine: HybridEngine, ids, mask, batch: int, new: int) -> int:
    settings = GenerationSettings(max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=TOP_K,
                                  top_p=1.0, temperature=1.0, seed=0)
    n = 0
    with engine.inference_mode():
        for s in range(0, ids.shape[0], batch):
            _, rmask = engine.generate(ids[s:s + batch], mask[s:s + batch], settings, eos_token_id=2, pad_token_id=2)
            n += int(rmask.sum())
    return n


def timed(fn, repeats: int) -> tuple[float, int]:
    """Best wall time of `repeats` runs (the machine is shared: best-of is the least noisy)."""
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        best = min(best, time.perf_counter() - t0)
    return best, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(torch.bfloat16)
    engine = HybridEngine(model, inference_dtype=torch.bfloat16, release_after_rollout=False)
    ids, mask = make_prompts(args.prompts, args.prompt_len)
    cases = {
        "hf-8": lambda: run_hf(model, ids, mask, 8, args.new),
        "hf-64": lambda: run_hf(model, ids, mask, args.prompts, args.new),
        "ours-64": lambda: run_ours(engine, ids, mask, args.prompts, args.new),
        "ours-8": lambda: run_ours(engine, ids, mask, 8, args.new),
    }
    # Warm-up: one small run of each path (allocator, oneDNN primitive caches, engine's inference copy).
    run_hf(model, ids[:8], mask[:8], 8, 4)
    run_ours(engine, ids[:8], mask[:8], 8, 4)
    run_ours(engine, ids, mask, args.prompts, 4)

    results = {}
    for name, fn in cases.items():
        secs, tokens = timed(fn, args.repeats)
        batch = int(name.split("-")[1])
        steps = args.new * -(-args.prompts // batch)  # decode steps run in total
        results[name] = dict(seconds=round(secs, 3), tokens=tokens, tokens_per_s=round(tokens / secs, 1),
                             ms_per_step=round(secs / steps * 1e3, 2), batch=batch)
    ratios = {
        "ours-64 / hf-8": results["ours-64"]["tokens_per_s"] / results["hf-8"]["tokens_per_s"],
        "ours-8 / hf-8": results["ours-8"]["tokens_per_s"] / results["hf-8"]["tokens_per_s"],
        "ours-64 / hf-64": results["ours-64"]["tokens_per_s"] / results["hf-64"]["tokens_per_s"],
    }
    print(f"{'case':<9} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ms/step':>8}")
    for name, r in results.items():
        print(f"{name:<9} {r['batch']:>5} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['ms_per_step']:>8.2f}")
    for k, v in ratios.items():
        print(f"{k:<16} {v:5.2f}x")
    payload = dict(config=dict(vars(args) | {"out": os.path.relpath(args.out, ROOT)}, model="random SmolLM2-135M shape", dtype="bfloat16", top_k=TOP_K,
                               torch=torch.__version__, machine=platform.processor() or platform.machine()),
                   results=results, ratios={k: round(v, 2) for k, v in ratios.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
