"""Experiment trackers beside `metrics.jsonl`: one small adapter per tracker (`logging.report_to`).

Every adapter writes into the run directory and needs no network:
- tensorboard: event files in `<run>/tensorboard/` (the default);
- mlflow: a local SQLite store `<run>/mlflow/mlflow.db` (current mlflow refuses its old file store unless told
  to), artifacts under `<run>/mlflow/artifacts/`; browse with `mlflow ui --backend-store-uri sqlite:///...`;
  MLFLOW_TRACKING_URI, when set, names another store;
- wandb: offline mode (unless WANDB_MODE says otherwise) under `<run>/wandb/`; upload later with `wandb sync`.
Metric names are `<split>/<key>` (e.g. `train/loss`, `eval/accuracy`) in all three.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from chatrl.errors import ChatrlError

TRACKERS = ("tensorboard", "mlflow", "wandb")
# the packages each optional tracker imports, and how to get them (the `trackers` extra installs all of them)
_PACKAGES = {"mlflow": ("mlflow", "sqlalchemy", "alembic"), "wandb": ("wandb",)}
_PIP = {"mlflow": "pip install mlflow-skinny sqlalchemy alembic", "wandb": "pip install wandb"}


class Tracker(Protocol):
    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def check_available(report_to: Sequence[str]) -> None:
    """Fail before any work when a tracker's package is missing: one line naming it and the pip command."""
    for name in report_to:
        if name not in TRACKERS:
            raise ChatrlError(f"logging.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        missing = [p for p in _PACKAGES.get(name, ()) if importlib.util.find_spec(p) is None]
        if missing:
            raise ChatrlError(f"logging.report_to={name} needs the {' and '.join(missing)} package"
                              f"{'s' if len(missing) > 1 else ''}: {_PIP[name]} (or pip install 'chatrl[trackers]')")


def open_trackers(report_to: Sequence[str], run_dir: Path, *, name: str,
                  config: Mapping[str, Any] | None = None) -> list[Tracker]:
    """One adapter per entry of `report_to`, each writing under `run_dir`; `config` is logged as parameters."""
    check_available(report_to)
    makers = {"tensorboard": TensorboardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}
    return [makers[t](run_dir, name=name, config=config or {}) for t in dict.fromkeys(report_to)]


class TensorboardTracker:
    def __init__(self, run_dir: Path, *, name: str, config: Mapping[str, Any]) -> None:
        # lazy, as the other trackers' libraries: tensorboard takes ~0.5 s to import, and `chatrl.log` (imported by
        # commands that only show a progress bar, e.g. `chatrl score`) imports this module
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One mlflow run per step process, in experiment `chatrl` of the run directory's own SQLite store (or of the
    store MLFLOW_TRACKING_URI names, e.g. a shared server)."""

    def __init__(self, run_dir: Path, *, name: str, config: Mapping[str, Any]) -> None:
        # lazy: mlflow is a heavy optional dependency (~1 s to import, database migrations on first use)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        root = (run_dir / "mlflow").resolve()
        root.mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.metric = Metric
        experiment = self.client.get_experiment_by_name("chatrl")
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment("chatrl", artifact_location=(root / "artifacts").as_uri()))
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]  # mlflow caps values at 500 chars
        for i in range(0, len(params), 100):  # and a batch at 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(f"{split}/{k}", float(v), now, step)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One wandb run per step process; offline unless the user set WANDB_MODE (e.g. `online` after `wandb login`)."""

    def __init__(self, run_dir: Path, *, name: str, config: Mapping[str, Any]) -> None:
        # lazy: wandb is a heavy optional dependency that starts a service process
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "chatrl"), name=name, dir=str(run_dir),
                              config=dict(config), mode=os.environ.get("WANDB_MODE", "offline"),
                              reinit="create_new",  # a pipeline runs several steps, each its own run
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        # an eval row at the train row's step joins that step's history row (wandb's step may not go back)
        self.run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-5}} -> {"optim.lr": 1e-5} (the dotted names of the config overrides)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
