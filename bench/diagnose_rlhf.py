"""Why does (or doesn't) the RLHF demo learn? Reward-signal diagnostics on a finished `make demo` run directory.

For N train prompts of the RLHF shard, G replies sampled from the SFT model (temperature 1, the demo's length) and
one greedy reply each, scored by the run's reward model in two ways:
  rollout  = how the RL step scores a reply: prompt ids + sampled ids, the score at the last token (a reply cut at
             max_new_tokens has no end-of-turn token, so the reward model reads a mid-sentence position)
  eval     = how the eval (and the reward step's training) scores it: the rendered conversation ending at the
             reply's end-of-turn token
Prints: the correlation of the two; the spread of scores within groups (what group-relative advantages see) vs
between prompts; greedy vs sampled means; the EOS rate. Writes the numbers to bench/results/diagnose_rlhf.json.

  .venv/bin/python bench/diagnose_rlhf.py runs/demo [--prompts 32] [--group 4] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from chatrl.config import PipelineConfig
from chatrl.configbase import load_config
from chatrl.data.prepare import load_records
from chatrl.eval import responses as R
from chatrl.models.reward import sequence_scores


def rollout_scores(rm, pad: int, gen: R.Generation) -> list[float]:
    """The RL step's rule: prompt ids + generated ids (EOS only when sampled), score at the last token."""
    out = []
    for p, r in zip(gen.prompt_ids, gen.response_ids, strict=True):
        ids = torch.tensor([p + r])
        out.append(sequence_scores(rm, ids, torch.ones_like(ids)).item())
    return out


def spread(scores: list[float], group: int) -> dict[str, float]:
    """Within-group sd (pooled) vs the sd of group means (between prompts)."""
    groups = [scores[i:i + group] for i in range(0, len(scores), group)]
    within = math.sqrt(statistics.mean(statistics.variance(g) for g in groups))
    between = statistics.stdev(statistics.mean(g) for g in groups)
    return {"within_group_sd": within, "between_prompt_sd": between, "mean": statistics.mean(scores)}


def corr(a: list[float], b: list[float]) -> float:
    return statistics.correlation(a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--policy", default=None, help="policy folder (default: <run>/sft/model)")
    args = ap.parse_args()
    run = Path(args.run_dir)
    cfg = load_config(PipelineConfig, args.config)
    prompts, _ = load_records(cfg.data, "rlhf", "train")
    msgs = [p.messages for p in prompts[:args.prompts]]
    t0 = time.time()
    policy, tok = R.load_policy(args.policy or str(run / "sft" / "model"), dtype="fp32")
    rm, _ = R.load_reward(str(run / "reward" / "model"), dtype="fp32")
    repeated = [m for m in msgs for _ in range(args.group)]
    sampled = R.generate(policy, tok, repeated, max_new_tokens=args.max_new_tokens, greedy=False, batch_size=16,
                         seed=1, max_prompt_tokens=cfg.data.max_prompt_length)
    greedy = R.generate(policy, tok, msgs, max_new_tokens=args.max_new_tokens, greedy=True, batch_size=16,
                        max_prompt_tokens=cfg.data.max_prompt_length)
    s_roll = rollout_scores(rm, tok.pad_token_id, sampled)
    s_eval = R.reward_scores(rm, tok, repeated, sampled.texts, batch_size=16)
    g_eval = R.reward_scores(rm, tok, msgs, greedy.texts, batch_size=16)
    eos = [e for e in sampled.ended_with_eos]
    out = {
        "run": str(run), "prompts": len(msgs), "group": args.group, "max_new_tokens": args.max_new_tokens,
        "sampled_eos_rate": sum(eos) / len(eos), "greedy_eos_rate": sum(greedy.ended_with_eos) / len(msgs),
        "corr_rollout_vs_eval_rule": corr(s_roll, s_eval),
        "corr_on_truncated": corr([a for a, e in zip(s_roll, eos, strict=True) if not e], [b for b, e in zip(s_eval, eos, strict=True) if not e])
        if sum(1 for e in eos if not e) > 2 else None,
        "rollout_rule": spread(s_roll, args.group), "eval_rule": spread(s_eval, args.group),
        "greedy_eval_rule_mean": statistics.mean(g_eval), "seconds": time.time() - t0,
    }
    print(json.dumps(out, indent=1))
    dest = Path("bench/results/diagnose_rlhf.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
