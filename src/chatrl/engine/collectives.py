"""The few cross-rank reductions the loops need, each a no-op in one process. Every rank must call them at the same
point (they are collectives): a rank that skips one makes the others wait."""

from __future__ import annotations

import torch
import torch.distributed as dist

from chatrl.algorithms.masked import masked_count, masked_sum


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not distributed():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def global_sum(value: float) -> float:
    """The sum of `value` over ranks (float64 on the wire, so token counts stay exact)."""
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def global_mean(value: float) -> float:
    return global_sum(value) / (dist.get_world_size() if distributed() else 1)


def global_means(values: dict[str, float], sums: frozenset[str] = frozenset()) -> dict[str, float]:
    """Every value averaged over ranks (keys in `sums`: summed), in one all-reduce; every rank must pass the same
    keys. The mean of ranks' means is the global mean when every rank holds the same number of items."""
    if not distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    world = dist.get_world_size()
    return {k: float(v) if k in sums else float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased var) of the counted entries of x over ALL ranks' batches (sums all-reduced), so every rank
    whitens with the same statistics."""
    x = x.float()
    sums = torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), masked_count(x, mask)])
    if distributed():
        dist.all_reduce(sums)
    total, squares, n = sums
    mean = total / n.clamp(min=1)
    return mean, (squares - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
