"""`chatrl env serve SPEC --port P`: any chatrl environment (built-in, `file.py:Class`, `reasoning_gym:TASK`, ...) as
an OpenEnv server, built with openenv-core's own server helpers (`create_app`, `Environment`, `Action`,
`Observation`), so trainers that speak OpenEnv can play chatrl's environments; `env.name=openenv:URL`
(openenv_client.py) plays it back.

The wire format (a chat environment has no standard OpenEnv schema, so chatrl's is spelled out here):
- reset(seed, split, task): `split`/`task` are chatrl's reset options; the observation holds `messages` (the
  first chat messages), `info` and `max_turns` (the environment's own, or null);
- step({"message": reply}): the observation holds the new `messages`, `info` (JSON-safe: anything else becomes its
  str()), `terminated`, `truncated`; OpenEnv's own `reward` and `done` (= terminated or truncated) carry the rest.
Every WebSocket session gets its own environment instance (one `make_env` each), up to `--max-sessions`.

openenv-core is an optional dependency (`pip install 'chatrl[openenv]'`), imported when the server is made.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from typing import Any

from chatrl.envs.base import call_env, validate_reset, validate_step
from chatrl.envs.registry import make_env
from chatrl.plugins import import_optional

EXTRA = "openenv"


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(info, default=str))


@functools.cache
def wire_types() -> tuple[type, type, type]:
    """(ChatrlEnvironment, ChatrlAction, ChatrlObservation), built on openenv-core's base classes once it is
    imported (classes, not instances: openenv's server makes one environment per session from the class)."""
    server = import_optional("openenv.core.env_server", EXTRA, "chatrl env serve")
    from pydantic import Field  # openenv's messages are pydantic models

    class ChatrlAction(server.Action):
        message: str = Field(..., description="the assistant's reply")

    class ChatrlObservation(server.Observation):
        messages: list[dict[str, str]] = Field(default_factory=list, description="chat messages to append")
        info: dict[str, Any] = Field(default_factory=dict, description="the environment's info dict")
        terminated: bool = False
        truncated: bool = False
        max_turns: int | None = None

    class ChatrlEnvironment(server.Environment):
        SUPPORTS_CONCURRENT_SESSIONS = True  # each session makes its own chatrl environment

        def __init__(self, spec: str, kwargs: dict[str, Any]) -> None:
            super().__init__()
            self.spec, self.env = spec, make_env(spec, kwargs)
            self._state = server.State(episode_id=None, step_count=0)

        def reset(self, seed: int | None = None, episode_id: str | None = None, split: str | None = None,
                  task: int | None = None, **_: Any) -> ChatrlObservation:
            options = {k: v for k, v in (("split", split), ("task", task)) if v is not None}
            result = call_env(self.spec, "reset()", self.env.reset, seed=seed, options=options or None)
            messages, info = validate_reset(self.spec, result)
            self._state = server.State(episode_id=episode_id, step_count=0)
            declared = getattr(self.env, "max_turns", None)
            return ChatrlObservation(messages=messages, info=_jsonable(info), reward=None, done=False,
                                     max_turns=declared if isinstance(declared, int) else None)

        def step(self, action: ChatrlAction, timeout_s: float | None = None, **_: Any) -> ChatrlObservation:
            result = validate_step(self.spec, call_env(self.spec, "step()", self.env.step, action.message))
            self._state.step_count += 1
            return ChatrlObservation(messages=result.messages, info=_jsonable(result.info), reward=result.reward,
                                     done=result.terminated or result.truncated, terminated=result.terminated,
                                     truncated=result.truncated)

        @property
        def state(self):
            return self._state

        def close(self) -> None:
            call_env(self.spec, "close()", self.env.close)

    return ChatrlEnvironment, ChatrlAction, ChatrlObservation


def create_openenv_app(spec: str, kwargs: dict[str, Any] | None = None, max_sessions: int = 64):
    """The FastAPI app of openenv-core's `create_app` serving `spec`; made once here first, so a bad spec or
    env.kwargs fails now with chatrl's one-line error rather than at the first client's connection."""
    environment, action, observation = wire_types()
    kwargs = dict(kwargs or {})
    make_env(spec, kwargs).close()
    server = import_optional("openenv.core.env_server", EXTRA, "chatrl env serve")
    return server.create_app(functools.partial(environment, spec, kwargs), action, observation, env_name=spec,
                             max_concurrent_envs=max_sessions)


def serve(spec: str, kwargs: dict[str, Any], host: str = "127.0.0.1", port: int = 8000,
          max_sessions: int = 64) -> None:
    """Serve in the foreground (Ctrl-C stops); prints the URL and the env.name that plays it once listening."""
    import uvicorn  # lazy: only the server needs it

    app = create_openenv_app(spec, kwargs, max_sessions)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=3))

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
            print(f"chatrl env serve: {spec} as an OpenEnv server at {url} (play it with env.name=openenv:{url}; "
                  "Ctrl-C to stop)", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    print(f"chatrl env serve: starting {spec} ...", file=sys.stderr, flush=True)
    server.run()
