"""`chatrl kto` through the real CLI: desirable replies carry a marker word, and training moves the held-out implicit
reward of desirable replies above the undesirable ones' by many standard errors; live reference = cached; kill +
resume; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import (
    assert_live_reference_matches_cached,
    assert_resume_gives_same_weights,
    load_with_plain_transformers,
    read_metrics,
    run_cli,
    train_on,
    write_marker_pairs,
)

TINY = "configs/tiny-kto.yaml"


def write_marker_feedback(path: Path, n: int) -> Path:
    """n unpaired rows from the marker pairs: even rows the pair's chosen reply (ends with 'banana') labelled true,
    odd rows its rejected reply (no 'banana') labelled false; each prompt appears once."""
    pairs = [json.loads(line) for line in write_marker_pairs(path.with_suffix(".pairs.jsonl"), n).read_text()
             .splitlines()]
    path.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0
                                        else p["rejected"], "label": i % 2 == 0}) + "\n"
                            for i, p in enumerate(pairs)))
    return path


@pytest.fixture(scope="module")
def feedback(tmp_path_factory) -> Path:
    return write_marker_feedback(tmp_path_factory.mktemp("kto-data") / "feedback.jsonl", 300)


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, tiny_model_dir, feedback: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("kto")
    return out, train_on("kto", TINY, feedback, out)


def test_kto_raises_held_out_desirable_rewards_above_undesirable(kto_run: tuple[Path, str]) -> None:
    out, log = kto_run
    train = read_metrics(out)
    # step 1: policy == reference, so r = 0 and z0 = 0: every example's loss is 1 - sigmoid(0) = 0.5
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-4) and train[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    first, last = read_metrics(out, "eval")
    assert last["examples"] == 60 and 20 < last["desirable"] < 40  # both classes held out
    # the margin is many standard errors above 0 at both evaluations (steps 15 and 30): 5-10 s.e. were seen over
    # three different splits of the data (data.seed)
    for ev in (first, last):
        assert ev["rewards/margin"] > max(0.5, 4 * ev["rewards/margin_se"])
    # the reference point z0 (the KL estimate) lies between the classes' log-ratios: desirable above, undesirable
    # below, which is what the loss asks for (rewards are beta * r, beta 0.5)
    assert last["rewards/desirable"] / 0.5 > last["kl"] > last["rewards/undesirable"] / 0.5
    assert last["loss"] < 0.4 < 0.5
    assert "reference log-probs of" in log
    assert "OK True" in load_with_plain_transformers(out / "model")


@pytest.mark.slow
def test_live_reference_gives_the_precomputed_loss(tmp_path: Path, tiny_model_dir, feedback: Path) -> None:
    assert_live_reference_matches_cached("kto", TINY, feedback, tmp_path, steps=3, keys=("loss", "kl"))


@pytest.mark.slow
def test_kto_kill_and_resume_gives_the_same_weights(tmp_path: Path, tiny_model_dir, feedback: Path) -> None:
    assert_resume_gives_same_weights("kto", TINY, feedback, tmp_path, kill_at=10, seed=3)


def test_kto_bad_input_is_one_line(tmp_path: Path, tiny_model_dir, feedback: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = feedback.read_text().splitlines()[:50]
    lines[6] = json.dumps({**json.loads(lines[6]), "label": "maybe"})
    bad.write_text("\n".join(lines) + "\n")
    proc = run_cli("kto", "--config", TINY, f"output_dir={tmp_path / 'b'}", f"data.paths=[{bad}]",
                   "kto.desirable_weight=1.2")
    assert proc.returncode == 2 and f"{bad}:7: field 'label'" in proc.stderr and "'maybe'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("kto", "--config", TINY, f"output_dir={tmp_path / 'c'}", f"data.paths=[{feedback}]",
                   "kto.undesirable_weight=0")
    assert proc.returncode == 2 and "kto.undesirable_weight=0" in proc.stderr and "Traceback" not in proc.stderr
