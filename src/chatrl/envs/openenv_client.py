"""`env.name=openenv:http://host:port`: play a running OpenEnv server through openenv-core's own client
(`GenericEnvClient(...).sync()`: one WebSocket session, and so one server-side environment, per chatrl env).

A server made by `chatrl env serve` (openenv_server.py) speaks chat: reset takes chatrl's split/task, observations
carry `messages`, `info`, `terminated`/`truncated`. Any other OpenEnv server works through env.kwargs:
- `action_field` (default "message"): the action's field that gets the reply text;
- `observation_field` (default "messages"): the observation's field holding the next chat messages (a list of
  {"role", "content"}) or plain text (becomes one user message; empty text = no message);
- `seed_from_task` (default false): for servers whose reset() picks the problem from its seed rather than chatrl's
  split/task: the seed sent is 2 * task (train) or 2 * task + 1 (eval), so the G samples of a group meet the same
  problem and eval seeds are disjoint from train seeds;
- `timeout` (seconds a reply from the server may take, default 60).
The reward is OpenEnv's `reward` (none = 0); `info` is the observation's `info` field when it has one.

openenv-core is an optional dependency (`pip install 'chatrl[openenv]'`), imported when the environment is made.
"""

from __future__ import annotations

from typing import Any

import gymnasium

from chatrl.data.types import Message
from chatrl.envs.base import TextEnv, user
from chatrl.errors import ChatrlError
from chatrl.plugins import import_optional

EXTRA = "openenv"


class OpenEnvClientEnv(gymnasium.Env):
    """A chatrl environment whose reset()/step() are played on an OpenEnv server."""

    metadata: dict[str, Any] = {"render_modes": []}
    observation_space = TextEnv.observation_space
    action_space = TextEnv.action_space

    def __init__(self, url: str, action_field: str = "message", observation_field: str = "messages",
                 seed_from_task: bool = False, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ChatrlError(f"openenv:{url}: expected the server's URL, e.g. env.name=openenv:http://localhost:8000")
        core = import_optional("openenv.core", EXTRA, "env.name=openenv:URL")
        self.url, self.action_field, self.observation_field = url, action_field, observation_field
        self.seed_from_task = bool(seed_from_task)
        # connects at the first reset(): making the env (e.g. the trainer's pool of them) needs no server yet
        self.client = core.GenericEnvClient(base_url=url, message_timeout_s=float(timeout)).sync()

    def _messages(self, observation: dict[str, Any]) -> list[Message]:
        if self.observation_field not in observation:
            raise ChatrlError(f"openenv:{self.url}: the observation has no field '{self.observation_field}' (it has "
                              f"{', '.join(sorted(observation)) or 'none'}); set env.kwargs.observation_field")
        value = observation[self.observation_field]
        if isinstance(value, str):
            return [user(value)] if value else []
        return value  # validated (list of role/content dicts) by the trainer like any environment's

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[list[Message], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        if self.seed_from_task:
            task = options.pop("task", None)
            if task is None:
                task = int(self.np_random.integers(0, 2**31 - 1))
            seed = 2 * int(task) + (options.get("split", "train") == "eval")
        request = {k: v for k, v in (("seed", seed), *options.items()) if v is not None}
        result = self.client.reset(**request)
        observation = result.observation
        declared = observation.get("max_turns")
        if isinstance(declared, int):
            self.max_turns = declared
        return self._messages(observation), dict(observation.get("info") or {})

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        result = self.client.step({self.action_field: action})
        observation = result.observation
        truncated = bool(observation.get("truncated", False))
        terminated = bool(observation.get("terminated", bool(result.done) and not truncated))
        reward = 0.0 if result.reward is None else float(result.reward)
        return self._messages(observation), reward, terminated, truncated, dict(observation.get("info") or {})

    def close(self) -> None:
        self.client.close()
