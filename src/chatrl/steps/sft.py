"""Step 1: supervised fine-tuning. Causal-LM loss on assistant tokens (labels are -100 elsewhere)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from chatrl.batches import TokenBatch
from chatrl.config import SFTConfig
from chatrl.data.prepare import tokenized_rows
from chatrl.data.tokenize import collate_sft, pack_rows
from chatrl.models.loading import load_causal_lm
from chatrl.steps.common import StepContext, finish_model, loop_settings, start_step
from chatrl.steps.supervised import TrainTask, train


def loss_tokens(rows: list[dict]) -> int:
    """Tokens the loss counts: next-token labels that are not -100 (the first label predicts nothing)."""
    return sum(sum(1 for label in r["labels"][1:] if label != -100) for r in rows)


def lm_loss(engine, batch: TokenBatch, token_denom: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross entropy of the next token over positions whose label is not -100 (HF's shifted loss), summed and divided
    by `token_denom` (the trainer's share of the whole step's token count), or the batch's token mean without it.
    The logged "loss" is this batch's token mean either way."""
    out = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                 use_cache=False)
    if token_denom is None:
        return out.loss, {"loss": out.loss.item()}
    n = int((batch.labels[:, 1:] != -100).sum())
    return out.loss * n / token_denom, {"loss": out.loss.item()}


@torch.no_grad()
def eval_lm(engine, rows: list[dict], collate, micro_batch: int) -> dict[str, float]:
    """Eval loss (token-weighted mean over the whole eval split) and perplexity."""
    engine.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), micro_batch):
        batch = collate(rows[i:i + micro_batch])
        out = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                     use_cache=False)
        n = int((batch.labels[:, 1:] != -100).sum())
        total += out.loss.float().item() * n
        count += n
    engine.train()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def run_sft(cfg: SFTConfig) -> Path:
    """Train and save `<output_dir>/model` (a plain HF folder). Returns that path."""
    ctx: StepContext = start_step(cfg, "sft")

    tok = ctx.tokenizer
    train_rows = tokenized_rows(cfg.data, tok, "sft", "train", train_on_prompt=cfg.sft.train_on_prompt)
    eval_rows = tokenized_rows(cfg.data, tok, "sft", "eval", train_on_prompt=cfg.sft.train_on_prompt)
    if cfg.sft.packing:
        train_rows = pack_rows(train_rows, cfg.data.max_length)

    def collate(rows: list[dict]) -> TokenBatch:
        return collate_sft(rows, tok.pad_token_id).to(ctx.device)

    task = TrainTask(
        name="sft", train_rows=train_rows, eval_rows=eval_rows, collate=collate, loss=lm_loss,
        evaluate=lambda engine, rows: eval_lm(engine, rows, collate, cfg.optim.micro_batch_size),
        count_tokens=lambda b: int(b.attention_mask.sum()), count_loss_tokens=loss_tokens,
    )
    model = load_causal_lm(cfg.model, dtype=ctx.weights_dtype, tokenizer=tok)
    train(task, model, loop_settings(cfg), bf16=ctx.bf16, rank=ctx.rank, world=ctx.world,
          on_done=lambda engine: finish_model(ctx, engine, merge_lora=cfg.model.lora.merge_on_save))
    return ctx.model_dir
