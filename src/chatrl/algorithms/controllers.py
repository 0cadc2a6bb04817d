"""KL coefficient (beta) controllers for the reward shaping r_t = -beta * kl_t (+ score at the last token).

FixedKLController keeps beta constant. AdaptiveKLController is the proportional controller of
Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2:

    e    = clip(current_kl / target - 1, -0.2, 0.2)
    beta = beta * (1 + e * n_steps / horizon)

so beta grows when the measured KL (per sequence, summed over tokens) is above target and shrinks below.
Both expose `.value`, `.update(current_kl, n_steps)` and `state_dict()/load_state_dict()` for resume.
"""

from __future__ import annotations


class FixedKLController:
    """beta stays at its initial value; update() is a no-op kept for a uniform interface."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive beta (Ziegler et al.): `value *= 1 + clip(kl/target - 1, -0.2, 0.2) * n_steps / horizon`.

    init_beta: starting beta; target: desired KL per sequence (nats, > 0); horizon: how many samples
    (n_steps counts samples, e.g. the rollout batch size) it takes to move beta by the full error.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=}, {horizon=}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta toward the value that keeps KL at target (see module docstring)."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
