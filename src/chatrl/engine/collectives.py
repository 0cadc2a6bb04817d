"""The few cross-rank reductions the loops need, each a no-op in one process. Every rank must call them at the same
point (they are collectives): a rank that skips one makes the others wait."""

from __future__ import annotations

import torch
import torch.distributed as dist

from chatrl.algorithms.masked import masked_count, masked_sum


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is true on any rank. device: where the one-number all-reduce runs (the
    backend's device: the GPU under NCCL)."""
    if not distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def global_sum(value: float) -> float:
    """The sum of `value` over ranks (float64 on the wire, so token counts stay exact)."""
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def global_sum_tensor(x: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `x` over ranks, on x's device (x itself is left alone)."""
    if not distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def global_max(value: float) -> float:
    """The largest `value` over ranks."""
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
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
    """(mean, unbiased var) of the counted entries of x over ALL ranks' batches, so every rank whitens with the same
    statistics. Two passes in float64 (the global mean, then the squared deviations from it): one pass,
    (sum x^2 - n mean^2) / (n - 1) in fp32, cancels to 0 for uncentred data such as REINFORCE++ returns of mean 5
    and sd 1e-3. Returned in fp32."""
    xd = x.double()
    total, n = global_sum_tensor(torch.stack([masked_sum(xd, mask), masked_count(xd, mask)]))
    mean = total / n.clamp(min=1)
    squares = global_sum_tensor(masked_sum((xd - mean) ** 2, mask))
    var = squares / (n - 1).clamp(min=1)
    return mean.float(), var.float()
