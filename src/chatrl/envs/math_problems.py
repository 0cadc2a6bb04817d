"""`math`: one-turn word problems with reference answers (default: the shipped GSM8K subset, data/gsm8k/).

Any file the data readers accept works (JSONL, JSON, CSV, parquet, a folder, builtin:NAME); rows are read with
`chatrl.data.readers` so errors name "file:line" like everywhere else. The reference answer follows GSM8K's
convention when the answer column has one: the text after the last "####" (commas dropped: "1,000" -> "1000");
otherwise the whole answer column. A fixed seeded permutation holds `eval_size` rows out for split=eval, and
train rows whose question also occurs in eval are dropped, so evaluation never sees a training problem. Keep
`path`, `eval_size` and `split_seed` the same for training and evaluation (a smaller eval_size stays disjoint too).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

from chatrl.data.clean import DataReport
from chatrl.data.readers import RawRow, read_source, resolve_data_source
from chatrl.data.types import Message
from chatrl.envs.answers import answers_match, extract_answer
from chatrl.envs.base import TextEnv, system, user
from chatrl.errors import ChatrlError
from chatrl.paths import builtin_data_dir
from chatrl.tools.schema import resolve_tools

DEFAULT_PROMPT = "{question}\nSolve it step by step, then give the final answer as 'The answer is N.'"
GSM8K_MARK = "####"


def default_path() -> str:
    return str(builtin_data_dir() / "gsm8k" / "train.jsonl")


def reference_answer(answer: str) -> str:
    """GSM8K: the text after the last '####' without thousands commas; otherwise the whole (stripped) answer."""
    if GSM8K_MARK in answer:
        return answer.rsplit(GSM8K_MARK, 1)[1].strip().replace(",", "")
    return answer.strip()


def _field(row: RawRow, key: str, what: str) -> str:
    value = row.data.get(key)
    if value is None:
        have = ", ".join(sorted(row.data)) or "(none)"
        raise ChatrlError(f"{row.source}: no {what} field '{key}' (columns: {have}); set env.kwargs.{what}_key")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ChatrlError(f"{row.source}: field '{key}' must be text or a number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise ChatrlError(f"{row.source}: field '{key}' is empty")
    return text


def _stamp(path: str) -> tuple[int, int]:
    """(mtime, size) of a local file or folder, so a cached read is redone when the file changes."""
    local = Path(path).expanduser()
    if not local.exists():
        return (0, 0)
    st = local.stat()
    return (st.st_mtime_ns, st.st_size)


def load_problems(path: str, question_key: str, answer_key: str) -> list[tuple[str, str]]:
    """(question, reference answer) per row; a bad row is an error naming file:line and the field."""
    if Path(path).suffix and not Path(path).expanduser().exists():
        raise ChatrlError(f"math: file not found: {path} (env.kwargs.path)")
    return list(_read_problems(path, question_key, answer_key, _stamp(path)))


@functools.lru_cache(maxsize=8)
def _read_problems(path: str, question_key: str, answer_key: str, stamp: tuple[int, int]) -> tuple[tuple[str, str], ...]:
    """Read once per process: the trainer makes one environment instance per rollout row."""
    rows = read_source(resolve_data_source(path), DataReport(), skip_bad_rows=False)
    problems = []
    for row in rows:
        question = _field(row, question_key, "question")
        answer = reference_answer(_field(row, answer_key, "answer"))
        if not answer:
            raise ChatrlError(f"{row.source}: field '{answer_key}' has nothing after '{GSM8K_MARK}'")
        problems.append((question, answer))
    return tuple(problems)


class MathEnv(TextEnv):
    """kwargs: path, question_key, answer_key, eval_size (rows held out for split=eval), prompt (template with
    {question}), system (optional system message), format_reward (for a parseable answer), split_seed, tools (tools
    the model may call inside its turn: built-in names such as "calculator" or "python", or 'pkg.module:fn')."""

    max_turns = 1

    def __init__(self, path: str | None = None, question_key: str = "question", answer_key: str = "answer",
                 eval_size: int = 200, prompt: str = DEFAULT_PROMPT, system: str | None = None,
                 format_reward: float = 0.0, split_seed: int = 0, tools: list[str] | None = None) -> None:
        super().__init__()
        self.tools = tuple(resolve_tools(tools, "math: tools"))
        try:
            prompt.format(question="?")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ChatrlError(f"math: prompt template {prompt!r} is invalid ({e}); use {{question}}") from None
        self.path = path or default_path()
        problems = load_problems(self.path, question_key, answer_key)
        if isinstance(eval_size, bool) or not isinstance(eval_size, int) or not 0 < eval_size < len(problems):
            raise ChatrlError(f"math: eval_size={eval_size!r} must be an integer from 1 to {len(problems) - 1} "
                              f"({self.path} has {len(problems)} problems)")
        order = list(range(len(problems)))
        random.Random(split_seed).shuffle(order)
        eval_rows = [problems[i] for i in order[:eval_size]]
        held_out = {q for q, _ in eval_rows}
        train_rows = [problems[i] for i in order[eval_size:] if problems[i][0] not in held_out]
        if not train_rows:
            raise ChatrlError(f"math: no training problems left in {self.path} after holding out eval_size={eval_size}")
        self.problems = {"train": train_rows, "eval": eval_rows}
        self.prompt, self.system, self.format_reward = prompt, system, float(format_reward)
        self.current: tuple[str, str] = ("", "")

    def _start(self, split: str, task: int) -> tuple[list[Message], dict[str, Any]]:
        rows = self.problems[split]
        self.current = rows[task % len(rows)]
        messages = [system(self.system)] if self.system else []
        messages.append(user(self.prompt.format(question=self.current[0])))
        return messages, {"split": split, "task": task}

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        reply = self._begin_step(action)
        self.done = True
        question, answer = self.current
        success = answers_match(reply, answer)
        reward = float(success)
        if self.format_reward and extract_answer(reply) is not None:
            reward += self.format_reward
        return [], reward, True, False, {"success": success, "answer": answer, "question": question}
