"""Statistics that must agree across ranks: whitening moments of the global batch and the adaptive KL
controller's beta (each rank sees only its own rollout; without the reduction their betas drift apart)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chatrl.algorithms.controllers import AdaptiveKLController
from chatrl.algorithms.masked import masked_whiten
from chatrl.engine.collectives import global_mean, global_moments


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # rank 0 holds [1, 2], rank 1 holds [3, 4, (padding 99)]: the global batch is 1, 2, 3, 4
    x = torch.tensor([[1.0, 2.0, 0.0]]) if rank == 0 else torch.tensor([[3.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 0]]) if rank == 0 else torch.tensor([[1, 1, 0]])
    mean, var = global_moments(x, mask)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(global_mean(4.0 if rank == 0 else 8.0), n_steps=10)  # local KLs differ, the mean is 6 = target
    out[rank] = (float(mean), float(var), masked_whiten(x, mask, moments=global_moments).tolist(), ctl.value)
    dist.destroy_process_group()


def test_two_ranks_whiten_with_global_moments_and_share_beta() -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    # mean 2.5, unbiased var of 1..4 = 5/3; whitened values (x - 2.5) / sqrt(5/3)
    for rank in (0, 1):
        mean, var, whitened, beta = results[rank]
        assert abs(mean - 2.5) < 1e-6 and abs(var - 5 / 3) < 1e-6
        assert abs(beta - 0.1) < 1e-12  # KL at target: beta unchanged, on both ranks
    s = (5 / 3) ** 0.5
    assert [round(v, 5) for v in results[0][2][0]] == [round(-1.5 / s, 5), round(-0.5 / s, 5), 0.0]
    assert [round(v, 5) for v in results[1][2][0]] == [round(0.5 / s, 5), round(1.5 / s, 5), 0.0]
