"""Deterministic splits (DeepSpeed-Chat's `data_split`, e.g. "2,4,4") and weighted blending.

Each dataset is shuffled with its own RNG, seeded by `data.seed` and the dataset's name (a local
file's own name, not its folder: `Source.seed_name`), then cut
into contiguous shards for sft / reward / rlhf in proportion to the split. So the split of one dataset
never depends on the other datasets or on their order in `data.paths`, and the shards are disjoint.
Every shard then holds out its last `eval_fraction` as the eval part (at least one row when the
fraction is > 0 and the shard has 2+ rows).

Blending (`data.weights`): a dataset of n training rows with weight w contributes round(w * n) rows:
all rows floor(k / n) times plus a seeded sample of the remainder (so w=0.5 takes half the rows,
w=2 repeats every row twice, w=1 keeps them as they are). Eval parts are never reweighted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from chatrl.errors import ChatrlError

T = TypeVar("T")
STEPS = ("sft", "reward", "rlhf")


def parse_split(text: str) -> list[float]:
    """"2,4,4" -> [0.2, 0.4, 0.4]; a single step's data can be had with e.g. "1,0,0"."""
    try:
        parts = [float(p) for p in str(text).split(",")]
    except ValueError:
        raise ChatrlError(f"data.split='{text}': expected three comma-separated numbers like 2,4,4") from None
    if len(parts) != len(STEPS) or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ChatrlError(f"data.split='{text}': expected three non-negative numbers (sft,reward,rlhf) "
                          "with a positive sum, like 2,4,4")
    total = sum(parts)
    return [p / total for p in parts]


def _rng(seed: int, name: str, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs and machines.
    return random.Random(f"{seed}|{purpose}|{name}")


def shard_bounds(n: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges splitting n items by `fractions` (rounded cumulative cuts)."""
    cuts, acc = [0], 0.0
    for f in fractions:
        acc += f
        cuts.append(min(n, round(acc * n)))
    cuts[-1] = n
    return [(cuts[i], cuts[i + 1]) for i in range(len(fractions))]


def split_dataset(items: Sequence[T], name: str, split: str, eval_fraction: float,
                  seed: int) -> dict[tuple[str, str], list[T]]:
    """Partition one dataset into {(step, "train"|"eval"): items}, disjoint and deterministic."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ChatrlError(f"data.eval_fraction={eval_fraction}: must be in [0, 1)")
    order = list(range(len(items)))
    _rng(seed, name, "split").shuffle(order)
    out: dict[tuple[str, str], list[T]] = {}
    for step, (start, end) in zip(STEPS, shard_bounds(len(items), parse_split(split)), strict=True):
        shard = [items[i] for i in order[start:end]]
        n_eval = eval_size(len(shard), eval_fraction)
        out[(step, "train")] = shard[: len(shard) - n_eval]
        out[(step, "eval")] = shard[len(shard) - n_eval:]
    return out


def eval_size(n: int, eval_fraction: float) -> int:
    if eval_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(eval_fraction * n)))


def blend(datasets: Sequence[tuple[str, Sequence[T]]], weights: Sequence[float], seed: int) -> list[T]:
    """Mix datasets: dataset i contributes round(w_i * n_i) rows (see module doc); the result is
    shuffled with `seed` so batches mix sources."""
    if weights and len(weights) != len(datasets):
        raise ChatrlError(f"data.weights has {len(weights)} values but data.paths has {len(datasets)} entries")
    out: list[T] = []
    for i, (name, rows) in enumerate(datasets):
        w = weights[i] if weights else 1.0
        if w < 0:
            raise ChatrlError(f"data.weights[{i}]={w}: weights must be >= 0")
        n = len(rows)
        k = round(w * n)
        if n == 0 or k == 0:
            continue
        out.extend(list(rows) * (k // n))
        out.extend(_rng(seed, name, "blend").sample(list(rows), k % n))
    if len(datasets) > 1:
        _rng(seed, "|".join(n for n, _ in datasets), "mix").shuffle(out)
    return out
