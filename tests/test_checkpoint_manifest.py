"""Checkpoints carry a manifest (size + sha256 of every file): on resume a truncated or corrupted newest checkpoint
is detected, reported, and the previous one used; an explicitly named damaged checkpoint is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatrl.engine import checkpoint as ckpt
from chatrl.errors import ChatrlError
from helpers import SavingEngine


def two_checkpoints(out: Path) -> tuple[Path, Path]:
    first = ckpt.save_checkpoint(out, 1, {"actor": SavingEngine(b"a" * 4096)}, {}, keep_last=3)
    second = ckpt.save_checkpoint(out, 2, {"actor": SavingEngine(b"b" * 4096)}, {}, keep_last=3)
    return first, second


def test_intact_checkpoints_resume_from_the_newest(tmp_path: Path) -> None:
    _, second = two_checkpoints(tmp_path)
    assert (second / ckpt.MANIFEST).exists() and ckpt.checkpoint_problem(second) is None
    assert ckpt.find_resume_point(tmp_path, "auto") == second


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, capsys) -> None:
    first, second = two_checkpoints(tmp_path)
    weights = second / "actor" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    assert ckpt.find_resume_point(tmp_path, "auto") == first
    err = capsys.readouterr().err
    assert "step-000002 is damaged" in err and "actor/weights.bin has 100 bytes, 4096 were written" in err


def test_corrupted_bytes_of_the_same_size_are_detected(tmp_path: Path) -> None:
    first, second = two_checkpoints(tmp_path)
    (second / "state.json").write_text((second / "state.json").read_text().replace("2", "7"))
    assert "state.json does not match its sha256" in ckpt.checkpoint_problem(second)
    assert ckpt.find_resume_point(tmp_path, "auto") == first
    (first / "rng-rank0.pt").unlink()
    assert ckpt.find_resume_point(tmp_path, "auto") is None  # nothing intact: start over, said on stderr


def test_a_named_damaged_checkpoint_is_an_error(tmp_path: Path) -> None:
    _, second = two_checkpoints(tmp_path)
    (second / "actor" / "weights.bin").unlink()
    with pytest.raises(ChatrlError, match="damaged .actor/weights.bin is missing"):
        ckpt.find_resume_point(tmp_path, str(second))
