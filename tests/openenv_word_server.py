"""A third-party OpenEnv server, written only with openenv-core's own helpers (no chatrl): "say the word" with two
tries. reset(seed) picks WORDS[seed % 5]; the action field is `text`, the observation field `prompt`. A reply that
holds the word ends the episode with reward 1 (first try) or 0.5 (second); two misses end it with reward 0.

Run: python tests/openenv_word_server.py  (prints its URL once listening on a free port)."""

from __future__ import annotations

import threading
import time

import uvicorn
from openenv.core.env_server import Action, Environment, Observation, State, create_app

WORDS = ["apple", "river", "stone", "cloud", "tiger"]


class WordAction(Action):
    text: str


class WordObservation(Observation):
    prompt: str = ""


class WordEnvironment(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self) -> None:
        super().__init__()
        self._state = State(step_count=0)
        self.word = WORDS[0]

    def reset(self, seed=None, episode_id=None, **kwargs) -> WordObservation:
        self.word = WORDS[(seed or 0) % len(WORDS)]
        self._state = State(episode_id=episode_id, step_count=0)
        return WordObservation(prompt=f"Say the word: {self.word}")

    def step(self, action: WordAction, timeout_s=None, **kwargs) -> WordObservation:
        self._state.step_count += 1
        if self.word in action.text:
            return WordObservation(prompt="", reward=1.0 if self._state.step_count == 1 else 0.5, done=True)
        if self._state.step_count == 2:
            return WordObservation(prompt="", reward=0.0, done=True)
        return WordObservation(prompt=f"No. Try again: {self.word}", reward=0.0, done=False)

    @property
    def state(self) -> State:
        return self._state


app = create_app(WordEnvironment, WordAction, WordObservation, env_name="word", max_concurrent_envs=8)

if __name__ == "__main__":
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    print(f"listening on http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", flush=True)
    while True:
        time.sleep(3600)
