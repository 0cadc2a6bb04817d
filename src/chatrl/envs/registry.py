"""`make_env(spec, kwargs)`: a built-in environment by name, or user code `pkg.module:Class` / `file.py:Class`.

User code is loaded with `chatrl.plugins.load_object` like reward functions, so specs and their errors read the
same everywhere. What the spec names must be a `gymnasium.Env` subclass or a factory returning an Env instance.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import gymnasium

from chatrl.config import DataConfig
from chatrl.envs.arithmetic import ArithmeticEnv
from chatrl.envs.chat import ChatEnv
from chatrl.envs.guess_number import GuessNumberEnv
from chatrl.envs.math_problems import MathEnv
from chatrl.envs.openenv_client import OpenEnvClientEnv
from chatrl.envs.reasoning_gym_env import ReasoningGymEnv
from chatrl.envs.verifiers_env import VerifiersEnv
from chatrl.errors import ChatrlError
from chatrl.plugins import load_object

BUILTIN_ENVS: dict[str, type[gymnasium.Env]] = {
    "arithmetic": ArithmeticEnv,
    "math": MathEnv,
    "guess_number": GuessNumberEnv,
    "chat": ChatEnv,
}

# `PREFIX:target` specs for environments people already have, dispatched before the `pkg.module:Class` plugin path;
# each adapter imports its optional package itself (see README "Environments people already have")
ADAPTERS: dict[str, Callable[..., gymnasium.Env]] = {
    "reasoning_gym": ReasoningGymEnv,  # reasoning_gym:TASK
    "openenv": OpenEnvClientEnv,  # openenv:http://host:port
    "verifiers": VerifiersEnv,  # verifiers:MODULE
}


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return json.dumps(kwargs, default=str)[:200]


def _construct(spec: str, factory: Callable[..., object], kwargs: dict[str, Any], shown: str) -> object:
    """factory(**kwargs); `shown` is the user's env.kwargs as text for the errors."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ChatrlError(f"environment '{spec}' does not accept env.kwargs {shown}: {e}") from None
    except ValueError:  # no signature available (some builtins): let the call itself tell
        pass
    try:
        return factory(**kwargs)
    except ChatrlError as e:
        raise ChatrlError(f"environment '{spec}' with env.kwargs {shown}: {e}") from None
    except Exception as e:
        raise ChatrlError(f"environment '{spec}' with env.kwargs {shown} raised "
                          f"{type(e).__name__}: {e}") from None


def make_env(spec: str, kwargs: dict[str, Any] | None = None, *, data: DataConfig | None = None) -> gymnasium.Env:
    """The environment `spec` names, built with `kwargs` (config key env.kwargs). `data` (the run's DataConfig)
    goes to built-ins that read the run's dataset (`chat`); other environments ignore it."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ChatrlError(f"env.kwargs must be a mapping of keyword arguments, got {type(kwargs).__name__}")
    kwargs = dict(kwargs or {})
    shown = _kwargs_text(kwargs)
    if not isinstance(spec, str) or not spec:
        raise ChatrlError(f"env.name must be a built-in environment ({', '.join(BUILTIN_ENVS)}) or "
                          f"'pkg.module:Class' / 'file.py:Class', got {spec!r}")
    if spec in BUILTIN_ENVS:
        cls = BUILTIN_ENVS[spec]
        if getattr(cls, "uses_data", False) and data is not None and "data" not in kwargs:
            kwargs["data"] = data
        return _construct(spec, cls, kwargs, shown)  # type: ignore[return-value]
    prefix, _, target = spec.partition(":")
    if prefix in ADAPTERS:
        if not target:
            raise ChatrlError(f"env.name '{spec}' names nothing after '{prefix}:'")
        return _construct(spec, functools.partial(ADAPTERS[prefix], target), kwargs, shown)  # type: ignore
    if ":" not in spec:
        raise ChatrlError(f"unknown environment '{spec}': built-ins are {', '.join(BUILTIN_ENVS)}; others are "
                          f"{', '.join(p + ':...' for p in ADAPTERS)}; for your own give 'pkg.module:Class' or "
                          "'path/to/file.py:Class' (set env.name)")
    obj = load_object(spec, "environment", "env.name")
    if isinstance(obj, type) and not issubclass(obj, gymnasium.Env):
        raise ChatrlError(f"environment '{spec}' is the class {obj.__name__}, which does not subclass gymnasium.Env; "
                          "check env.name")
    env = _construct(spec, obj, kwargs, shown)  # type: ignore[arg-type]
    if not isinstance(env, gymnasium.Env):
        raise ChatrlError(f"environment '{spec}' returned a {type(env).__name__}, not a gymnasium.Env instance; "
                          "check env.name")
    return env
