"""Reward-model scoring throughput on real hh-rlhf lengths: what `chatrl score` / `chatrl eval` do per sequence.

    .venv/bin/python bench/score.py              # ~5 min on 2 cores; writes bench/results/score.json
    .venv/bin/python bench/score.py --quick      # tiny model, 16 pairs: ~15 s

Rows: the first `--pairs` pairs of the shipped hh-rlhf harmless sample (data/, or `--data`), both replies scored,
so 2 x pairs sequences. Reward model: SmolLM2-135M-Instruct with a fresh score head (the compute is the same as a
trained one). Cases, in one run on the same sequences:
  length-sorted  `chatrl.eval.responses.reward_scores`: batches of similar length (what `chatrl score` runs)
  data-order     the loop it replaced: batches in file order, each padded to its longest row (the baseline)
MFU counts the useful FLOPs only (real tokens through the body; `common.Shape.forward_flops`, no LM head), so
padding shows up as lost utilisation.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import DEVICE, DTYPE_NAMES, RESULTS, ROOT, Shape, load_limits, machine, mfu, pct, table, write_json

from chatrl.eval.records import read_records
from chatrl.eval.responses import load_reward, reward_ids, reward_scores
from chatrl.models.reward import sequence_scores

DATA = ROOT / "data" / "hh-rlhf-harmless" / "harmless-base-sample.jsonl"  # the sample the repository ships


@torch.inference_mode()
def data_order_scores(rm, ids: list[list[int]], pad: int, batch_size: int) -> list[float]:
    """The baseline: batches in data order, padded to each batch's longest row."""
    out: list[float] = []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        width = max(map(len, chunk))
        x = torch.tensor([e + [pad] * (width - len(e)) for e in chunk])
        m = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk])
        out.extend(sequence_scores(rm, x, m).tolist())
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(DATA), help="hh-rlhf style JSONL (chosen / rejected)")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8, help="chatrl score's default")
    ap.add_argument("--quick", action="store_true", help="tiny-random model, 16 pairs (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "score.json"))


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.model, args.pairs = "tiny-random", 16
    torch.set_num_threads(args.threads)
    limits = load_limits()
    rm, tok = load_reward(args.model, dtype="auto")
    rm.to(DEVICE)
    dtype = DTYPE_NAMES[next(rm.parameters()).dtype]
    shape = Shape.of(rm.config)
    records = read_records(args.data, args.pairs, skip_bad=True)  # the sample has a few pairs with an empty reply
    prompts = [r.prompt_messages for r in records for _ in (0, 1)]
    replies = [x for r in records for x in (r.chosen, r.rejected)]
    max_len = min(int(rm.config.max_position_embeddings), tok.model_max_length)
    ids = [reward_ids(tok, m, r, max_len) for m, r in zip(prompts, replies, strict=True)]
    lengths = [len(e) for e in ids]
    real = sum(lengths)
    flops = sum(shape.forward_flops(n, n / 2, lm_head_tokens=0) for n in lengths)

    reward_scores(rm, tok, prompts[:4], replies[:4], batch_size=4)  # warm-up
    cases = {}
    for name in ("length-sorted", "data-order"):
        t0 = time.perf_counter()
        scores = (reward_scores(rm, tok, prompts, replies, batch_size=args.batch_size) if name == "length-sorted"
                  else data_order_scores(rm, ids, tok.pad_token_id, args.batch_size))
        secs = time.perf_counter() - t0
        cases[name] = dict(seconds=round(secs, 2), sequences=len(ids), real_tokens=real,
                           tokens_per_s=round(real / secs, 1), sequences_per_s=round(len(ids) / secs, 2),
                           mfu=mfu(flops, secs, limits, dtype), scores=scores)
        print(f"{name}: {len(ids) / secs:.2f} sequences/s, {real / secs:.0f} tokens/s ({secs:.1f} s)", flush=True)
    sorted_, baseline = cases["length-sorted"], cases["data-order"]
    scores = sorted_.pop("scores")
    worst = max(abs(a - b) for a, b in zip(scores, baseline.pop("scores"), strict=True))
    payload = dict(cases=cases, ratio=round(baseline["seconds"] / sorted_["seconds"], 2),
                   max_score_difference=worst, max_abs_score=max(map(abs, scores)),
                   config=dict(model=args.model, dtype=dtype, data=args.data, pairs=args.pairs,
                               batch_size=args.batch_size, mean_tokens=round(real / len(ids), 1),
                               max_tokens=max(lengths)),
                   limits=limits, machine=machine())
    print(report(payload))
    write_json(args.out, payload)
    return payload


def report(payload: dict) -> str:
    rows = [[k, c["sequences"], f"{c['sequences_per_s']:.2f}", f"{c['tokens_per_s']:.0f}", f"{c['seconds']:.1f}",
             pct(c["mfu"])] for k, c in payload["cases"].items()]
    cfg = payload["config"]
    return (table(["batching", "sequences", "seq/s", "real tok/s", "seconds", "MFU"], rows)
            + f"\nlength-sorted / data-order: {payload['ratio']:.2f}x (mean {cfg['mean_tokens']} tokens, "
              f"max {cfg['max_tokens']}; scores agree within {payload['max_score_difference']:.1e})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
