"""What both training loops (`steps/supervised.py`, `steps/rl.py`) do when a run meets a fault.

- SIGTERM / SIGINT (`StopRequest`, a context manager around the loop): the loop finishes its current optimizer
  step (RL: iteration), writes a checkpoint and exits 0 with a line saying how to resume. Every rank stops at the
  same step: once per step the flag is all-reduced (`agreed`). A second signal stops at once (KeyboardInterrupt).
- A non-finite loss or gradient (`BadSteps.backward_step`): the optimizer update is skipped (weights and optimizer
  state untouched), counted and warned about; after `optim.max_bad_steps` skipped updates in a row the run stops
  with a ChatrlError, leaving the last checkpoint (written before the bad steps) as it was.

Skipping under DeepSpeed: its wrapping optimizers (ZeRO 1-3, the bf16 and fp16 optimizers; they have an
`overflow` flag) check the gradients themselves at the accumulation boundary (DeepSpeed 0.19: an invalid gradient
norm, on every rank) and skip the step, counted in `engine.skipped_steps`, the LR schedule held. Under ZeRO-0
(fp32, or bf16 autocast) the engine steps chatrl's torch AdamW directly, which would apply NaNs: there we check the
loss and the gradients ourselves and let `engine.step()` run with the optimizer's `step` replaced by a no-op and
`overflow` set, so DeepSpeed's bookkeeping (micro-step counters, zeroed gradients, skipped_steps, LR schedule held)
is exactly that of its own overflow skip.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch

from chatrl.engine.collectives import any_rank, rank
from chatrl.engine.deepspeed import shutdown_distributed
from chatrl.errors import ChatrlError


def resume_command() -> str:
    """The command line this process was started with, as `chatrl ...` (what to run again to resume)."""
    return shlex.join(["chatrl", *sys.argv[1:]])


# ----------------------------------------------------------------------------- SIGTERM / SIGINT


class StopRequest:
    """`with StopRequest() as stop:` around a training loop; `stop.agreed()` once per step on every rank."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        # handlers can only be installed from the main thread (a loop run from a worker thread keeps the defaults)
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:  # asked twice: the user does not want to wait for the checkpoint
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"chatrl: {self.signal_name} received: finishing the current step, then writing a checkpoint "
              "(send it again to stop at once, without one)", file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """Did any rank get a signal? Called at the same point of every step on every rank, so all stop together."""
        return any_rank(self.signal_name is not None)

    def exit(self, step: int, total: int, checkpoint: Path) -> NoReturn:
        """Say how to resume, end the process group, exit 0 (SystemExit, so the step's final save never runs)."""
        if rank() == 0:
            by = self.signal_name or "a signal to another process"
            print(f"chatrl: stopped by {by} after step {step}/{total}; checkpoint: {checkpoint}\n"
                  f"chatrl: to resume, run the same command: {resume_command()}", flush=True)
        shutdown_distributed()
        raise SystemExit(0)


# ----------------------------------------------------------------------------- non-finite loss or gradients


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.detach()).all())


def _grad_norm(engine: Any) -> float | None:
    """The L2 norm of the gradients in `param.grad` (ZeRO-0 keeps them there until the step; None when none do)."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None


def _grads_finite(engine: Any) -> bool:
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


@contextmanager
def _no_update(optimizer: Any) -> Iterator[None]:
    """For one `engine.step()`: the optimizer's step does nothing and reports an overflow (see module docstring).
    The LR scheduler already wraps `step` as an instance attribute: put back whatever was there."""
    saved = optimizer.__dict__.get("step")
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        if saved is None:
            del optimizer.step
        else:
            optimizer.step = saved
        del optimizer.overflow  # a torch optimizer has none: DeepSpeed must not take it for one that checks itself


def boundary_step(engine: Any, loss_finite: bool) -> bool:
    """`engine.step()` at an accumulation boundary, skipping the update when the loss (any micro-batch, any rank)
    or a gradient is not finite. Returns whether the update was applied."""
    if hasattr(engine.optimizer, "overflow"):  # DeepSpeed's optimizer checks the gradients on every rank itself
        engine.step()
        return engine.was_step_applied()
    if any_rank(not loss_finite or not _grads_finite(engine)):
        with _no_update(engine.optimizer):
            engine.step()
        return False
    engine.step()
    return True


@dataclass
class BadSteps:
    """Counts skipped updates; `limit` (optim.max_bad_steps) in a row stop the run (0 = never)."""
    limit: int
    in_a_row: int = 0
    total: int = 0
    setting: str = "optim.max_bad_steps"  # the config field named in messages (RL: actor_optim.max_bad_steps)
    where: str = ""  # set by the loop ("step 5", "iteration 3") for the warning and the error

    def __post_init__(self) -> None:
        self._loss_finite: dict[int, bool] = {}  # per engine: no non-finite loss since its last boundary
        self._grad_norms: dict[int, float | None] = {}  # per engine: the gradient norm of its last optimizer step

    def backward_step(self, engine: Any, loss: torch.Tensor) -> bool | None:
        """`engine.backward(loss)` then `engine.step()`; at the boundary the update is skipped when non-finite.
        Returns None between boundaries, else whether the update was applied."""
        key = id(engine)
        self._loss_finite[key] = self._loss_finite.get(key, True) and _finite(loss)
        engine.backward(loss)
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
            return None
        before = None if hasattr(engine.optimizer, "overflow") else _grad_norm(engine)  # ZeRO-0: read before the step
        applied = boundary_step(engine, self._loss_finite.pop(key))
        measured = getattr(engine, "get_global_grad_norm", lambda: None)()  # DeepSpeed's, where its optimizer has one
        self._grad_norms[key] = float(measured) if measured is not None else before
        self.record(applied)
        return applied

    def grad_norm(self, engine: Any) -> float | None:
        """The gradient norm (before clipping) of `engine`'s last optimizer step; None if not measured."""
        return self._grad_norms.get(id(engine))

    def record(self, applied: bool) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        limit = f"{self.setting}={self.limit}" if self.limit else "no limit"
        if rank() == 0:
            print(f"chatrl: warning: {self.where}: non-finite loss or gradients, update skipped "
                  f"({self.in_a_row} in a row, {self.total} in all; {limit})", file=sys.stderr, flush=True)
        if self.limit and self.in_a_row >= self.limit:
            raise ChatrlError(f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradients (last at "
                              f"{self.where}; {self.setting}={self.limit}): stopped without saving; the last "
                              "checkpoint is intact. Lower optim.lr, check the data and rewards, then run again")

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = state.get("in_a_row", 0), state.get("total", 0)
