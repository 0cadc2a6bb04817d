"""`chatrl dpo`: the DPO family on preference pairs through the supervised loop (`steps/supervised.py`).

Each batch holds B pairs as [2B, T] rows (chosen then rejected, `PairBatch`); one policy forward gives the summed
reply log-probs of both halves (prompt tokens masked), the frozen reference's come from a one-pass cache
(`dpo.reference=precompute`, see `steps/dpo_reference.py`) or from a live frozen model, and the loss is one of
`algorithms.preference.PREFERENCE_LOSSES` (formulas there). Evaluation reports the held-out implicit-reward
accuracy: how often beta * log(pi / pi_ref) (or the reference-free reward) ranks the chosen reply first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from chatrl.algorithms.preference import PREFERENCE_LOSSES, PairLogps
from chatrl.batches import PairBatch
from chatrl.config_offline import DPOConfig
from chatrl.data.prepare import tokenized_rows
from chatrl.data.tokenize import collate_pairs
from chatrl.steps.common import StepContext, start_step, train_policy
from chatrl.steps.dpo_reference import Rows, reply_logps, setup_reference
from chatrl.steps.supervised import TrainTask

Metrics = dict[str, float]


def pair_logps(policy: torch.nn.Module, batch: PairBatch, reference: torch.nn.Module | None) -> PairLogps:
    """The policy's summed reply log-probs of a batch, with the reference's (cached in the batch, or live)."""
    sums, lens = reply_logps(policy, batch)
    ref = batch.ref_logps
    if ref is None and reference is not None:
        with torch.no_grad():
            ref = reply_logps(reference, batch)[0]
    half = batch.input_ids.shape[0] // 2
    return PairLogps(chosen=sums[:half], rejected=sums[half:], chosen_len=lens[:half], rejected_len=lens[half:],
                     ref_chosen=None if ref is None else ref[:half].to(sums),
                     ref_rejected=None if ref is None else ref[half:].to(sums))


def preference_loss(cfg: DPOConfig, lp: PairLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured loss of the DPO family with its options (training and evaluation alike)."""
    d = cfg.dpo
    return PREFERENCE_LOSSES[d.loss](lp, beta=d.beta, label_smoothing=d.label_smoothing, simpo_gamma=d.simpo_gamma,
                                     ipo_logratio=d.ipo_logratio)


def make_loss(cfg: DPOConfig, reference: torch.nn.Module | None) -> Callable[[torch.nn.Module, PairBatch],
                                                                          tuple[torch.Tensor, Metrics]]:
    def loss(engine: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, Metrics]:
        value, stats = preference_loss(cfg, pair_logps(engine, batch, reference))
        return value, {k: float(v) for k, v in stats.items()}

    return loss


@torch.no_grad()
def evaluate_pairs(engine: torch.nn.Module, rows: Rows, collate: Callable[[Rows], PairBatch], micro_batch: int,
                   cfg: DPOConfig, reference: torch.nn.Module | None) -> Metrics:
    """Held-out loss and implicit-reward accuracy / margin / rewards, averaged over pairs."""
    engine.eval()
    totals: dict[str, float] = {}
    for i in range(0, len(rows), micro_batch):
        part = rows[i:i + micro_batch]
        lp = pair_logps(engine, collate(part), reference)
        _, stats = preference_loss(cfg, lp)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(part)
    engine.train()
    return {**{k: v / len(rows) for k, v in totals.items()}, "pairs": float(len(rows))}


def run_dpo(cfg: DPOConfig) -> Path:
    """Train and save `<output_dir>/model` (a plain HF folder). Returns that path."""
    # 1. start: process group, seed, tokenizer, config.yaml
    ctx: StepContext = start_step(cfg, "dpo")
    tok = ctx.tokenizer

    def collate(rows: Rows) -> PairBatch:
        return collate_pairs(rows, tok.pad_token_id).to(ctx.device)

    # 2. preference pairs (the data split's reward shard), tokenized with their prompt lengths
    train_rows = tokenized_rows(cfg.data, tok, "reward", "train")
    eval_rows = tokenized_rows(cfg.data, tok, "reward", "eval")
    # 3. the reference: cached log-probs (one pass, then released), a live frozen model, or none (simpo, orpo)
    train_rows, eval_rows, reference = setup_reference(cfg, "dpo", ctx, collate, train_rows, eval_rows)
    # 4. the supervised loop with the preference loss
    task = TrainTask(
        name="dpo", train_rows=train_rows, eval_rows=eval_rows, collate=collate, loss=make_loss(cfg, reference),
        evaluate=lambda engine, rows: evaluate_pairs(engine, rows, collate, cfg.optim.micro_batch_size, cfg,
                                                     reference),
        count_tokens=lambda b: int(b.attention_mask.sum()),
    )
    return train_policy(ctx, cfg, task)
