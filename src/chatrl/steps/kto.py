"""`chatrl kto`: KTO on unpaired feedback through the supervised loop (`steps/supervised.py`).

Its own step rather than `dpo.loss=kto`: the data (one labelled completion per row, not a pair), the batch (an
example and its mismatched KL row, not chosen and rejected) and the held-out metrics (desirable vs undesirable
rewards, not pairwise accuracy) all differ, so a `dpo.loss=kto` would branch in each of DPO's functions. What the two
steps share is shared, not copied: the reference (`ReferenceOptions`, `setup_reference`, the log-prob cache and
`reply_logps` of `steps/dpo_reference.py`), the training loop with LoRA, DeepSpeed, checkpoints and resume
(`supervised.train`), and the model folder (`finish_model`).

Each batch holds B examples as [2B, T] rows (`UnpairedBatch`): the examples, then their mismatched KL rows
(`data.tokenize.with_mismatched`). The policy scores the examples with gradients and the KL rows without (z0 is a
constant of the loss, as in TRL); the reference's log-probs of both come from the one-pass cache or a live model.
The loss is `algorithms.preference.UNPAIRED_LOSSES[kto.loss]` (formula there). z0 is estimated from each micro-batch
on its own process (TRL averages it over the processes too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from chatrl.algorithms.preference import UNPAIRED_LOSSES, UnpairedLogps
from chatrl.batches import UnpairedBatch
from chatrl.config_offline import KTOConfig
from chatrl.data.prepare import tokenized_rows
from chatrl.data.tokenize import collate_unpaired, with_mismatched
from chatrl.eval.metrics import mean_se
from chatrl.steps.common import StepContext, start_step, train_policy
from chatrl.steps.dpo_reference import Rows, reply_logps, setup_reference
from chatrl.steps.supervised import TrainTask

Metrics = dict[str, float]


def unpaired_logps(policy: torch.nn.Module, batch: UnpairedBatch, reference: torch.nn.Module | None) -> UnpairedLogps:
    """The policy's summed completion log-probs of the examples (with gradients) and of their KL rows (without),
    with the reference's (cached in the batch, or live)."""
    logps, _ = reply_logps(policy, batch.half(second=False))
    with torch.no_grad():
        kl_logps, _ = reply_logps(policy, batch.half(second=True))
        ref = batch.ref_logps
        if ref is None:
            assert reference is not None, "kto needs the reference's log-probs: cached in the rows or a live model"
            ref = reply_logps(reference, batch)[0]
    n = logps.shape[0]
    return UnpairedLogps(logps=logps, ref_logps=ref[:n].to(logps), kl_logps=kl_logps, ref_kl_logps=ref[n:].to(logps),
                         desirable=batch.desirable)


def unpaired_loss(cfg: KTOConfig, lp: UnpairedLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured unpaired loss with its options (training and evaluation alike)."""
    k = cfg.kto
    return UNPAIRED_LOSSES[k.loss](lp, beta=k.beta, desirable_weight=k.desirable_weight,
                                   undesirable_weight=k.undesirable_weight)


def make_loss(cfg: KTOConfig, reference: torch.nn.Module | None) -> Callable[[torch.nn.Module, UnpairedBatch],
                                                                          tuple[torch.Tensor, Metrics]]:
    def loss(engine: torch.nn.Module, batch: UnpairedBatch) -> tuple[torch.Tensor, Metrics]:
        value, stats = unpaired_loss(cfg, unpaired_logps(engine, batch, reference))
        return value, {k: float(v) for k, v in stats.items()}

    return loss


def reward_summary(rewards: list[float], desirable: list[bool]) -> Metrics:
    """Held-out implicit rewards beta * log(pi / pi_ref) by class: the means, their difference (margin) and the
    margin's standard error (two independent means: sqrt(se_D^2 + se_U^2); nan with fewer than 2 of a class)."""
    good = [r for r, d in zip(rewards, desirable, strict=True) if d]
    bad = [r for r, d in zip(rewards, desirable, strict=True) if not d]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731 - one-liner reads best here
    return {"rewards/desirable": mean(good), "rewards/undesirable": mean(bad),
            "rewards/margin": mean(good) - mean(bad), "rewards/margin_se": math.hypot(mean_se(good), mean_se(bad)),
            "examples": float(len(rewards)), "desirable": float(len(good))}


@torch.no_grad()
def evaluate_unpaired(engine: torch.nn.Module, rows: Rows, collate: Callable[[Rows], UnpairedBatch],
                      micro_batch: int, cfg: KTOConfig, reference: torch.nn.Module | None) -> Metrics:
    """Held-out loss and KL estimate (averaged over batches' examples) and the implicit rewards by class."""
    engine.eval()
    loss = kl = 0.0
    rewards: list[float] = []
    desirable: list[bool] = []
    for i in range(0, len(rows), micro_batch):
        part = rows[i:i + micro_batch]
        lp = unpaired_logps(engine, collate(part), reference)
        value, stats = unpaired_loss(cfg, lp)
        loss, kl = loss + float(value) * len(part), kl + float(stats["kl"]) * len(part)
        rewards.extend((cfg.kto.beta * lp.log_ratios()).tolist())
        desirable.extend(lp.desirable.tolist())
    engine.train()
    return {"loss": loss / len(rows), "kl": kl / len(rows), **reward_summary(rewards, desirable)}


def run_kto(cfg: KTOConfig) -> Path:
    """Train and save `<output_dir>/model` (a plain HF folder). Returns that path."""
    # 1. start: process group, seed, tokenizer, config.yaml
    ctx: StepContext = start_step(cfg, "kto")
    tok = ctx.tokenizer

    def collate(rows: Rows) -> UnpairedBatch:
        return collate_unpaired(rows, tok.pad_token_id).to(ctx.device)

    # 2. labelled completions of the reward shard (pairs split in two), each with its mismatched KL row
    max_length = cfg.data.max_length
    train_rows = with_mismatched(tokenized_rows(cfg.data, tok, "kto", "train"), max_length)
    eval_rows = with_mismatched(tokenized_rows(cfg.data, tok, "kto", "eval"), max_length)
    # 3. the reference: cached log-probs (one pass, then released) or a live frozen model
    train_rows, eval_rows, reference = setup_reference(cfg, "kto", ctx, collate, train_rows, eval_rows)
    # 4. the supervised loop with the KTO loss
    task = TrainTask(
        name="kto", train_rows=train_rows, eval_rows=eval_rows, collate=collate, loss=make_loss(cfg, reference),
        evaluate=lambda engine, rows: evaluate_unpaired(engine, rows, collate, cfg.optim.micro_batch_size, cfg,
                                                        reference),
        count_tokens=lambda b: int(b.attention_mask[:b.desirable.shape[0]].sum()),
    )
    return train_policy(ctx, cfg, task)
