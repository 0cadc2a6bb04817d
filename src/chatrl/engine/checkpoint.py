"""Resumable checkpoints shared by every step, written atomically.

Layout: `<output_dir>/checkpoints/step-000120/` holds one or more DeepSpeed engine states (one tag per
engine, e.g. "actor", "critic") plus `state.json` (step, data position, anything the step adds) and
`rng.pt` (torch/python/numpy RNG states, rank-local). Everything is first written to
`.tmp-step-000120/` and renamed into place by rank 0 after all ranks finished, with a `COMPLETE` marker
written last, so a SIGKILL at any moment leaves either a complete checkpoint or an ignorable temp dir.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatrl.errors import ChatrlError

_STEP_RE = re.compile(r"^step-(\d+)$")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / "COMPLETE").exists()]
    return [p for _, p in sorted(found)]


def find_resume_point(output_dir: str | Path, resume: str) -> Path | None:
    """`auto`: newest complete checkpoint or None; `never`: None; anything else: that path (must be complete)."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise ChatrlError(f"checkpoint.resume={resume}: not a complete chatrl checkpoint (no COMPLETE marker)")
    return path


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(output_dir: str | Path, step: int, engines: dict[str, Any], state: dict[str, Any],
                    keep_last: int, tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Save every engine under its tag plus `state` (and named tensor dicts, e.g. EMA weights, as
    `<name>.safetensors`); atomic rename into `checkpoints/step-N`; prune old ones.

    Must be called on every rank (DeepSpeed's save is collective)."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    for tag, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=tag, save_latest=False)
    torch.save(_rng_state(), tmp / f"rng-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        from safetensors.torch import save_file

        for name, tensor_dict in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in tensor_dict.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        (tmp / "COMPLETE").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, engines: dict[str, Any]) -> dict[str, Any]:
    """Restore engines (weights, optimizer, LR schedule) and RNG; return the saved `state` dict."""
    for tag, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(path), tag=tag)
        if load_path is None:
            raise ChatrlError(f"checkpoint {path} has no state for '{tag}'; delete it or set checkpoint.resume=never")
    rng = path / f"rng-rank{_rank()}.pt"
    if rng.exists():
        # our own file of plain tensors and tuples; not model weights
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "state.json").read_text())


def load_checkpoint_tensors(path: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The tensor dict saved as `name` by `save_checkpoint` (None when the checkpoint has none)."""
    file = path / f"{name}.safetensors"
    if not file.exists():
        return None
    from safetensors.torch import load_file

    return load_file(str(file))
