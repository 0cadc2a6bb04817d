"""`reasoning_gym:TASK`: a reasoning-gym procedural task (basic_arithmetic, chain_sum, leg_counting, ...) as a
one-turn chatrl environment, scored by the task's own verifier (`dataset.score_answer`).

Each problem is a pure function of (split, task): it is item 0 of the task's dataset generated with the seed
2 * task (train) or 2 * task + 1 (eval). The two splits never share a seed, so there is an unlimited supply of
held-out eval problems (a very small problem space can still produce the same question from two seeds, as any
generator can). env.kwargs go to the task's config dataclass (e.g. {"min_terms": 2, "max_terms": 3}); chatrl's
own keys are `system_prompt` (a reasoning-gym prompt name such as "default" or "direct", your own text, or null for
none) and `answer_tag` (the reply's answer is read from <TAG>...</TAG>, as reasoning-gym's prompts ask; null scores
the whole reply).

reasoning-gym is an optional dependency (`pip install 'chatrl[reasoning-gym]'`), imported when the environment is
made.
"""

from __future__ import annotations

from typing import Any

from chatrl.data.types import Message
from chatrl.envs.base import TextEnv, system, user
from chatrl.errors import ChatrlError
from chatrl.plugins import import_optional

EXTRA = "reasoning-gym"
RESERVED = ("seed", "size")  # chatrl sets these per problem
SUCCESS = 1.0  # reasoning-gym scores in [0, 1]; partial credit is reward but not success


def _library():
    rg = import_optional("reasoning_gym", EXTRA, "env.name=reasoning_gym:TASK")
    import_optional("reasoning_gym.utils", EXTRA, "env.name=reasoning_gym:TASK")
    return rg


def _check_name(rg, name: str) -> None:
    known = sorted(rg.factory.DATASETS)
    if name not in known:
        close = [k for k in known if name.split("_")[0] in k][:8] or known[:12]
        raise ChatrlError(f"reasoning_gym: no task '{name}' (env.name=reasoning_gym:TASK); e.g. {', '.join(close)} "
                          f"({len(known)} tasks in reasoning-gym)")


class ReasoningGymEnv(TextEnv):
    """One reasoning-gym task; reward = its verifier's score of the extracted answer, success = a full score."""

    max_turns = 1

    def __init__(self, name: str, system_prompt: str | None = "default", answer_tag: str | None = "answer",
                 **config: Any) -> None:
        super().__init__()
        self.rg = _library()
        _check_name(self.rg, name)
        for key in RESERVED:
            if key in config:
                raise ChatrlError(f"reasoning_gym:{name}: env.kwargs.{key} is set by chatrl per problem (seed from "
                                  "split and task, one item per dataset); remove it")
        prompts = self.rg.utils.SYSTEM_PROMPTS
        self.system = prompts.get(system_prompt, system_prompt) if system_prompt else None
        self.name, self.config, self.answer_tag = name, config, answer_tag
        self.dataset = self._dataset(0)  # checks the config now, not at the first reset
        self.entry: dict[str, Any] = {}

    def _dataset(self, seed: int):
        try:
            return self.rg.create_dataset(self.name, **self.config, seed=seed, size=1)
        except (TypeError, ValueError, AssertionError) as e:
            raise ChatrlError(f"reasoning_gym:{self.name}: env.kwargs {self.config} rejected by the task's config: "
                              f"{type(e).__name__}: {e}") from None

    def problem_for(self, split: str, task: int) -> dict[str, Any]:
        """The dataset entry (question, answer, metadata) of a task; train and eval seeds are disjoint."""
        self.dataset = self._dataset(2 * task + (split == "eval"))
        return self.dataset[0]

    def _start(self, split: str, task: int) -> tuple[list[Message], dict[str, Any]]:
        self.entry = self.problem_for(split, task)
        messages = [system(self.system)] if self.system else []
        messages.append(user(self.entry["question"]))
        return messages, {"split": split, "task": task}

    def extract(self, reply: str) -> str | None:
        if not self.answer_tag:
            return reply.strip()
        return self.rg.utils.extract_answer(reply, tag_name=self.answer_tag)

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        reply = self._begin_step(action)
        self.done = True
        answer = self.extract(reply)
        score = float(self.dataset.score_answer(answer, self.entry))
        return [], score, True, False, {"success": score >= SUCCESS, "answer": str(self.entry["answer"]),
                                        "extracted": answer}
