"""Experiment trackers (`logging.report_to`): metrics land in tensorboard, mlflow's local store and wandb's
offline run file, read back with each tool's own reader; nothing needs the network."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import yaml

from chatrl.errors import ChatrlError
from chatrl.log import MetricsLogger
from chatrl.trackers import check_available

ROWS = [(1, "train", {"loss": 2.0, "lr": 1e-3}), (2, "train", {"loss": 1.5, "lr": 1e-3}),
        (2, "eval", {"loss": 1.75, "accuracy": 0.5}), (3, "train", {"loss": 1.0, "lr": 5e-4})]
EXPECTED = {"train/loss": {1: 2.0, 2: 1.5, 3: 1.0}, "eval/loss": {2: 1.75}, "eval/accuracy": {2: 0.5}}


def _log_rows(run_dir: Path, **kwargs) -> None:
    log = MetricsLogger(run_dir, rank=0, total_steps=3, progress=False, desc="sft", **kwargs)
    for step, split, metrics in ROWS:
        log.log(step, metrics, split=split)
    log.close()


def _tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _mlflow_metrics(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, str], str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("chatrl").experiment_id])
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in run.data.metrics}
    return history, run.data.params, run.info.status


def _wandb_history(run_dir: Path) -> dict[str, dict[int, float]]:
    """Read the offline `.wandb` file: W&B's LevelDB-style log (32 KiB blocks of [crc, length, type] records)
    holding `Record` protobufs, parsed with wandb's own schema (wandb 0.31 ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, payload, history = 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero fill to the end of the block
            pos += block - pos % block
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record or the LAST piece of one
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)  # `train/loss` may come as nested ["train", "loss"]
                    if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                        history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return history


def _contains(got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    for key, by_step in expected.items():
        assert got.get(key) == pytest.approx(by_step), (key, got.get(key))


def test_metrics_land_in_every_tracker_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline by itself
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # and local to the run dir
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.001}, "seed": 7}))
    _log_rows(tmp_path, report_to=["tensorboard", "mlflow", "wandb"])

    _contains(_tensorboard_scalars(tmp_path), EXPECTED)
    history, params, status = _mlflow_metrics(tmp_path)
    _contains(history, EXPECTED)
    assert params == {"optim.lr": "0.001", "seed": "7"} and status == "FINISHED"
    _contains(_wandb_history(tmp_path), EXPECTED)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2, 3]


def test_report_to_picks_the_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log_rows(tmp_path / "a", report_to=["mlflow"])
    assert (tmp_path / "a" / "mlflow" / "mlflow.db").exists() and not (tmp_path / "a" / "tensorboard").exists()
    _contains(_mlflow_metrics(tmp_path / "a")[0], EXPECTED)
    _log_rows(tmp_path / "b", report_to=["tensorboard"])
    assert _tensorboard_scalars(tmp_path / "b")["train/loss"] == pytest.approx({1: 2.0, 2: 1.5, 3: 1.0})
    _log_rows(tmp_path / "c", report_to=[])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["metrics.jsonl"]


def test_missing_tracker_package_is_one_line_naming_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ChatrlError, match=r"report_to=wandb needs the wandb package: pip install wandb") as e:
        check_available(["tensorboard", "wandb"])
    assert "\n" not in str(e.value)
    with pytest.raises(ChatrlError, match="unknown tracker 'comet'"):
        check_available(["comet"])
    check_available(["tensorboard"])  # always there: a core dependency


def test_report_to_is_checked_when_the_config_loads() -> None:
    from chatrl.config import SFTConfig
    from chatrl.configbase import load_config

    cfg = load_config(SFTConfig, "configs/tiny-sft.yaml", ["logging.report_to=tensorboard,mlflow"])
    assert cfg.logging.report_to == ["tensorboard", "mlflow"]
    with pytest.raises(ChatrlError, match="logging.report_to"):
        load_config(SFTConfig, "configs/tiny-sft.yaml", ["logging.report_to=[comet]"])
