"""A reward model's accuracy on every preference pair it never trained on, with its standard error, and paired
against another reward model on the same pairs (issue 19: which step-2 recipe reaches >= 66%).

    .venv/bin/python bench/rm_heldout.py --config configs/demo.yaml RUN/reward/model [OTHER/reward/model ...]

Pairs: the reward shard's held-out part plus the sft and rlhf shards' pairs (train and eval) -- what step 2 with
`data.reward_shards=[reward]` never reads. (The judge trains on the sft + rlhf shards: score a judge on the reward
shard's pairs instead, `--shards reward`.)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from tqdm import tqdm

from chatrl.config import DataConfig, PipelineConfig
from chatrl.configbase import load_config
from chatrl.data.prepare import tokenized_rows
from chatrl.data.tokenize import collate_pairs
from chatrl.eval.metrics import paired_difference, proportion_se
from chatrl.models.loading import load_tokenizer
from chatrl.models.reward import load_reward_model, sequence_scores


def heldout_rows(data: DataConfig, tok, shards: list[str]) -> list[dict]:
    rows = tokenized_rows(data, tok, "reward", "eval") if "reward" in shards else []  # reward shard held out
    others = [s for s in shards if s != "reward"]
    if others:  # the other shards' train pairs
        rows = rows + tokenized_rows(replace(data, reward_shards=others), tok, "reward", "train")
    return rows


@torch.no_grad()
def correct(model_dir: str, rows: list[dict], tok, batch: int) -> list[float]:
    model = load_reward_model(model_dir, dtype="auto", tokenizer=tok, trainable=False)
    out: list[float] = []
    for i in tqdm(range(0, len(rows), batch), desc=model_dir[-40:], unit="batch"):
        b = collate_pairs(rows[i:i + batch], tok.pad_token_id)
        s = sequence_scores(model, b.input_ids, b.attention_mask).float()
        half = len(s) // 2
        out += (s[:half] > s[half:]).float().tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--shards", default="reward,sft,rlhf")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", help="write each model's per-pair correctness here (JSON), to pair runs later")
    args = ap.parse_args()
    data = load_config(PipelineConfig, args.config).data
    tok = load_tokenizer(args.models[0])
    rows = heldout_rows(data, tok, args.shards.split(","))
    results = {m: correct(m, rows, tok, args.batch) for m in args.models}
    first = args.models[0]
    for m, c in results.items():
        acc = sum(c) / len(c)
        line = f"{m}: {acc:.1%} (s.e. {proportion_se(acc, len(c)):.1%}) on {len(c)} pairs"
        if m != first:
            d = paired_difference(c, results[first])
            line += f"; minus {first}: {d.mean:+.1%} ({d.se:.1%})"
        print(line)
    print(json.dumps({m: sum(c) / len(c) for m, c in results.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
