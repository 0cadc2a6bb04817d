"""Resumable checkpoints shared by every step, written atomically.

Layout: `<output_dir>/checkpoints/step-000120/` holds one or more DeepSpeed engine states (one tag per
engine, e.g. "actor", "critic") plus `state.json` (step, data position, anything the step adds) and
`rng.pt` (torch/python/numpy RNG states, rank-local). Everything is first written to
`.tmp-step-000120/` and renamed into place by rank 0 after all ranks finished, with a `COMPLETE` marker
written last, so a SIGKILL at any moment leaves either a complete checkpoint or an ignorable temp dir.
`MANIFEST.json` lists every file's size and sha256: a checkpoint damaged after it was written (a truncated or
corrupted file, a disk that lost a block) is detected on resume, reported, and the previous one is used.
A write that fails (disk full, permissions) is one ChatrlError line; the previous checkpoint is untouched.
A finished step writes `checkpoints/FINISHED.json` after its final model and, unless
`checkpoint.keep_final_state`, deletes its checkpoints; running it again then trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from chatrl.engine.collectives import barrier, rank
from chatrl.errors import ChatrlError

_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / "COMPLETE").exists()]
    return [p for _, p in sorted(found)]


MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """MANIFEST.json: size and sha256 of every file below `folder` (the manifest itself and COMPLETE excluded)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, "COMPLETE"))
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None when they match its manifest, or it has none)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return None  # written before manifests existed
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{MANIFEST} unreadable ({e})"
    for name, want in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256 (corrupted)"
    return None


def find_resume_point(output_dir: str | Path, resume: str) -> Path | None:
    """`auto`: newest complete checkpoint whose files match their manifest (a damaged one is reported and the
    previous used), or None; `never`: None; anything else: that path (must be complete and intact)."""
    if resume == "never":
        return None
    if resume == "auto":
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if rank() == 0:
                print(f"chatrl: checkpoint {path} is damaged ({problem}); resuming from the one before it",
                      file=sys.stderr)
        return None
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise ChatrlError(f"checkpoint.resume={resume}: not a complete chatrl checkpoint (no COMPLETE marker)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ChatrlError(f"checkpoint.resume={resume}: the checkpoint is damaged ({problem}); pick another one "
                          "or set checkpoint.resume=auto")
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
    try:
        _write_checkpoint(tmp, step, engines, state, tensors)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_write_error(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise ChatrlError(f"could not write checkpoint {final} ({_one_line(e)}); {kept}. Free disk space or fix "
                          "the permissions, then run the same command again") from None
    if rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _write_checkpoint(tmp: Path, step: int, engines: dict[str, Any], state: dict[str, Any],
                      tensors: dict[str, dict[str, torch.Tensor]] | None) -> None:
    """Everything of checkpoint `step` into `tmp` (collective), COMPLETE last."""
    if rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    for tag, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=tag, save_latest=False)
    torch.save(_rng_state(), tmp / f"rng-rank{rank()}.pt")
    barrier()
    if rank() == 0:

        for name, tensor_dict in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in tensor_dict.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        write_manifest(tmp)
        (tmp / "COMPLETE").write_text("ok\n")


def _is_write_error(e: RuntimeError) -> bool:
    """torch.save reports a full disk as a RuntimeError from its zip writer, not as an OSError."""
    return "PytorchStreamWriter" in str(e) or "file write failed" in str(e)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------- a finished step

FINISHED = "FINISHED.json"


def mark_finished(output_dir: str | Path, step: int, keep_state: bool) -> None:
    """After the final model folder is written: record that the run finished at `step` and, unless `keep_state`,
    delete its resumable checkpoints (optimizer state is most of a run's disk; the final folder is all a later
    step needs). Collective."""
    root = checkpoint_root(output_dir)
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / FINISHED).write_text(json.dumps({"step": step}) + "\n")
        for path in [] if keep_state else list_checkpoints(output_dir):
            shutil.rmtree(path, ignore_errors=True)
    barrier()


def finished_without_state(output_dir: str | Path, resume: str, total: int) -> bool:
    """True when `output_dir` holds a run that finished at step `total` and kept no checkpoint: there is nothing
    to train (resume=auto only). A run that finished at another step count cannot be continued without its
    state: that is a ChatrlError, not a silent restart from scratch."""
    marker = checkpoint_root(output_dir) / FINISHED
    if resume != "auto" or not marker.exists() or list_checkpoints(output_dir):
        return False
    step = json.loads(marker.read_text())["step"]
    if step != total:
        raise ChatrlError(f"{output_dir} holds a run that finished at step {step} and kept no checkpoint "
                          f"(checkpoint.keep_final_state=false), so it cannot continue to step {total}: use a new "
                          "output_dir, or set checkpoint.resume=never to train from scratch")
    if rank() == 0:
        print(f"chatrl: {output_dir} already finished at step {step}/{total} (its final model is written, its "
              "checkpoints were not kept); nothing to train. To train again: checkpoint.resume=never", flush=True)
    return True


def load_checkpoint(path: Path, engines: dict[str, Any]) -> dict[str, Any]:
    """Restore engines (weights, optimizer, LR schedule) and RNG; return the saved `state` dict."""
    for tag, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(path), tag=tag)
        if load_path is None:
            raise ChatrlError(f"checkpoint {path} has no state for '{tag}'; delete it or set checkpoint.resume=never")
    rng = path / f"rng-rank{rank()}.pt"
    if rng.exists():
        # our own file of plain tensors and tuples; not model weights
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "state.json").read_text())


def load_checkpoint_tensors(path: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The tensor dict saved as `name` by `save_checkpoint` (None when the checkpoint has none)."""
    file = path / f"{name}.safetensors"
    if not file.exists():
        return None

    return load_file(str(file))
