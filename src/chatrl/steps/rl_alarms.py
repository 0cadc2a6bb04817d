"""Alarms of an RL run: what a user needs to hear when learning fails, never silent.

Each iteration's metrics row (step 6 of `run_rl`) is checked; an alarm prints one warning line and is appended to
`<output_dir>/alarms.jsonl` ({"step", "kind", "message"}), which the HTML report shows in a red box. A kind fires
at most once per `window` iterations (no wall of repeats).

  nonfinite       reward_mean or kl is NaN / inf
  all_tied        every group of the rollout has equal rewards: group-relative advantages are all 0
  stale_rollout   the sampler's log-probs differ from the trained actor's on the same tokens by more than
                  STALE_LOGPROB_GAP nats on average: the rollout did not use the weights being trained (a frozen or
                  stale inference copy); bf16 rollouts differ by rounding (~1e-2), far below the bound
  reward_flat     over the last `window` iterations the mean reward rose by less than one standard error of the
                  earlier window's mean while the KL to the reference grew by half or more: the policy is moving
                  away from the reference without getting better
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from chatrl.eval.metrics import mean_se

STALE_LOGPROB_GAP = 0.1  # nats per token, mean |sampler - trainer| log-prob
ALARMS_FILE = "alarms.jsonl"


@dataclass
class Alarm:
    step: int
    kind: str
    message: str


def check_row(row: dict[str, float], history: list[dict[str, float]], window: int, step: int) -> list[Alarm]:
    """The alarms of one metrics row; `history` holds the earlier rows (oldest first), `row` not included."""
    out = []
    bad = [k for k in ("reward_mean", "kl") if k in row and not math.isfinite(row[k])]
    if bad:
        out.append(Alarm(step, "nonfinite", f"{' and '.join(bad)} not finite ({', '.join(str(row[k]) for k in bad)})"))
    if row.get("zero_variance_groups", 0.0) >= 1.0:
        out.append(Alarm(step, "all_tied", "every group's rewards are tied: all advantages are 0, nothing is learned "
                                           "(reward too coarse or too hard/easy for the policy)"))
    gap = row.get("agreement/logprob_mean_abs_diff")
    if gap is not None and gap > STALE_LOGPROB_GAP:
        out.append(Alarm(step, "stale_rollout", f"the rollout's log-probs differ from the trained actor's by {gap:.3f} "
                                                f"nats per token (> {STALE_LOGPROB_GAP}): the sampler did not use the "
                                                "weights being trained"))
    flat = reward_flat(history + [row], window)
    if flat:
        out.append(Alarm(step, "reward_flat", flat))
    return out


def reward_flat(rows: list[dict[str, float]], window: int) -> str | None:
    """The reward_flat message when the last `window` rows against the `window` before them show no reward gain
    beyond one s.e. while the KL grew by half or more; None otherwise (or with fewer than 2 * window rows)."""
    if window < 2 or len(rows) < 2 * window or any("kl" not in r or "reward_mean" not in r for r in rows[-2 * window:]):
        return None
    before, last = rows[-2 * window:-window], rows[-window:]
    r0, r1 = [r["reward_mean"] for r in before], [r["reward_mean"] for r in last]
    k0, k1 = statistics.mean(r["kl"] for r in before), statistics.mean(r["kl"] for r in last)
    se = mean_se(r0)
    rise = statistics.mean(r1) - statistics.mean(r0)
    if rise < se and k1 > 1.5 * max(k0, 1e-3):
        return (f"the mean reward moved {rise:+.3f} (< 1 s.e. = {se:.3f}) over the last {window} iterations while "
                f"the KL grew {k0:.3f} -> {k1:.3f}: lower the lr or raise the KL coefficient")
    return None


class Alarms:
    """Checks every metrics row of a run (rank 0 writes), remembering the rows for the trend alarms."""

    def __init__(self, output_dir: str | Path, window: int = 5, rank: int = 0):
        self.path = Path(output_dir) / ALARMS_FILE
        self.window, self.rank = window, rank
        self.history: list[dict[str, float]] = []
        self.last_fired: dict[str, int] = {}

    def check(self, step: int, row: dict[str, float]) -> list[Alarm]:
        fired = [a for a in check_row(row, self.history, self.window, step)
                 if step - self.last_fired.get(a.kind, -self.window) >= self.window]
        self.history.append(row)
        for a in fired:
            self.last_fired[a.kind] = step
        if fired and self.rank == 0:
            with self.path.open("a", encoding="utf-8") as f:
                for a in fired:
                    f.write(json.dumps(asdict(a)) + "\n")
                    print(f"chatrl: ALARM [{a.kind}] iteration {step}: {a.message}", file=sys.stderr, flush=True)
        return fired


def read_alarms(folder: str | Path) -> list[Alarm]:
    """The alarms a run wrote (none when it wrote no file)."""
    path = Path(folder) / ALARMS_FILE
    if not path.exists():
        return []
    return [Alarm(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
