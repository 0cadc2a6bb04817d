"""Step 2 through the real CLI: a marker-word preference set is learned; the saved folder is a plain
AutoModelForSequenceClassification that scores like chatrl's scorer; bad pairs are refused or skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import kill_after_checkpoint, read_metrics, run_cli, same_weights, write_marker_pairs


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("reward")
    data = write_marker_pairs(tmp / "pairs.jsonl", 400)
    out = tmp / "run"
    proc = run_cli("reward", "--config", "configs/tiny-reward.yaml", f"output_dir={out}", f"data.paths=[{data}]",
                   "data.split=0,1,0", "data.eval_fraction=0.15", "optim.max_steps=40", "optim.lr=3e-3",
                   "optim.micro_batch_size=8", "logging.eval_every=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_reward_learns_marker_on_held_out_pairs(reward_run: Path) -> None:
    evals = read_metrics(reward_run, "eval")
    assert evals[-1]["accuracy"] >= 0.9
    assert evals[-1]["margin"] > 0
    assert evals[-1]["chosen"] > evals[-1]["rejected"]
    train = read_metrics(reward_run)
    assert {"loss", "accuracy"} <= set(train[-1])


def test_saved_reward_model_scores_like_chatrl(reward_run: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chatrl.data.tokenize import collate_pairs, encode_pair
    from chatrl.data.types import PreferencePair
    from chatrl.models.reward import load_reward_model, sequence_scores

    folder = reward_run / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert plain.config.num_labels == 1 and plain.config.pad_token_id != tok.eos_token_id
    pairs = [PreferencePair([{"role": "user", "content": "hi there"}], "sun banana", "rain"),
             PreferencePair([{"role": "user", "content": "a much longer question about trees"}], "tree road banana",
                            "tree road"),
             PreferencePair([{"role": "user", "content": "say something"}], "the old house banana", "the old house"),
             PreferencePair([{"role": "user", "content": "what now"}], "blue river banana", "blue river stone")]
    rows = [{"chosen_ids": e.chosen, "rejected_ids": e.rejected, "margin": None}
            for e in (encode_pair(tok, p, 128, 96) for p in pairs)]
    batch = collate_pairs(rows, tok.pad_token_id)  # right padded, different lengths
    ours = sequence_scores(load_reward_model(str(folder), dtype="fp32", trainable=False), batch.input_ids,
                           batch.attention_mask)
    with torch.no_grad():
        theirs = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the saved model carries the learned preference: banana replies (rows 0-3) outscore their twins (rows 4-7);
    # compared on average: a single hand-picked pair flipped in one of three runs on this machine
    assert ours[:4].mean() > ours[4:].mean()


@pytest.mark.parametrize("row, what", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "p", "chosen": "only chosen"}, "rejected"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty"),
])
def test_bad_pairs_fail_clearly_or_are_skipped(tmp_path: Path, tiny_model_dir, row: dict, what: str) -> None:
    data = write_marker_pairs(tmp_path / "pairs.jsonl", 60)
    with data.open("a") as f:
        f.write(json.dumps(row) + "\n")
    args = ["reward", "--config", "configs/tiny-reward.yaml", f"output_dir={tmp_path / 'run'}",
            f"data.paths=[{data}]", "data.split=0,1,0", "optim.max_steps=1", "logging.eval_every=0"]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pairs.jsonl" in proc.stderr and ":61" in proc.stderr and "Traceback" not in proc.stderr
    assert what in proc.stderr.lower()
    proc = run_cli(*args, "data.skip_bad_rows=true")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_reward_killed_at_a_random_moment_and_resumed_gives_the_same_weights(tmp_path: Path, tiny_model_dir) -> None:
    data = write_marker_pairs(tmp_path / "pairs.jsonl", 200)
    args = ["reward", "--config", "configs/tiny-reward.yaml", f"data.paths=[{data}]", "data.split=0,1,0",
            "optim.max_steps=80", "checkpoint.every=10", "logging.eval_every=0"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert run_cli(*args, f"output_dir={straight}").returncode == 0
    kill_after_checkpoint(cut, 10, [*args, f"output_dir={cut}"], jitter=0.5, seed=2)
    proc = run_cli(*args, f"output_dir={cut}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr + proc.stdout
    assert same_weights(straight / "model", cut / "model") == []  # bit-exact in fp32
