"""Python reward functions: loaded by name, called with the columns they ask for, checked, summed.

A function is `fn(prompts, responses, **columns) -> list[float]` with one float per response. It is named in a
config by a built-in name (`answer_match`, `format_check`, `length_penalty`: chatrl.envs.rewards) or as
`pkg.module:fn` / `path/to/file.py:fn`. Columns are passed only if the function names them (or takes
**kwargs): `reference`, `response_ids`, `conversation`, and every key of the dataset's / environment's extras.
A function that raises or returns the wrong type, count or a non-finite number stops the run with one line
naming it and what it returned.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatrl.envs.rewards import BUILTIN_REWARD_FUNCTIONS
from chatrl.errors import ChatrlError
from chatrl.plugins import load_object

RewardFn = Callable[..., list[float]]


def load_reward_function(spec: str) -> RewardFn:
    """A built-in name or `pkg.module:fn` / `file.py:fn`."""
    if spec in BUILTIN_REWARD_FUNCTIONS:
        return BUILTIN_REWARD_FUNCTIONS[spec]
    if ":" not in spec:
        raise ChatrlError(f"reward function '{spec}': not a built-in ({', '.join(BUILTIN_REWARD_FUNCTIONS)}) and not "
                          "'pkg.module:function' or 'file.py:function'. Check reward.functions")
    return load_object(spec, "reward function", "reward.functions")  # type: ignore[return-value]


def call_reward_function(fn: RewardFn, spec: str, prompts: Sequence[Any], responses: list[str],
                         columns: dict[str, list[Any]]) -> torch.Tensor:
    """Call one function and check it returned one finite float per response -> [B] float32."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in columns.items() if takes_any or k in params}
    try:
        values = fn(prompts=list(prompts), responses=responses, **extra)
    except Exception as e:  # the user's code: report it in one line, without our traceback
        raise ChatrlError(f"reward function '{spec}' raised {type(e).__name__}: {e}") from None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ChatrlError(f"reward function '{spec}' must return a list of floats, got {values!r:.200}")
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ChatrlError(f"reward function '{spec}' must return a list of floats, got {values!r:.200}") from None
    if len(floats) != len(responses):
        raise ChatrlError(f"reward function '{spec}' returned {len(floats)} values for {len(responses)} responses")
    bad = next((v for v in floats if not math.isfinite(v)), None)
    if bad is not None:
        raise ChatrlError(f"reward function '{spec}' returned {bad} (index {floats.index(bad)}): rewards must be "
                          "finite numbers")
    return torch.tensor(floats, dtype=torch.float32)


@dataclass
class FunctionScores:
    """Weighted sum [B] and each function's raw scores [B] (logged by name)."""

    total: torch.Tensor
    by_function: dict[str, torch.Tensor]


class RewardFunctions:
    """The configured functions and weights; `score` calls them all on one batch of episodes."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float] = ()) -> None:
        self.fns = [(spec, load_reward_function(spec)) for spec in specs]
        self.weights = list(weights) or [1.0] * len(self.fns)

    def score(self, prompts: Sequence[Any], responses: list[str], columns: dict[str, list[Any]]) -> FunctionScores:
        total = torch.zeros(len(responses))
        by_function = {}
        for (spec, fn), w in zip(self.fns, self.weights, strict=True):
            by_function[spec] = call_reward_function(fn, spec, prompts, responses, columns)
            total += w * by_function[spec]
        return FunctionScores(total, by_function)


def columns_of(infos: Sequence[dict[str, Any]], **known: list[Any]) -> dict[str, list[Any]]:
    """Per-row columns for reward functions: `known` ones plus every key found in the rows' info dicts."""
    columns = dict(known)
    for key in {k for info in infos for k in info}:
        columns.setdefault(key, [info.get(key) for info in infos])
    columns.setdefault("reference", [info.get("reference", info.get("answer")) for info in infos])
    return columns
