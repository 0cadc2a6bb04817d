"""`chatrl env eval SPEC --base-url URL --model NAME`: play an environment against any OpenAI-compatible endpoint
(vLLM, `chatrl serve`, a hosted API) through the official `openai` client, on held-out tasks.

The same measures as `chatrl eval --env` (env_eval.py, `score_tasks`): per task 0..n-1 of the `eval` split, one
greedy episode (temperature 0) gives the success rate and the mean return, and k sampled episodes (temperature
`temperature`, seeds seed..seed+k-1 where the endpoint honours `seed`) give pass@k; each with its standard error
over the n tasks. Episodes are played turn by turn: the conversation so far is sent, the reply goes to env.step().
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatrl.data.types import Message
from chatrl.envs.base import call_env, validate_reset, validate_step
from chatrl.envs.registry import make_env
from chatrl.errors import ChatrlError
from chatrl.eval.env_eval import EnvScore, score_tasks
from chatrl.log import progress_bar
from chatrl.plugins import import_optional
from chatrl.rollout.episodes import Task

EXAMPLES = 8  # greedy conversations kept for the report


@dataclass
class Endpoint:
    """Where replies come from: an `openai.OpenAI` client, the model name, and the sampling limits."""

    client: Any
    model: str
    max_tokens: int = 256

    def reply(self, messages: list[Message], temperature: float, seed: int | None) -> str:
        openai = import_optional("openai", "openai", "chatrl env eval")
        try:
            out = self.client.chat.completions.create(model=self.model, messages=messages, temperature=temperature,
                                                      max_tokens=self.max_tokens, seed=seed)
        except openai.APIError as e:  # connection, auth, unknown model: one line, not the client's traceback
            raise ChatrlError(f"env eval: the endpoint {self.client.base_url} failed for model '{self.model}': "
                              f"{type(e).__name__}: {e}") from None
        return out.choices[0].message.content or ""


def connect(base_url: str, model: str, api_key_env: str | None = None, max_tokens: int = 256) -> Endpoint:
    """An Endpoint for `base_url` (e.g. http://localhost:8000/v1); the key is read from $`api_key_env` (none:
    a placeholder, for local servers without a key)."""
    openai = import_optional("openai", "openai", "chatrl env eval")
    key = "none"
    if api_key_env:
        key = os.environ.get(api_key_env, "")
        if not key:
            raise ChatrlError(f"--api-key-env {api_key_env}: the environment variable is not set (or empty)")
    return Endpoint(openai.OpenAI(base_url=base_url, api_key=key, max_retries=1), model, max_tokens)


def play_episode(endpoint: Endpoint, env, env_name: str, task: Task, temperature: float,
                 max_turns: int) -> tuple[bool, float, list[Message]]:
    """(success, return, conversation) of one episode; success as the trainer counts it: info['success'] at the
    end, else a positive return."""
    conversation, info = validate_reset(env_name, call_env(env_name, "reset()", env.reset, seed=task.seed,
                                                           options={"split": task.split, "task": task.task}))
    total, ended = 0.0, False
    for _ in range(max_turns):
        reply = endpoint.reply(conversation, temperature, task.seed if temperature > 0 else None)
        conversation.append({"role": "assistant", "content": reply})
        result = validate_step(env_name, call_env(env_name, "step()", env.step, reply))
        total += result.reward
        conversation.extend(result.messages)
        info, ended = result.info, result.terminated or result.truncated
        if ended:
            break
    return bool(info.get("success", total > 0)) if ended else False, total, conversation


def evaluate_endpoint(endpoint: Endpoint, env_name: str, kwargs: dict[str, Any] | None = None, *, episodes: int = 20,
                      samples: int = 4, temperature: float = 1.0, max_turns: int = 1, seed: int = 0,
                      progress: bool = True, log: Callable[[str], None] = print) -> EnvScore:
    """Greedy episodes on eval tasks 0..episodes-1, then `samples` sampled ones per task for pass@k."""
    env = make_env(env_name, kwargs)
    success, returns, solved, examples = [], [], [], []
    bar = progress_bar(episodes * (1 + samples), f"env eval {env_name}", unit="episode", enabled=progress)
    try:
        for t in range(episodes):
            ok, ret, conversation = play_episode(endpoint, env, env_name, Task("eval", t, seed + t), 0.0, max_turns)
            success.append(ok)
            returns.append(ret)
            if len(examples) < EXAMPLES:
                examples.append({"conversation": conversation, "success": ok})
            hits = [play_episode(endpoint, env, env_name, Task("eval", t, seed + i), temperature, max_turns)[0]
                    for i in range(samples)]
            solved.append(any(hits))
            bar.update(1 + samples)
    finally:
        bar.close()
        call_env(env_name, "close()", env.close)
    score = score_tasks(success, returns, solved, samples, examples)
    log(score.line(endpoint.model))
    return score
