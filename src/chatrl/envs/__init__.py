"""Multi-turn text environments for RL on chat models, with the Gymnasium API.

The contract (what the trainer's episode runner relies on; `chatrl env check SPEC` tests an environment for it):

- Every environment subclasses `gymnasium.Env`. An observation is a LIST OF CHAT MESSAGES to append to the
  conversation (`[{"role": "user" | "system" | "assistant", "content": str}]`, possibly empty when the episode
  ends); an action is the assistant's reply text (str).
- `reset(seed=None, options=None) -> (messages, info)`: the first observation carries the task (optionally a
  system message first). `options` may hold `{"split": "train" | "eval", "task": int}`: `task` is a non-negative
  integer naming WHICH problem; the trainer gives the same task number to all G samples of a group (same problem)
  and distinct numbers to distinct prompts. The problem is a deterministic function of (split, task), never of
  `seed`; `seed` only seeds other randomness (`super().reset(seed=seed)`). Without options, split="train" and the
  task is drawn from `self.np_random`. Train and eval problem sets are DISJOINT by construction.
- `step(action: str) -> (messages, reward: float, terminated: bool, truncated: bool, info: dict)`: per-turn rewards
  (the trainer sums them into the episode return). At the end of an episode `info["success"]` (bool) says whether
  the task was solved, and `info["answer"]` may hold the reference answer.
- `max_turns` (int attribute, optional): the most assistant turns the environment needs; the trainer also caps turns
  by its own `env.max_turns`.
- `observation_space` / `action_space` are `gymnasium.spaces.Text` (documentation only): results are validated by
  `validate_reset` / `validate_step`, and user methods are called through `call_env`, which turn any mistake into
  one `ChatrlError` line naming the environment.

Built-ins (`make_env(name)`): arithmetic, math (GSM8K subset shipped in data/gsm8k), guess_number (multi-turn),
chat (plain RLHF prompts from the run's data). User environments: `make_env("pkg.module:Class")` or
`make_env("path/to/file.py:Class")`. Environments of other libraries (optional extras): `reasoning_gym:TASK`,
`openenv:URL` (and `chatrl env serve`, openenv_server.py), `verifiers:MODULE`. Answers are compared with math-verify (`answers.py`); `rewards.py` holds
built-in reward functions for the PPO/GRPO reward-function hook.
"""

from chatrl.envs.answers import answers_match, extract_answer
from chatrl.envs.base import StepResult, TextEnv, call_env, validate_reset, validate_step
from chatrl.envs.registry import BUILTIN_ENVS, make_env
from chatrl.envs.rewards import BUILTIN_REWARD_FUNCTIONS

__all__ = [
    "BUILTIN_ENVS",
    "BUILTIN_REWARD_FUNCTIONS",
    "StepResult",
    "TextEnv",
    "answers_match",
    "call_env",
    "extract_answer",
    "make_env",
    "validate_reset",
    "validate_step",
]
