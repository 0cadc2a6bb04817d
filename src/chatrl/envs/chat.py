"""`chat`: plain RLHF as an environment, so one trainer serves both settings. One turn: the prompt from the run's
dataset, the reply, done. The environment itself rewards 0: the trainer adds the reward model and the reward
functions, which read `info["reference"]` and the dataset's other columns (`info` carries `Prompt.extra`).

Prompts come from the data pipeline's RLHF shard (split train/eval = the shard's train/eval parts, disjoint by the
pipeline's split), or from explicit `prompts` / `eval_prompts` lists (tests, quick experiments).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Union

from chatrl.config import DataConfig
from chatrl.data.prepare import load_records
from chatrl.data.types import Message, Prompt
from chatrl.envs.base import TextEnv, user
from chatrl.errors import ChatrlError

PromptSpec = Union[str, list[Message]]
MAX_CACHED = 4
_PROMPTS: dict[tuple[str, str, tuple[tuple[str, int, int], ...]], tuple[Prompt, ...]] = {}


def _to_prompt(item: PromptSpec, key: str, i: int) -> Prompt:
    if isinstance(item, str):
        return Prompt(messages=[user(item)], source=f"env.kwargs.{key}[{i}]")
    if isinstance(item, list) and item and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in item):
        return Prompt(messages=[{"role": m["role"], "content": m["content"]} for m in item],
                      source=f"env.kwargs.{key}[{i}]")
    raise ChatrlError(f"chat: env.kwargs.{key}[{i}] must be a string or a list of {{'role', 'content'}} messages, "
                      f"got {item!r:.80}")


def _stamps(paths: list[str]) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of local data paths, so a cached read is redone when a file changes."""
    out = []
    for spec in paths:
        local = Path(spec.partition("#")[0]).expanduser()
        st = local.stat() if local.exists() else None
        out.append((spec, st.st_mtime_ns if st else 0, st.st_size if st else 0))
    return tuple(out)


def _data_prompts(data: DataConfig, split: str) -> tuple[Prompt, ...]:
    """The RLHF shard's prompts, read once per process: the trainer makes one environment per rollout row, and
    the records are only read (reset copies the messages, step copies the extras)."""
    key = (json.dumps(dataclasses.asdict(data), sort_keys=True, default=str), split, _stamps(data.paths))
    if key not in _PROMPTS:
        if len(_PROMPTS) >= MAX_CACHED:
            _PROMPTS.clear()
        records, _ = load_records(data, "rlhf", split)  # type: ignore[arg-type]
        _PROMPTS[key] = tuple(r for r in records if isinstance(r, Prompt))
    return _PROMPTS[key]


class ChatEnv(TextEnv):
    """kwargs: prompts (list of strings or message lists; default: the run's data), eval_prompts (their held-out
    counterpart). `data` is the run's DataConfig, given by make_env (default: DataConfig(), the shipped sample)."""

    max_turns = 1
    uses_data = True  # make_env passes the run's DataConfig

    def __init__(self, prompts: list[PromptSpec] | None = None, eval_prompts: list[PromptSpec] | None = None,
                 data: DataConfig | None = None) -> None:
        super().__init__()
        self.data = data or DataConfig()
        self.prompts: dict[str, list[Prompt]] = {}
        for split, key, items in (("train", "prompts", prompts), ("eval", "eval_prompts", eval_prompts)):
            if items is not None:
                if not isinstance(items, list) or not items:
                    raise ChatrlError(f"chat: env.kwargs.{key} must be a non-empty list")
                self.prompts[split] = [_to_prompt(item, key, i) for i, item in enumerate(items)]
        self.explicit = prompts is not None
        self.current = Prompt(messages=[])

    def _split_prompts(self, split: str) -> list[Prompt]:
        """The prompts of a split, read from the data pipeline on first use (eval is often never needed)."""
        if split not in self.prompts:
            if self.explicit:
                raise ChatrlError(f"chat: no {split} prompts; give env.kwargs.eval_prompts with env.kwargs.prompts")
            self.prompts[split] = list(_data_prompts(self.data, split))
        return self.prompts[split]

    def _start(self, split: str, task: int) -> tuple[list[Message], dict[str, Any]]:
        rows = self._split_prompts(split)
        self.current = rows[task % len(rows)]
        return [dict(m) for m in self.current.messages], {"split": split, "task": task, "source": self.current.source}

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        self._begin_step(action)
        self.done = True
        return [], 0.0, True, False, {**copy.deepcopy(self.current.extra), "reference": self.current.reference}
