"""Step 2: reward model. A causal-LM backbone with a scalar head, trained with the pairwise
Bradley-Terry loss on (chosen, rejected) replies to the same prompt; both halves of a pair go through
the model in one batch (see `PairBatch`). Saved as an `AutoModelForSequenceClassification` folder."""

from __future__ import annotations

from pathlib import Path

import torch

from chatrl.algorithms.losses import pairwise_reward_loss
from chatrl.batches import PairBatch
from chatrl.config import RewardConfig
from chatrl.data.prepare import tokenized_rows
from chatrl.data.tokenize import collate_pairs
from chatrl.models.reward import TokenValueModel, load_reward_model, sequence_scores
from chatrl.steps.common import StepContext, finish_model, loop_settings, start_step
from chatrl.steps.supervised import TrainTask, train


def pair_scores(engine, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B] of the chosen and the rejected replies, from one forward over the [2B, T] batch."""
    scores = sequence_scores(engine, batch.input_ids, batch.attention_mask).float()
    half = batch.input_ids.shape[0] // 2
    return scores[:half], scores[half:]


def make_loss(cfg: RewardConfig):

    def loss_fn(engine, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_scores(engine, batch)
        margin = batch.margin.float() if cfg.rm_loss.use_margin else None
        loss, stats = pairwise_reward_loss(chosen, rejected, margin=margin, center_coef=cfg.rm_loss.center_coef)
        return loss, {"loss": loss.item(), **{k: float(v) for k, v in stats.items()}}

    return loss_fn


@torch.no_grad()
def eval_pairs(engine, rows: list[dict], collate, micro_batch: int) -> dict[str, float]:
    """Accuracy (chosen > rejected), mean chosen/rejected score, mean margin and score spread on `rows`."""
    engine.eval()
    chosen, rejected = [], []
    for i in range(0, len(rows), micro_batch):
        c, r = pair_scores(engine, collate(rows[i:i + micro_batch]))
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    engine.train()
    c, r = torch.cat(chosen), torch.cat(rejected)
    both = torch.cat([c, r])
    # same keys as the training stats of `pairwise_reward_loss`, so train and eval share a plot
    return {"accuracy": (c > r).float().mean().item(), "pairs": float(len(c)), "chosen": c.mean().item(),
            "rejected": r.mean().item(), "margin": (c - r).mean().item(),
            "score_std": both.std().item() if len(both) > 1 else 0.0,
            "score_p10": both.quantile(0.1).item(), "score_p90": both.quantile(0.9).item()}


def run_reward(cfg: RewardConfig) -> Path:
    """Train and save `<output_dir>/model` (an AutoModelForSequenceClassification folder). Returns that path."""
    ctx: StepContext = start_step(cfg, "reward")

    tok = ctx.tokenizer
    train_rows = tokenized_rows(cfg.data, tok, "reward", "train")
    eval_rows = tokenized_rows(cfg.data, tok, "reward", "eval")

    def collate(rows: list[dict]) -> PairBatch:
        return collate_pairs(rows, tok.pad_token_id).to(ctx.device)

    task = TrainTask(
        name="reward", train_rows=train_rows, eval_rows=eval_rows, collate=collate, loss=make_loss(cfg),
        evaluate=lambda engine, rows: eval_pairs(engine, rows, collate, cfg.optim.micro_batch_size),
        count_tokens=lambda b: int(b.attention_mask.sum()),
    )
    # DeepSpeed must see the forward whose output the loss uses: wrap so forward returns per-token values
    model = TokenValueModel(load_reward_model(
        cfg.model.name_or_path, dtype=ctx.weights_dtype, lora_cfg=cfg.model.lora if cfg.model.lora.r > 0 else None,
        tokenizer=tok, gradient_checkpointing=cfg.model.gradient_checkpointing,
        trainable_layers=cfg.model.trainable_layers, allow_pickle=cfg.model.allow_pickle))
    metrics = train(task, model, loop_settings(cfg), bf16=ctx.bf16, rank=ctx.rank, world=ctx.world,
                    on_done=lambda engine: finish_model(ctx, engine, merge_lora=True))
    if ctx.rank == 0 and metrics:
        print("reward model eval: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return ctx.model_dir
