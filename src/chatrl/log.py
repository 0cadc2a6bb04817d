"""One metrics logger for every step: progress bar, `metrics.jsonl` and tensorboard, rank 0 only.

Each `log(step, metrics, split=...)` appends one JSON line `{"step", "split", "time", ...metrics}` that
the run report plots later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _scalar(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, rank: int, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, desc: str = "train") -> None:
        self.enabled = rank == 0
        self.out_dir = Path(out_dir)
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "split": split, "time": time.time(), **clean}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{split}/{k}", v, step)

    def advance(self, n: int = 1, **postfix: Any) -> None:
        """Move the progress bar and show the latest numbers (loss, tokens/s, ...) beside it."""
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def write(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.file.close()


def _fmt(v: Any) -> str:
    v = _scalar(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
