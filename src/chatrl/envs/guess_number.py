"""`guess_number`: the multi-turn example. Guess a secret integer; each wrong guess is answered "Higher." or
"Lower.", so the policy must use the conversation so far. Fewer turns earn more: a hit at turn k (1-based) is
rewarded 1 - (k - 1) / max_turns; running out of turns ends the episode truncated with reward 0.

A guess is the LAST number in the reply, read with a plain regex: the game is about integers only, so the
"final answer" phrasing rules of math-verify add nothing here. A non-integer or missing number costs a turn.
Train and eval secrets are disjoint: a seeded permutation of [low, high] puts a tenth of the numbers (at least
one) in eval; a task picks a secret of its split by a stable hash.
"""

from __future__ import annotations

import random
import re
from typing import Any

from chatrl.data.types import Message
from chatrl.envs.base import TextEnv, stable_seed, user
from chatrl.errors import ChatrlError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
INTRO = ("Let's play a game. I am thinking of a whole number between {low} and {high}. Guess it: reply with a single "
         "number. After each guess I will say 'Higher.' or 'Lower.' You have {max_turns} guesses.")
NO_NUMBER = "Please reply with a single number."


def read_guess(reply: str) -> int | None:
    """The last number in the reply if it is a whole number ("42", "42.0"), else None."""
    found = NUMBER.findall(reply)
    if not found:
        return None
    value = float(found[-1])
    return int(value) if value.is_integer() else None


class GuessNumberEnv(TextEnv):
    """kwargs: low, high (the secret's inclusive range), max_turns (guesses allowed), prompt (intro template with
    {low} {high} {max_turns})."""

    def __init__(self, low: int = 1, high: int = 100, max_turns: int = 6, prompt: str = INTRO) -> None:
        super().__init__()
        for key, value in (("low", low), ("high", high), ("max_turns", max_turns)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ChatrlError(f"guess_number: {key}={value!r} must be an integer")
        if high <= low or max_turns < 1:
            raise ChatrlError(f"guess_number: need low < high and max_turns >= 1 (got low={low}, high={high}, "
                              f"max_turns={max_turns})")
        numbers = list(range(low, high + 1))
        random.Random(stable_seed("guess_number", low, high)).shuffle(numbers)
        n_eval = max(1, len(numbers) // 10)
        self.secrets = {"eval": sorted(numbers[:n_eval]), "train": sorted(numbers[n_eval:])}
        try:
            self.intro = prompt.format(low=low, high=high, max_turns=max_turns)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ChatrlError(f"guess_number: prompt template {prompt!r} is invalid ({e}); use {{low}}, {{high}}, "
                              "{max_turns}") from None
        self.max_turns = max_turns
        self.secret = low

    def secret_for(self, split: str, task: int) -> int:
        pool = self.secrets[split]
        return pool[stable_seed("guess_number", split, task) % len(pool)]

    def _start(self, split: str, task: int) -> tuple[list[Message], dict[str, Any]]:
        self.secret = self.secret_for(split, task)
        return [user(self.intro)], {"split": split, "task": task}

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        guess = read_guess(self._begin_step(action))
        if guess == self.secret:
            self.done = True
            reward = 1.0 - (self.turns - 1) / self.max_turns
            return [], reward, True, False, {"success": True, "answer": str(self.secret), "turns": self.turns}
        if self.turns >= self.max_turns:
            self.done = True
            return [], 0.0, False, True, {"success": False, "answer": str(self.secret), "turns": self.turns}
        if guess is None:
            reply = NO_NUMBER
        else:
            reply = "Higher." if guess < self.secret else "Lower."
        return [user(reply)], 0.0, False, False, {}
