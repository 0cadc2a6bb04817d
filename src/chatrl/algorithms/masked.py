"""Reductions over the real (mask == 1) entries of a tensor.

`mask` has the shape of `x` (or broadcasts to it): 1 = the entry counts, 0 = padding / after EOS.
Masked-out entries are replaced with 0 through `torch.where` before any arithmetic, so their values
(even inf/NaN) never change a result. Every function is safe when the mask sums to 0: the mean and
variance of nothing are 0 (not NaN), so an all-padding micro-batch cannot poison a training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (x, mask) -> (mean, var) of the counted entries. The default is this process's batch; a trainer passes one
# that all-reduces sums across ranks, so every rank whitens with the statistics of the global batch.
Moments = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is 1, exactly 0 elsewhere (not x * mask, since 0 * inf = NaN). Same shape as x."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_i x_i * m_i over all entries (dim=None, 0-d result) or along `dim` (that dim is removed).

    x, mask: e.g. [B, R]; dim=-1 gives one sum per row, [B].
    """
    kept = zero_masked(x, mask)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_count(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Number of counted entries, as x's float dtype: sum_i m_i (over all, or along `dim`)."""
    m = mask.bool().expand_as(x).to(x.dtype if x.is_floating_point() else torch.float32)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_i x_i m_i / max(sum_i m_i, 1): mean of the counted entries (0 when none count).

    x, mask: [B, R] (any shape); dim=None -> 0-d tensor, dim=-1 -> per-row means [B].
    """
    return masked_sum(x, mask, dim) / masked_count(x, mask, dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the counted entries of x (all of them together, 0-d result).

    mu = masked_mean(x, mask); var = sum_i m_i (x_i - mu)^2 / (n - 1)   (n = sum_i m_i, unbiased)
                                 or   sum_i m_i (x_i - mu)^2 / n         (unbiased=False).
    Returns 0 when n == 0, and when n == 1 (a single value has no spread; Bessel's n-1 would be 0/0).
    """
    mean = masked_mean(x, mask)
    n = masked_count(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1) if unbiased else n
    return sq / denom.clamp(min=1)


def local_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked_mean, unbiased masked_var) of the counted entries of x: the default `Moments`."""
    return masked_mean(x, mask), masked_var(x, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  moments: Moments = local_moments) -> torch.Tensor:
    """Normalise the counted entries of x to unit variance (and zero mean if shift_mean).

    out_i = (x_i - mu) / sqrt(var + eps)        (shift_mean=True)
    out_i = (x_i - mu) / sqrt(var + eps) + mu   (shift_mean=False: only rescale around the mean)
    with mu, var = masked_mean / masked_var (unbiased) over ALL counted entries of the batch, or whatever
    `moments(x, mask)` returns (e.g. the statistics of the batches of all ranks together).
    Shapes: x, mask [B, R] -> [B, R]; masked-out positions are 0 in the output.
    """
    mean, var = moments(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return zero_masked(out, mask)
