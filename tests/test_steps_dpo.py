"""`chatrl dpo` through the real CLI: a marker-word preference set is learned from the reference's cached
log-probs; the cache equals the live reference and is rebuilt when it does not match; kill + resume; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatrl.config import DataConfig
from chatrl.data.prepare import tokenized_rows
from chatrl.data.tokenize import collate_pairs
from chatrl.models.loading import load_frozen_causal_lm, load_tokenizer
from chatrl.steps.dpo_reference import cache_path, cached_reference_logps, reply_logps
from helpers import (
    assert_live_reference_matches_cached,
    assert_resume_gives_same_weights,
    load_with_plain_transformers,
    read_metrics,
    run_cli,
    train_on,
    write_marker_pairs,
)

TINY = "configs/tiny-dpo.yaml"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_marker_pairs(tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl", 300)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir, pairs: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("dpo")
    return out, train_on("dpo", TINY, pairs, out)


def test_dpo_learns_marker_preference_on_held_out_pairs(dpo_run: tuple[Path, str]) -> None:
    out, log = dpo_run
    evals = read_metrics(out, "eval")
    # halfway (step 15) 0.80-1.0 was seen over different splits of the pairs; chance is 0.5
    assert evals[0]["rewards/accuracy"] >= 0.75 and evals[-1]["rewards/accuracy"] >= 0.95
    assert evals[-1]["rewards/margin"] > 1.0  # beta * log-ratio margin: chosen well above rejected
    assert evals[-1]["loss"] < 0.5 < 0.6931  # log 2 = the loss of a policy equal to its reference
    train = read_metrics(out)
    assert train[0]["loss"] == pytest.approx(0.6931, abs=0.01)  # step 1: policy == reference, h = 0
    assert train[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(train[-1])
    assert "reference log-probs of" in log
    assert "OK True" in load_with_plain_transformers(out / "model")


def _rows(pairs: Path, tok) -> list[dict]:
    cfg = DataConfig(paths=[str(pairs)], split="0,1,0", eval_fraction=0.15, max_rows=40, max_length=128,
                     max_prompt_length=96)
    return tokenized_rows(cfg, tok, "reward", "eval")


def test_reference_cache_equals_live_reference_and_is_rebuilt_when_wrong(tiny_model_dir, pairs: Path,
                                                                         capsys) -> None:
    tok = load_tokenizer("tiny-random")
    rows = _rows(pairs, tok)
    model = load_frozen_causal_lm("tiny-random", dtype="fp32", tokenizer=tok)
    loads = []

    def load():
        loads.append(1)
        return model

    collate = lambda r: collate_pairs(r, tok.pad_token_id)  # noqa: E731
    cache_path("tiny-random", "fp32", rows).unlink(missing_ok=True)  # left by an earlier test session
    values, path = cached_reference_logps(rows, reference="tiny-random", dtype="fp32", load_model=load,
                                          collate=collate, batch_size=3, rank=0)
    with torch.no_grad():  # live: one pair at a time, no padding next to other rows
        for row, (c, r) in zip(rows, values, strict=True):
            sums, _ = reply_logps(model, collate([row]))
            assert sums.tolist() == pytest.approx([c, r], abs=1e-4)
    again, _ = cached_reference_logps(rows, reference="tiny-random", dtype="fp32", load_model=load,
                                      collate=collate, batch_size=3, rank=0)
    assert again == values and len(loads) == 1  # second call: read from the cache, no model load
    cached = json.loads(path.read_text())
    cached["logps"][0] = [0.5, 0.5]
    cached["rows_sha256"] = "0" * 64  # a file that claims other rows
    path.write_text(json.dumps(cached))
    rebuilt, _ = cached_reference_logps(rows, reference="tiny-random", dtype="fp32", load_model=load,
                                        collate=collate, batch_size=3, rank=0)
    assert "does not match the data" in capsys.readouterr().out
    assert [x for v in rebuilt for x in v] == pytest.approx([x for v in values for x in v], abs=1e-5)
    assert len(loads) == 2


def test_live_reference_gives_the_precomputed_loss(tmp_path: Path, tiny_model_dir, pairs: Path) -> None:
    assert_live_reference_matches_cached("dpo", TINY, pairs, tmp_path, steps=2, keys=("loss",))


@pytest.mark.slow
def test_dpo_kill_and_resume_gives_the_same_weights(tmp_path: Path, tiny_model_dir, pairs: Path) -> None:
    assert_resume_gives_same_weights("dpo", TINY, pairs, tmp_path, kill_at=10, seed=6)


def test_dpo_bad_input_is_one_line(tmp_path: Path, tiny_model_dir, pairs: Path) -> None:
    proc = run_cli("dpo", "--config", TINY, f"output_dir={tmp_path / 'a'}", f"data.paths=[{pairs}]",
                   "dpo.reference_model=/no/such/model")
    assert proc.returncode == 2 and "dpo.reference_model" in proc.stderr and "/no/such/model" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    lines = pairs.read_text().splitlines()[:50]
    row = json.loads(lines[6])
    lines[6] = json.dumps({**row, "rejected": row["chosen"]})
    bad.write_text("\n".join(lines) + "\n")
    proc = run_cli("dpo", "--config", TINY, f"output_dir={tmp_path / 'b'}", f"data.paths=[{bad}]")
    assert proc.returncode == 2 and f"{bad}:7" in proc.stderr and "rejected" in proc.stderr
    assert "identical" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("dpo", "--config", TINY, f"output_dir={tmp_path / 'c'}", f"data.paths=[{pairs}]",
                   "dpo.loss=simpo", "dpo.label_smoothing=0.1")
    assert proc.returncode == 2 and "dpo.label_smoothing" in proc.stderr
