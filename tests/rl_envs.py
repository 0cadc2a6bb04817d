"""Environments used by the RL tests (loaded as `rl_envs:<Class>` from tests/ on PYTHONPATH). They follow the
Gymnasium contract of chatrl's text environments: observations are message lists, actions reply strings."""

from __future__ import annotations

import math

import gymnasium


class BananaEnv(gymnasium.Env):
    """One turn: the reward is the share of the reply's words that are 'banana' (the word-SFT model says it ~1 in 18);
    success when at least a third of the words are."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        task = (options or {}).get("task", 0)
        return [{"role": "user", "content": f"Say a few words. ({task})"}], {}

    def step(self, action):
        words = action.split()
        share = words.count("banana") / len(words) if words else 0.0
        return [], share, True, False, {"success": share >= 1 / 3}


class ThreeTurnEnv(gymnasium.Env):
    """Three turns; after turn k (1, 2) the environment answers "Turn k done, go on." and rewards k; the third
    reply ends the episode with reward 10. The episode return is 1 + 2 + 10 = 13 (undiscounted)."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        return [{"role": "user", "content": "Talk to me three times."}], {}

    def step(self, action):
        self.turn += 1
        if self.turn == 3:
            return [], 10.0, True, False, {"success": True}
        return [{"role": "user", "content": f"Turn {self.turn} done, go on."}], float(self.turn), False, False, {}


class NaNRewardEnv(BananaEnv):
    def step(self, action):
        return [], math.nan, True, False, {}


class RaisingEnv(BananaEnv):
    def step(self, action):
        raise RuntimeError("the scorer is down")


class TiedEvenEnv(BananaEnv):
    """Even tasks reward 1.0 whatever the reply (every group tied); odd tasks reward the parity of the reply's
    word count (groups usually differ): dynamic sampling must drop the even ones."""

    def reset(self, *, seed=None, options=None):
        self.task = (options or {}).get("task", 0)
        return super().reset(seed=seed, options=options)

    def step(self, action):
        reward = 1.0 if self.task % 2 == 0 else float(len(action.split()) % 2)
        return [], reward, True, False, {}


class ConstantRewardEnv(BananaEnv):
    """A deliberately broken reward: 1.0 whatever the reply, so every group is tied and nothing can be learned."""

    def step(self, action):
        return [], 1.0, True, False, {}


class EvenTaskEnv(BananaEnv):
    """Solved exactly when the task number is even, whatever the reply: success rates are known by hand."""

    def reset(self, *, seed=None, options=None):
        self.task = (options or {}).get("task", 0)
        return super().reset(seed=seed, options=options)

    def step(self, action):
        solved = self.task % 2 == 0
        return [], float(solved), True, False, {"success": solved}
