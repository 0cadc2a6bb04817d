"""One metrics logger for every step: progress bar, `metrics.jsonl` and the experiment trackers of
`logging.report_to` (tensorboard by default; mlflow, wandb: `chatrl.trackers`), rank 0 only; and the progress bar
of the long commands that train nothing (`progress_bar`).

Each `log(step, metrics, split=...)` appends one JSON line `{"step", "split", "time", ...metrics}` that
the run report plots later, and sends the numeric metrics to every tracker as `<split>/<key>`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from chatrl.trackers import Tracker, open_trackers


def _scalar(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


class MetricsLogger:
    """`report_to`: the trackers (`logging.report_to`; [] = metrics.jsonl only). The run's `config.yaml`, when there
    is one, goes to the trackers as the run's parameters."""

    def __init__(self, out_dir: str | Path, *, rank: int, total_steps: int, report_to: list[str],
                 start_step: int = 0, progress: bool = True, desc: str = "train") -> None:
        self.enabled = rank == 0
        self.out_dir = Path(out_dir)
        self.trackers: list[Tracker] = []
        self.bar = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.trackers = open_trackers(report_to, self.out_dir, name=desc, config=_run_config(self.out_dir))
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "split": split, "time": time.time(), **clean}) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(step, split, numbers)

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
        for tracker in self.trackers:
            tracker.close()
        self.file.close()


def progress_bar(total: int, desc: str, *, unit: str = "it", enabled: bool = True) -> tqdm:
    """The progress bar of a long command that is not a training step (count, rate and ETA, on stderr), e.g.
    `chatrl score`; `bar.update(n)` after each batch, `with` or `close()` to finish it."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


def _run_config(out_dir: Path) -> dict[str, Any]:
    """The step's config as saved in the run directory ({} when there is none, e.g. a bare logger in a tool)."""
    path = out_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _fmt(v: Any) -> str:
    v = _scalar(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
