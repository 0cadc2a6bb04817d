"""HybridEngine under DeepSpeed ZeRO-3 in 2 processes (gloo, CPU): one gather per refresh, synced generation
with ranks that finish at different steps, refresh after a DeepSpeed optimizer step.

The test starts this file twice as a script (one process per rank) and reads each rank's JSON result.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NEW = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_synced_generation_two_ranks(tiny_model_dir, tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(Path(__file__)), tiny_model_dir, str(tmp_path / f"rank{rank}.json")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        logs.append(out)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["matches_reference"], r
        assert r["copy_equals_gathered_after_step"], r
        assert r["width"] == NEW  # synced: every rank returns the same width, the longest of all ranks
    assert r0["own_steps"] < r1["own_steps"] == NEW, "rank 0 must finish early for the test to mean anything"


def _main(model_dir: str, out_path: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from chatrl.rollout.decode import GenerationSettings
    from chatrl.rollout.hybrid import HybridEngine
    from helpers import PAD, hf_greedy, left_padded, tiny_model

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_model(model_dir)  # same seed on both ranks: identical weights
    reference = tiny_model(model_dir)
    # Rank 0: one prompt whose greedy continuation hits EOS at step 1. Rank 1: six prompts that never do.
    ids0, mask0 = left_padded([6], seed=3)
    eos = int(hf_greedy(reference, ids0, mask0, 2, None)[0, 1])
    ids, mask = (ids0, mask0) if rank == 0 else left_padded()
    want = hf_greedy(reference, ids, mask, NEW, eos)

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    he = HybridEngine(engine, inference_dtype=None, zero3=True, release_after_rollout=False)
    assert he.zero3 and sum(p.numel() for p in model.parameters()) == 0  # really partitioned
    settings = GenerationSettings(max_new_tokens=NEW, do_sample=False)
    resp, resp_mask = he.generate(ids, mask, settings, eos_token_id=eos, pad_token_id=PAD)
    own_steps = int(resp_mask.sum(1).max())
    padded = torch.full_like(resp, PAD)
    padded[:, : want.shape[1]] = want
    matches = bool(torch.equal(resp, padded))

    # A training step through DeepSpeed, then the copy must be refreshed from the new (gathered) weights.
    engine.train()
    x = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(rank))
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    he.mark_weights_updated()
    he.generate(ids, mask, settings, eos_token_id=eos, pad_token_id=PAD)
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        copy_params = dict(he._copy.model.named_parameters())
        same = all(torch.equal(copy_params[n], p.detach()) for n, p in model.named_parameters())
        changed = not torch.equal(model.model.norm.weight.detach(), reference.model.norm.weight)
    Path(out_path).write_text(json.dumps(dict(rank=rank, width=resp.shape[1], own_steps=own_steps,
                                              matches_reference=matches,
                                              copy_equals_gathered_after_step=same and changed)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _main(sys.argv[1], sys.argv[2])
