"""The sampling half of `chatrl rft`: play n episodes per prompt with a frozen policy in a Hybrid Engine, score
them exactly as `chatrl grpo` does (`rollout.episodes.run_episodes` + `steps.rl_experience.score_episodes`:
environment return + reward functions + reward model - penalties), keep the best, and write them as a chat
dataset (`{"messages": [...], "score": ...}`, the data pipeline's `chat` schema; extra columns are kept as extras).

Nothing here trains: `steps/rft.py` hands the kept file to the SFT step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from chatrl.config_offline import RFTConfig
from chatrl.data.types import Message
from chatrl.envs.base import call_env, validate_reset
from chatrl.envs.registry import make_env
from chatrl.eval.metrics import mean_se
from chatrl.eval.responses import load_policy
from chatrl.models.loading import resolve_dtype
from chatrl.models.reward import load_reward_model
from chatrl.paths import atomic_write, atomic_write_json
from chatrl.reward_functions import RewardFunctions
from chatrl.rollout.episodes import Task, run_episodes
from chatrl.rollout.hybrid import HybridEngine
from chatrl.rollout.sampling import GenerationSettings
from chatrl.steps.rl_experience import episode_tensors, score_episodes


@dataclass
class Sample:
    """One scored episode. `task` groups the n samples of one prompt; `conversation` is the whole episode (the
    prompt, every reply, the environment's messages), i.e. what SFT trains on."""

    task: int
    index: int                    # which of the prompt's n samples
    conversation: list[Message]
    score: float                  # the episode's outcome: environment return + reward functions + reward model
    success: bool
    by_function: dict[str, float] = field(default_factory=dict)

    @property
    def reply(self) -> str:
        return next((m["content"] for m in reversed(self.conversation) if m["role"] == "assistant"), "")


@dataclass
class Scorer:
    """What scores an episode besides the environment: reward functions and the frozen reward model."""

    functions: RewardFunctions
    reward_model: nn.Module | None
    model_weight: float
    eos_penalty: float
    clip: float | None  # reward.clip: the outcome is the one `chatrl grpo` compares (`final_reward`)


@dataclass
class Policy:
    """A frozen model served by a Hybrid Engine, with the environment instances it plays in."""

    engine: HybridEngine
    tokenizer: PreTrainedTokenizerBase
    envs: list[gymnasium.Env]


def build_scorer(cfg: RFTConfig, device: torch.device) -> Scorer:
    rm = None
    if cfg.reward.model:
        rm = load_reward_model(cfg.reward.model, dtype=cfg.reward.dtype, trainable=False).to(device)
    return Scorer(RewardFunctions(cfg.reward.functions, cfg.reward.function_weights), rm,
                  cfg.reward.model_weight, cfg.reward.eos_penalty, cfg.reward.clip)


def check_prompts(cfg: RFTConfig) -> None:
    """Fail before any model loads when the environment cannot start an episode of a split the run plays (no
    prompts in the data, an environment that does not build or reset): the same checks the trainer applies."""
    env = make_env(cfg.env.name, cfg.env.kwargs, data=cfg.data)
    for split in ("train", "eval") if cfg.rft.eval_prompts else ("train",):
        validate_reset(cfg.env.name, call_env(cfg.env.name, "reset()", env.reset, seed=cfg.seed,
                                              options={"split": split, "task": 0}))


def load_sampler(path: str, cfg: RFTConfig, device: torch.device) -> Policy:
    """The model at `path` (folder, hub id or alias) frozen in a Hybrid Engine, and rft.batch_size environments."""
    model, tok = load_policy(path, dtype=cfg.model.dtype)
    engine = HybridEngine(model.to(device), inference_dtype=resolve_dtype(cfg.rollout.inference_dtype),
                          release_after_rollout=False, compile_decode=cfg.rollout.compile)
    envs = [make_env(cfg.env.name, cfg.env.kwargs, data=cfg.data) for _ in range(cfg.rft.batch_size)]
    return Policy(engine, tok, envs)


def settings_for(cfg: RFTConfig, *, sample: bool, seed: int) -> GenerationSettings:
    r = cfg.rollout
    return GenerationSettings(max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, do_sample=sample,
                              temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=seed)


def play(policy: Policy, scorer: Scorer, cfg: RFTConfig, tasks: list[Task], settings: GenerationSettings,
         samples_per_task: int, advance: Callable[[int], None] = lambda n: None) -> list[Sample]:
    """Episodes of `tasks` (each repeated `samples_per_task` times, consecutively) in batches of rft.batch_size,
    each scored as in `chatrl grpo`."""
    rows = [(t, i) for t in tasks for i in range(samples_per_task)]
    out: list[Sample] = []
    base_seed = settings.seed
    for start in range(0, len(rows), cfg.rft.batch_size):
        chunk = rows[start:start + cfg.rft.batch_size]
        settings.seed = None if base_seed is None else base_seed + start
        episodes = run_episodes(policy.engine, policy.tokenizer, policy.envs, cfg.env.name, [t for t, _ in chunk],
                                settings, max_turns=cfg.env.max_turns, max_prompt_tokens=cfg.data.max_prompt_length,
                                max_context=cfg.env.max_context, tool_settings=cfg.env)
        tensors = episode_tensors(episodes, policy.tokenizer.pad_token_id, cfg.env.gamma, policy.engine.device)
        scored = score_episodes(episodes, tensors, scorer.functions, scorer.reward_model,
                                model_weight=scorer.model_weight, eos_penalty=scorer.eos_penalty, overlong_buffer=0,
                                overlong_factor=0.0, max_new_tokens=cfg.rollout.max_new_tokens, clip=scorer.clip,
                                eos_id=policy.tokenizer.eos_token_id)
        for row, ((task, index), conv) in enumerate(zip(chunk, episodes.conversations, strict=True)):
            out.append(Sample(task.task, index, conv, float(scored.outcome[row]), episodes.success[row],
                              {k: float(v[row]) for k, v in scored.by_function.items()}))
        advance(len(chunk))
    settings.seed = base_seed
    return out


# ----------------------------------------------------------------------------- selection


def select_samples(samples: Iterable[Sample], keep: str, threshold: float | None) -> list[Sample]:
    """keep=best: each prompt's top-scored sample (the first of tied ones), dropped when a threshold is set and not
    reached; keep=threshold: every sample scoring >= threshold. Samples with an empty final reply are never kept
    (there is nothing to train on). Output in prompt order."""
    usable = [s for s in samples if s.reply.strip()]
    if keep == "threshold":
        assert threshold is not None
        return [s for s in usable if s.score >= threshold]
    best: dict[int, Sample] = {}
    for s in usable:
        if s.task not in best or s.score > best[s.task].score:
            best[s.task] = s
    return [s for s in best.values() if threshold is None or s.score >= threshold]


def round_stats(samples: list[Sample], kept: list[Sample]) -> dict[str, float]:
    """The sampling numbers of a round: mean score of all samples, mean best-of-n (per prompt), what was kept."""
    best: dict[int, float] = {}
    for s in samples:
        best[s.task] = max(best.get(s.task, -math.inf), s.score)
    return {"sample_score": sum(s.score for s in samples) / len(samples),
            "best_of_n_score": sum(best.values()) / len(best),
            "sample_success": sum(s.success for s in samples) / len(samples),
            "kept": len(kept), "kept_score": sum(s.score for s in kept) / len(kept) if kept else math.nan}


def evaluate(policy: Policy, scorer: Scorer, cfg: RFTConfig,
             advance: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """The model's mean score (and success rate) on held-out tasks 0..eval_prompts-1 of the environment's eval
    split: one greedy reply each, or rft.eval_samples sampled ones. Same tasks and seeds for every model."""
    x = cfg.rft
    tasks = [Task("eval", t, cfg.seed + t) for t in range(x.eval_prompts)]
    settings = settings_for(cfg, sample=x.eval_samples > 0, seed=cfg.seed * 7919 + 1)
    samples = play(policy, scorer, cfg, tasks, settings, max(x.eval_samples, 1), advance)
    scores = [s.score for s in samples]
    return {"eval_score": sum(scores) / len(scores), "eval_score_se": mean_se(scores),
            "eval_success": sum(s.success for s in samples) / len(samples)}


# ----------------------------------------------------------------------------- the dataset


def sample_row(s: Sample) -> dict[str, object]:
    """A chat-schema row; the columns beside `messages` are extras the data pipeline carries along."""
    return {"messages": s.conversation, "score": s.score, "task": s.task, "sample": s.index, "success": s.success,
            **({"reward_fn": s.by_function} if s.by_function else {})}


def write_jsonl_atomic(path: Path, samples: Iterable[Sample]) -> Path:
    """One JSON row per sample, written to a temp file and renamed: an existing file is always complete, so a
    restarted run may trust it."""
    return atomic_write(path, "".join(json.dumps(sample_row(s), ensure_ascii=False) + "\n" for s in samples))


def read_samples(path: Path) -> list[Sample]:
    """Samples back from a file written by `write_jsonl_atomic`."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Sample(r["task"], r["sample"], r["messages"], r["score"], r["success"], r.get("reward_fn", {}))
            for r in rows]


def summary_json(path: Path, data: dict[str, object]) -> None:
    """A small JSON summary written atomically (its presence marks a finished round)."""
    atomic_write_json(path, data, indent=1)

