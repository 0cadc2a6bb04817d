"""The supervised training loop shared by SFT and the reward model.

A step describes itself as a `TrainTask` (rows, collate, loss, evaluate); `train()` owns everything
else: DeepSpeed engine, deterministic data order, gradient accumulation, logging, periodic eval,
resumable checkpoints and the final HF folder.

Data order is a pure function of (seed, epoch): global optimizer step `s` takes the rows
`perm_epoch[b : b + G]` with G = micro_batch * grad_accum * world; micro-batch `m` of that step takes
the m-th slice of G/grad_accum rows and rank `r` every world-th row of it. So resuming needs only `s`,
and one process with micro-batch 4 sees the same rows per step as two with micro-batch 2.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from chatrl.config import CheckpointConfig, DeepSpeedConfig, LoggingConfig, OptimConfig
from chatrl.engine import checkpoint as ckpt
from chatrl.engine.collectives import global_sum
from chatrl.engine.deepspeed import initialize
from chatrl.engine.faults import BadSteps, StopRequest
from chatrl.errors import ChatrlError
from chatrl.log import MetricsLogger


@dataclass
class TrainTask:
    """What a step plugs into the loop. `loss(engine, batch) -> (scalar loss, metrics)`;
    `evaluate(engine, rows) -> metrics`; `count_tokens(batch) -> int` for tokens/s.

    `count_loss_tokens(rows) -> int`, for a loss that is a mean over tokens: the loop counts the tokens of the whole
    optimizer step over all micro-batches and ranks and calls `loss(engine, batch, token_denom=D)` with
    D = tokens / (grad_accum * world), so the step's gradient is that of one token mean over every row it saw, however
    the rows are cut into micro-batches and ranks (DeepSpeed averages micro-batch losses and ranks' gradients)."""
    name: str
    train_rows: list[dict]
    eval_rows: list[dict]
    collate: Callable[[list[dict]], Any]
    loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]  # (engine, batch[, token_denom=])
    evaluate: Callable[[Any, list[dict]], dict[str, float]]
    count_tokens: Callable[[Any], int]
    count_loss_tokens: Callable[[list[dict]], int] | None = None


@dataclass
class LoopSettings:
    output_dir: str
    seed: int
    optim: OptimConfig
    deepspeed: DeepSpeedConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig


def save_config(cfg: Any, output_dir: str | Path) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def plan_steps(n_rows: int, optim: OptimConfig, world: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps); fails with the numbers when the data is too small."""
    per_step = optim.micro_batch_size * optim.grad_accum * world
    steps_per_epoch = n_rows // per_step
    if steps_per_epoch == 0:
        raise ChatrlError(f"{n_rows} training rows are fewer than one optimizer step needs "
                          f"(micro_batch_size {optim.micro_batch_size} x grad_accum {optim.grad_accum} x "
                          f"{world} processes = {per_step}); lower optim.micro_batch_size or add data")
    total = optim.max_steps if optim.max_steps is not None else optim.epochs * steps_per_epoch
    return steps_per_epoch, total


def micro_batch_rows(n_rows: int, step: int, micro: int, *, steps_per_epoch: int, optim: OptimConfig,
                     seed: int, rank: int, world: int) -> list[int]:
    """Row indices of micro-batch `micro` of optimizer step `step` on `rank` (see module docstring)."""
    epoch, in_epoch = divmod(step, steps_per_epoch)
    perm = np.random.default_rng(seed + epoch).permutation(n_rows)
    per_micro = optim.micro_batch_size * world
    start = in_epoch * per_micro * optim.grad_accum + micro * per_micro
    return perm[start:start + per_micro][rank::world].tolist()


def train(task: TrainTask, model: torch.nn.Module, s: LoopSettings, *, bf16: bool, rank: int, world: int,
          on_done: Callable[[Any], None]) -> dict[str, float]:
    """Run the loop to the end (resuming if a checkpoint exists); `on_done(engine)` saves the final model.

    SIGTERM / SIGINT: the current step finishes, a checkpoint is written and the process exits 0 (SystemExit).
    A step with a non-finite loss or gradients is skipped; `optim.max_bad_steps` in a row raise a ChatrlError."""
    steps_per_epoch, total = plan_steps(len(task.train_rows), s.optim, world)
    if ckpt.finished_without_state(s.output_dir, s.checkpoint.resume, total):
        return {}
    engine = initialize(model, s.optim, s.deepspeed, bf16=bf16, total_steps=total, world_size=world)
    start, state = 0, {}
    resume_from = ckpt.find_resume_point(s.output_dir, s.checkpoint.resume)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, {"model": engine})
        start = state["step"]
    bad = BadSteps(s.optim.max_bad_steps)
    bad.load_state_dict(state.get("bad_steps", {}))
    log = MetricsLogger(s.output_dir, rank=rank, total_steps=total, start_step=start,
                        report_to=s.logging.report_to, progress=s.logging.progress, desc=task.name)
    if resume_from is not None:
        log.write(f"resumed from {resume_from} at step {start}/{total}")
    eval_metrics: dict[str, float] = {}
    with StopRequest() as stop:
        for step in range(start, total):
            done = step + 1
            bad.where = f"[{task.name}] step {done}"
            # 1. forward/backward each micro-batch; the optimizer steps at the accumulation boundary (skipped when
            #    the loss or a gradient is not finite)
            metrics = optimizer_step(task, engine, s, step, steps_per_epoch, bad, rank=rank, world=world)
            # 2. log loss, LR, throughput and the count of skipped steps
            if done % s.logging.log_every == 0 or done == total:
                log.log(done, metrics)
            log.advance(1, **{k: metrics[k] for k in list(metrics)[:2]}, tok_s=metrics["tokens_per_s"])
            # 3. evaluate periodically (and at the end)
            if (s.logging.eval_every and done % s.logging.eval_every == 0) or done == total:
                eval_metrics = task.evaluate(engine, task.eval_rows)
                log.log(done, eval_metrics, split="eval")
                log.write(f"[{task.name}] step {done}/{total} eval: " +
                          " ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items() if isinstance(v, float)))
            # 4. resumable checkpoint: periodic, at the end, or now when any rank got SIGTERM / SIGINT
            stopping = stop.agreed() and done < total
            if stopping or (s.checkpoint.every and done % s.checkpoint.every == 0) or done == total:
                path = ckpt.save_checkpoint(s.output_dir, done, {"model": engine},
                                            {"total": total, "bad_steps": bad.state_dict()},
                                            keep_last=s.checkpoint.keep_last)
            if stopping:
                log.close()
                stop.exit(done, total, path)
    if start >= total and not eval_metrics:  # resumed a finished run: evaluate the restored model once
        eval_metrics = task.evaluate(engine, task.eval_rows)
    log.close()
    on_done(engine)
    ckpt.mark_finished(s.output_dir, total, keep_state=s.checkpoint.keep_final_state)
    return eval_metrics


def optimizer_step(task: TrainTask, engine: Any, s: LoopSettings, step: int, steps_per_epoch: int, bad: BadSteps,
                   *, rank: int, world: int) -> dict[str, float]:
    """Step 1 of the loop: the grad_accum micro-batches of optimizer step `step`; returns their mean metrics plus
    LR, tokens/s, epoch and bad_steps (skipped updates so far)."""
    t0, tokens, metrics = time.perf_counter(), 0, {}
    micro_rows = [[task.train_rows[i] for i in micro_batch_rows(len(task.train_rows), step, micro,
                                                                steps_per_epoch=steps_per_epoch, optim=s.optim,
                                                                seed=s.seed, rank=rank, world=world)]
                  for micro in range(s.optim.grad_accum)]
    kwargs = {}
    if task.count_loss_tokens is not None:
        step_tokens = global_sum(float(sum(task.count_loss_tokens(rows) for rows in micro_rows)))
        kwargs["token_denom"] = max(step_tokens, 1.0) / (s.optim.grad_accum * world)
    for rows in micro_rows:
        batch = task.collate(rows)
        loss, micro_metrics = task.loss(engine, batch, **kwargs)
        bad.backward_step(engine, loss)
        tokens += task.count_tokens(batch) * world
        for k, v in micro_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / s.optim.grad_accum
    elapsed = time.perf_counter() - t0
    metrics.update(lr=engine.get_lr()[0], tokens_per_s=tokens / elapsed, epoch=step / steps_per_epoch,
                   bad_steps=bad.total)
    return metrics


def full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """A full (unpartitioned) state dict of the engine's module; under ZeRO-3 gathered on every rank (collective)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return None
