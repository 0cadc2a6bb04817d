"""`chatrl rft`: fine-tuning from evaluation (rejection sampling / best-of-n), "evaluate, analyse the errors,
fine-tune again with new data" as one command. One round (the numbered steps of `run_round`):

1. sample rollout.samples_per_prompt replies to rollout.prompts_per_rollout training prompts with the current model
   (Hybrid Engine, the episodes code of `chatrl grpo`), scored like `chatrl grpo` scores them;
2. keep the best sample of each prompt (or all above rft.threshold) and write them as a chat dataset with their
   scores (`round-NN/kept.jsonl`; every sample in `round-NN/samples.jsonl`, for error analysis);
3. SFT on the kept samples with the SFT step itself (`run_sft`, data.paths=[kept.jsonl]) -> `round-NN/sft/model`;
4. score the fine-tuned model on held-out prompts -> `round-NN/round.json`.
Round k+1 samples from round k's model. Each step's output is written atomically, so a restarted run skips the
finished rounds and steps; a round's SFT resumes from its own checkpoints. Per round: `metrics.jsonl`, a printed
table and `rounds.json` (mean score of all samples, mean best-of-n, kept, held-out score of the model).
"""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from chatrl.config import SFTConfig
from chatrl.config_offline import RFTConfig
from chatrl.engine.collectives import barrier
from chatrl.errors import ChatrlError
from chatrl.log import MetricsLogger
from chatrl.rollout.episodes import Task
from chatrl.steps.common import StepContext, start_step
from chatrl.steps.rft_samples import (
    Scorer,
    build_scorer,
    check_prompts,
    evaluate,
    load_sampler,
    play,
    read_samples,
    round_stats,
    select_samples,
    settings_for,
    summary_json,
    write_jsonl_atomic,
)
from chatrl.steps.sft import run_sft

T = TypeVar("T")
Summary = dict[str, object]


def round_dir(cfg: RFTConfig, k: int) -> Path:
    return Path(cfg.output_dir) / f"round-{k:02d}"


def round_model(cfg: RFTConfig, k: int) -> Path:
    """Round k's fine-tuned model (found by place, not by a stored path, so a moved run directory resumes)."""
    return round_dir(cfg, k) / "sft" / "model"


def sft_config(cfg: RFTConfig, k: int, start_model: str, kept: Path) -> SFTConfig:
    """Round k's SFT: the run's model, optim, deepspeed, logging and checkpoint sections, data = the kept file
    alone (all of it in the SFT shard; data.eval_fraction of it held out for the eval loss)."""
    data = dataclasses.replace(cfg.data, paths=[str(kept)], weights=[], schema="chat", split="1,0,0",
                               max_rows=None, skip_bad_rows=False)
    sft = SFTConfig(output_dir=str(round_dir(cfg, k) / "sft"), seed=cfg.seed + k,
                    model=dataclasses.replace(cfg.model, name_or_path=start_model), data=data, optim=cfg.optim,
                    deepspeed=cfg.deepspeed, logging=cfg.logging, checkpoint=cfg.checkpoint, sft=cfg.sft)
    sft.check()
    return sft


def on_rank0(ctx: StepContext, fn: Callable[[], T]) -> T | None:
    """Sampling, scoring and evaluation run on rank 0 (they write the files every rank then reads)."""
    result = fn() if ctx.rank == 0 else None
    barrier()
    return result


def _bar(cfg: RFTConfig, ctx: StepContext, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=not cfg.logging.progress or ctx.rank != 0)


# ----------------------------------------------------------------------------- the steps of a round


def sample_and_keep(cfg: RFTConfig, ctx: StepContext, scorer: Scorer, k: int, policy_path: str) -> Path:
    """Steps 1-2: n samples for round k's prompts (train tasks continue where round k-1 stopped), scored; the kept
    ones and all of them written as JSONL. Returns the kept file."""
    r, x = cfg.rollout, cfg.rft
    first = (k - 1) * r.prompts_per_rollout
    tasks = [Task("train", p, cfg.seed * 1_000_003 + p) for p in range(first, first + r.prompts_per_rollout)]
    policy = load_sampler(policy_path, cfg, ctx.device)
    with _bar(cfg, ctx, len(tasks) * r.samples_per_prompt, f"rft round {k}: sampling") as bar:
        samples = play(policy, scorer, cfg, tasks, settings_for(cfg, sample=True, seed=cfg.seed * 100_003 + k * 101),
                       r.samples_per_prompt, bar.update)
    kept = select_samples(samples, x.keep, x.threshold)
    if len(kept) < 2:
        raise ChatrlError(f"rft round {k}: kept {len(kept)} of {len(samples)} samples (rft.keep={x.keep}, "
                          f"rft.threshold={x.threshold}); SFT needs at least 2 (one is held out): lower "
                          "rft.threshold or raise rollout.prompts_per_rollout / rollout.samples_per_prompt")
    out = round_dir(cfg, k)
    write_jsonl_atomic(out / "samples.jsonl", samples)
    return write_jsonl_atomic(out / "kept.jsonl", kept)  # last: its presence means steps 1-2 are done


def evaluate_model(cfg: RFTConfig, ctx: StepContext, scorer: Scorer, path: str, label: str) -> dict[str, float]:
    """Step 4: the held-out score of the model at `path` (nothing when rft.eval_prompts=0)."""
    x = cfg.rft
    if x.eval_prompts == 0:
        return {}
    policy = load_sampler(path, cfg, ctx.device)
    with _bar(cfg, ctx, x.eval_prompts * max(x.eval_samples, 1), f"rft {label}: evaluating") as bar:
        result = evaluate(policy, scorer, cfg, bar.update)
    del policy
    gc.collect()
    return result


def run_round(cfg: RFTConfig, ctx: StepContext, scorer: Scorer, k: int, policy_path: str) -> Summary:
    """One round from whatever of it is already on disk."""
    out = round_dir(cfg, k)
    kept = out / "kept.jsonl"
    # 1-2. sample n replies per prompt with the current model, score them, keep the best -> kept.jsonl
    if not kept.is_file():
        on_rank0(ctx, lambda: sample_and_keep(cfg, ctx, scorer, k, policy_path))
        gc.collect()
    # 3. SFT on the kept samples, starting from the model that sampled them (resumes from its checkpoints)
    model = round_model(cfg, k)
    if not model.is_dir():
        run_sft(sft_config(cfg, k, policy_path, kept))
        gc.collect()
    # 4. score the fine-tuned model on held-out prompts; round.json marks the round finished
    stats = round_stats(read_samples(out / "samples.jsonl"), read_samples(kept))
    summary: Summary = {"round": k, "model": str(model), "sampled_from": policy_path, **stats}
    summary.update(on_rank0(ctx, lambda: evaluate_model(cfg, ctx, scorer, str(model), f"round {k}")) or {})
    if ctx.rank == 0:
        summary_json(out / "round.json", summary)
    return summary


def base_summary(cfg: RFTConfig, ctx: StepContext, scorer: Scorer, log: MetricsLogger) -> Summary | None:
    """Round 0: the starting model's held-out score (once; cached in round-00.json)."""
    if not cfg.rft.eval_base or cfg.rft.eval_prompts == 0:
        return None
    path = Path(cfg.output_dir) / "round-00.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    summary: Summary = {"round": 0, "model": cfg.model.name_or_path}
    summary.update(on_rank0(ctx, lambda: evaluate_model(cfg, ctx, scorer, cfg.model.name_or_path, "start")) or {})
    if ctx.rank == 0:
        summary_json(path, summary)
    log.log(0, {key: v for key, v in summary.items() if isinstance(v, (int, float))})
    return summary


# ----------------------------------------------------------------------------- report


def _num(row: Summary, key: str, fmt: str = ".3f") -> str:
    value = row.get(key)
    return "-" if not isinstance(value, (int, float)) else format(value, fmt)


def rounds_table(rows: list[Summary], n: int, out: Path, success: bool) -> Table:
    """One row per round (0 = the starting model); `success` adds the environment's success rate."""
    table = Table(title=f"chatrl rft: best-of-{n} rounds in {out}")
    names = ["round", "mean score", f"best-of-{n}", "kept", "held-out score (s.e.)"]
    for name in [*names, *(["held-out success"] if success else []), "model"]:
        table.add_column(name, justify="left" if name == "model" else "right")
    for row in rows:
        score = _num(row, "eval_score")
        if score != "-":
            score += f" ({_num(row, 'eval_score_se')})"
        model = Path(str(row["model"]))
        shown = str(model.relative_to(out)) if model.is_relative_to(out) else str(model)
        table.add_row(str(row["round"]), _num(row, "sample_score"), _num(row, "best_of_n_score"),
                      _num(row, "kept", "d"), score, *([_num(row, "eval_success", ".1%")] if success else []), shown)
    return table


def write_rounds(cfg: RFTConfig, rows: list[Summary]) -> Path:
    out = Path(cfg.output_dir) / "rounds.json"
    summary_json(out, {"keep": cfg.rft.keep, "threshold": cfg.rft.threshold,
                       "samples_per_prompt": cfg.rollout.samples_per_prompt,
                       "prompts_per_round": cfg.rollout.prompts_per_rollout,
                       "final_model": rows[-1]["model"], "rounds": rows})
    return out


# ----------------------------------------------------------------------------- the run


def run_rft(cfg: RFTConfig) -> Path:
    """Run rft.rounds rounds (finished ones are skipped); returns the last round's model folder."""
    # 0. start: process group, seed, config.yaml; the environment and the reward sources are checked before
    #    any model loads (no prompts, a reward function that does not load: one line)
    ctx = start_step(cfg, "rft")
    check_prompts(cfg)
    scorer = build_scorer(cfg, ctx.device)
    rounds = range(1, cfg.rft.rounds + 1)
    finished = [k for k in rounds if (round_dir(cfg, k) / "round.json").is_file()]
    log = MetricsLogger(cfg.output_dir, rank=ctx.rank, total_steps=cfg.rft.rounds, start_step=len(finished),
                        report_to=cfg.logging.report_to, progress=cfg.logging.progress, desc="rft")
    rows: list[Summary] = []
    # 1-4 for round 0: the starting model's held-out score, the line every round is compared with
    base = base_summary(cfg, ctx, scorer, log)
    if base is not None:
        rows.append(base)
    policy_path = cfg.model.name_or_path
    # 1-4 per round (`run_round`): sample, keep, SFT, evaluate; round k+1 samples from round k's model
    for k in rounds:
        done = round_dir(cfg, k) / "round.json"
        if done.is_file():
            summary = json.loads(done.read_text(encoding="utf-8"))
            log.write(f"[rft] round {k}: finished earlier ({done}), skipping")
        else:
            summary = run_round(cfg, ctx, scorer, k, policy_path)
            log.log(k, {key: v for key, v in summary.items() if isinstance(v, (int, float))})
            log.advance(1, best_of_n=summary["best_of_n_score"], eval=summary.get("eval_score", "-"))
        rows.append(summary)
        policy_path = str(round_model(cfg, k))
    log.close()
    # 5. rounds.json and the table: mean score, best-of-n, kept, held-out score per round
    if ctx.rank == 0:
        write_rounds(cfg, rows)
        # the chat environment has no success criterion of its own: its success column would read 0%
        Console().print(rounds_table(rows, cfg.rollout.samples_per_prompt, Path(cfg.output_dir),
                                     success=cfg.env.name != "chat"))
    return Path(policy_path)
