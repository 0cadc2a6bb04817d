"""`chatrl ilql`: Implicit Language Q-Learning (Snell et al. 2022), offline, on the shared supervised loop.

Data (one read of `data.paths`): preference pairs of the reward shard become two scored replies (chosen gets
`ilql.chosen_reward`, rejected `ilql.rejected_reward`), and `{prompt, response, reward}` rows of the rlhf shard
(the reward column is `ilql.reward_key`) one each. A reply's tokens (and its end-of-turn token) are the actions;
its reward sits at the last one. The LM and the heads (`models.ilql_heads`) train as ONE module through DeepSpeed
(`ILQLModel`: the engine sees the forward the loss uses), with `algorithms.ilql.ilql_loss`; the target heads follow
by Polyak averaging once per optimizer step. Saved: the plain HF folder + `ilql_heads.safetensors` / `.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from chatrl.algorithms.ilql import ilql_loss
from chatrl.config import DataConfig
from chatrl.config_offline import ILQLConfig, ILQLOptions
from chatrl.data.prepare import load_all_records
from chatrl.data.tokenize import IGNORE, collate_sft, encode_conversation
from chatrl.data.types import Message, PreferencePair, Prompt
from chatrl.errors import ChatrlError
from chatrl.models.ilql_heads import ILQLModel, check_fits, has_heads, heads_for, load_heads, save_heads
from chatrl.models.loading import load_causal_lm, resolve_model_source
from chatrl.steps.common import StepContext, finish_model, loop_settings, start_step
from chatrl.steps.supervised import TrainTask, train

Row = dict[str, object]  # {"input_ids": [T], "labels": [T], "reward": float, "source": "file:line"}


# ----------------------------------------------------------------------------- data


def parse_reward(value: object, source: str, key: str) -> float:
    """A row's reward as a finite float (numbers, or numeric strings as CSV gives them); else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ChatrlError(f"{source}: field '{key}': must be a number, got {value!r}")
    try:
        reward = float(value)
    except ValueError:
        raise ChatrlError(f"{source}: field '{key}': must be a number, got {value!r}") from None
    if not math.isfinite(reward):
        raise ChatrlError(f"{source}: field '{key}': must be a finite number, got {value!r}")
    return reward


def encode_scored(tok: PreTrainedTokenizerBase, prompt: list[Message], reply: str, reward: float, source: str,
                  data: DataConfig) -> Row | None:
    """Prompt + reply through the chat template; labels mark the reply tokens (the actions). Too long, with
    data.overlength=truncate (as the reward step does): the prompt keeps its last max_prompt_length tokens, then the
    row its last max_length tokens; never cut at the end, where the reward sits. overlength=drop: None."""
    conv = list(prompt) + [{"role": "assistant", "content": reply}]
    row = encode_conversation(tok, conv, max_length=1 << 30)
    if row is None:
        return None
    ids, labels = row["input_ids"], row["labels"]
    n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE)
    if n_prompt > data.max_prompt_length:
        if data.overlength == "drop":
            return None
        cut = n_prompt - data.max_prompt_length
        ids, labels = ids[cut:], labels[cut:]
    if len(ids) > data.max_length:
        if data.overlength == "drop":
            return None
        ids, labels = ids[-data.max_length:], labels[-data.max_length:]
    return {"input_ids": ids, "labels": labels, "reward": reward, "source": source}


def _scored_replies(shards: dict[str, list], part: str, o: ILQLOptions,
                    skip_bad: bool) -> tuple[list[tuple[list[Message], str, float, str]], int]:
    """(prompt, reply, reward, source) of every usable record of one part, and how many rows were skipped."""
    out, skipped = [], 0
    for rec in shards.get(f"reward_{part}", []):
        assert isinstance(rec, PreferencePair)
        out.append((rec.prompt_messages, rec.chosen, o.chosen_reward, rec.source))
        out.append((rec.prompt_messages, rec.rejected, o.rejected_reward, rec.source))
    for rec in shards.get(f"rlhf_{part}", []):
        assert isinstance(rec, Prompt)
        if o.reward_key not in rec.extra:
            continue  # a prompt without a score (e.g. a pair's prompt in the rlhf shard): not ILQL data
        try:
            if rec.reference is None:
                raise ChatrlError(f"{rec.source}: field 'response': missing, but the row has a "
                                  f"'{o.reward_key}' (ILQL needs the reply that was scored)")
            out.append((rec.messages, rec.reference, parse_reward(rec.extra[o.reward_key], rec.source, o.reward_key),
                        rec.source))
        except ChatrlError:
            if not skip_bad:
                raise
            skipped += 1
    return out, skipped


def ilql_rows(cfg: ILQLConfig, tok: PreTrainedTokenizerBase) -> tuple[list[Row], list[Row]]:
    """(train, eval) rows: one per scored reply. Fails with what ILQL reads when there is nothing to train on."""
    shards, _ = load_all_records(cfg.data)
    parts: list[list[Row]] = []
    for part in ("train", "eval"):
        replies, skipped = _scored_replies(shards, part, cfg.ilql, cfg.data.skip_bad_rows)
        rows = [r for r in (encode_scored(tok, p, reply, rew, src, cfg.data)
                            for p, reply, rew, src in replies) if r is not None]
        if skipped or len(rows) < len(replies):
            print(f"ilql data {part}: {len(rows)} scored replies ({len(replies) - len(rows)} over "
                  f"data.max_length={cfg.data.max_length} / max_prompt_length={cfg.data.max_prompt_length} "
                  f"dropped (data.overlength=drop), {skipped} bad rows skipped)")
        parts.append(rows)
    if not parts[0]:
        raise ChatrlError("no ILQL training rows: ILQL reads preference pairs from the reward shard and "
                          f"{{prompt, response, {cfg.ilql.reward_key}}} rows from the rlhf shard of data.paths "
                          f"(data.split={cfg.data.split}: sft,reward,rlhf shares; e.g. 0,1,1 gives ILQL every row)")
    return parts[0], parts[1]


@dataclass
class ILQLBatch:
    """input_ids, attention_mask [B, T] right padded. The loss looks only at a window of R positions per row, from
    its first to its last action (the prompt is context only, and the [.., V] tensors of the LM and Q heads are the
    cost): positions [B, R] = the window's columns in T (clamped to T - 1, which is never an action);
    actions [B, R]: a_t = input_ids[:, t + 1]; action_mask [B, R]: 1 where a_t is a reply token;
    rewards [B, R]: each row's reward at its last action."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    actions: torch.Tensor
    action_mask: torch.Tensor
    rewards: torch.Tensor


def collate_ilql(rows: list[Row], pad_id: int, device: torch.device | str = "cpu") -> ILQLBatch:
    """Pad rows into an `ILQLBatch` (state t predicts token t + 1, so actions and their mask are shifted by one)."""
    base = collate_sft(rows, pad_id)
    ids, labels = base.input_ids, base.labels
    width = ids.shape[1]
    actions = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], pad_id)], dim=1)
    mask = torch.cat([labels[:, 1:] != IGNORE, torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1).long()
    first = mask.argmax(-1)  # every row has an action (encode_conversation drops rows without one)
    last = (width - 1) - mask.flip(-1).argmax(-1)
    span = int((last - first).max()) + 1
    positions = (first[:, None] + torch.arange(span)[None, :]).clamp(max=width - 1)  # [B, R]
    rewards = torch.zeros(ids.shape, dtype=torch.float32)
    rewards[torch.arange(len(rows)), last] = torch.tensor([float(r["reward"]) for r in rows])  # type: ignore[arg-type]
    return ILQLBatch(ids.to(device), base.attention_mask.to(device), positions.to(device),
                     actions.gather(1, positions).to(device), mask.gather(1, positions).to(device),
                     rewards.gather(1, positions).to(device))


# ----------------------------------------------------------------------------- loss and eval


def _losses(engine, batch: ILQLBatch, o: ILQLOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    out = engine(batch.input_ids, batch.attention_mask, batch.positions, batch.actions)
    loss, stats = ilql_loss(out.logits, out.q, out.target_q, out.v, batch.actions, batch.rewards, batch.action_mask,
                            gamma=o.gamma, tau=o.tau, cql_alpha=o.cql_alpha, awac_weight=o.awac_weight)
    return loss, stats, out


def make_loss(o: ILQLOptions):
    def loss_fn(engine, batch: ILQLBatch) -> tuple[torch.Tensor, dict[str, float]]:
        # the Polyak update of the last optimizer step, applied before the next forward needs the targets
        engine.module.heads.sync_targets(engine.global_steps, o.polyak_alpha)
        loss, stats, _ = _losses(engine, batch, o)
        return loss, {"loss": loss.item(), **{k: float(v) for k, v in stats.items()}}

    return loss_fn


@torch.no_grad()
def eval_ilql(engine, rows: list[Row], collate, micro_batch: int, o: ILQLOptions) -> dict[str, float]:
    """Mean loss terms over the eval rows (weighted by their action tokens) and adv_sign_acc: the share of rows
    with a non-zero reward whose summed advantage sum_t (Qhat(s_t, a_t) - V(s_t)) has the reward's sign."""
    if not rows:
        return {}
    engine.eval()
    totals: dict[str, float] = {}
    tokens, agree, signed = 0.0, 0, 0
    for i in range(0, len(rows), micro_batch):
        batch = collate(rows[i:i + micro_batch])
        loss, stats, out = _losses(engine, batch, o)
        n = float(batch.action_mask.sum())
        for k, v in {"loss": loss, **stats}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        tokens += n
        adv = ((out.target_q - out.v) * batch.action_mask).sum(-1)
        reward = batch.rewards.sum(-1)
        agree += int(((adv > 0) == (reward > 0))[reward != 0].sum())
        signed += int((reward != 0).sum())
    engine.train()
    metrics = {k: v / max(tokens, 1.0) for k, v in totals.items()}
    if signed:  # no row with a non-zero reward: no accuracy to report (NaN would not be valid JSON)
        metrics["adv_sign_acc"] = agree / signed
    return metrics


# ----------------------------------------------------------------------------- the step


def build_model(cfg: ILQLConfig, ctx: StepContext) -> ILQLModel:
    """The LM (with LoRA / trainable_layers as configured) + heads: continued from the starting folder when it
    has them, new otherwise."""
    lm = load_causal_lm(cfg.model, dtype=ctx.weights_dtype, tokenizer=ctx.tokenizer)
    source = resolve_model_source(cfg.model.name_or_path)
    if has_heads(source):
        heads, meta = load_heads(source)
        check_fits(heads, lm, source)
        heads.train()
        if ctx.rank == 0:
            print(f"ilql: continuing from the ILQL heads in {source} (two_q={meta.two_q}; ilql.two_q and "
                  "ilql.head_seed apply to new heads only)")
    else:
        heads = heads_for(lm, two_q=cfg.ilql.two_q, seed=cfg.ilql.head_seed)
    return ILQLModel(lm, heads.to(ctx.weights_dtype))


def run_ilql(cfg: ILQLConfig) -> Path:
    """Train and save `<output_dir>/model` (a plain HF folder + ILQL heads beside it). Returns that path."""
    ctx = start_step(cfg, "ilql")
    tok = ctx.tokenizer
    train_rows, eval_rows = ilql_rows(cfg, tok)

    def collate(rows: list[Row]) -> ILQLBatch:
        return collate_ilql(rows, tok.pad_token_id, ctx.device)

    o = cfg.ilql
    task = TrainTask(
        name="ilql", train_rows=train_rows, eval_rows=eval_rows, collate=collate, loss=make_loss(o),
        evaluate=lambda engine, rows: eval_ilql(engine, rows, collate, cfg.optim.micro_batch_size, o),
        count_tokens=lambda b: int(b.attention_mask.sum()),
    )

    def on_done(engine) -> None:
        heads = engine.module.heads
        heads.sync_targets(engine.global_steps, o.polyak_alpha)  # the last step's Polyak update
        out = finish_model(ctx, engine, merge_lora=cfg.model.lora.merge_on_save)  # unwraps to the LM (hf_model)
        if ctx.rank == 0:
            save_heads(heads, out, beta=o.beta)

    metrics = train(task, build_model(cfg, ctx), loop_settings(cfg), bf16=ctx.bf16, rank=ctx.rank,
                    world=ctx.world, on_done=on_done)
    if ctx.rank == 0 and metrics:
        print("ilql eval: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return ctx.model_dir
