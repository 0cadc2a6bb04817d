"""`data.paths=[feedback:chat.db]` (or a sqlite:/// URL): the steps read a `chatrl serve --db` database directly,
each the rows it trains on (reward/dpo: pairs, kto: rated replies, sft: liked replies), through the export code;
`chatrl dpo` trains on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatrl.config import DataConfig
from chatrl.data.prepare import data_fingerprint, load_records, tokenized_rows
from chatrl.data.types import Conversation, LabeledCompletion, PreferencePair
from chatrl.errors import ChatrlError
from chatrl.feedback.db import open_db
from chatrl.feedback.store import FeedbackStore, Reply
from chatrl.models.loading import load_tokenizer
from helpers import read_metrics, run_cli

N = 12  # prompts, each with a regenerate choice and a rating


@pytest.fixture(scope="module")
def feedback_db(tmp_path_factory) -> Path:
    """Prompt i has replies "good i" and "bad i": "good" chosen over "bad"; "good" rated up for even i, "bad" rated
    down for odd i."""
    path = tmp_path_factory.mktemp("fb") / "chat.db"
    store = FeedbackStore(open_db(path))
    user = store.local_user()
    for i in range(N):
        done = store.record_completion(user, [{"role": "user", "content": f"question {i}"}],
                                       [Reply(f"chatcmpl-g{i}", f"good {i}", "stop"),
                                        Reply(f"chatcmpl-b{i}", f"bad {i}", "stop")],
                                       model_name="tiny", version="v1", sampling={})
        store.add_pair(user, done.prompt_id, f"chatcmpl-g{i}", f"chatcmpl-b{i}")
        if i % 2 == 0:
            store.add_rating(user, f"chatcmpl-g{i}", 1, None)
        else:
            store.add_rating(user, f"chatcmpl-b{i}", -1, None)
    store.db.close()
    return path


def _cfg(spec: str, split: str) -> DataConfig:
    return DataConfig(paths=[spec], split=split, eval_fraction=0.0, max_length=128, max_prompt_length=96)


def test_each_step_reads_its_own_rows(feedback_db: Path):
    pairs, _ = load_records(_cfg(f"feedback:{feedback_db}", "0,1,0"), "reward", "train")
    assert all(isinstance(p, PreferencePair) for p in pairs) and len(pairs) == N
    assert {(p.prompt_messages[-1]["content"], p.chosen, p.rejected) for p in pairs} == \
        {(f"question {i}", f"good {i}", f"bad {i}") for i in range(N)}

    kto, _ = load_records(_cfg(f"sqlite:///{feedback_db}", "0,1,0"), "kto", "train")  # the URL form too
    assert all(isinstance(r, LabeledCompletion) for r in kto)
    # the ratings, not the pairs split in two (that would be 2 * N rows)
    assert sorted((r.completion, r.desirable) for r in kto) == \
        sorted((f"good {i}", True) if i % 2 == 0 else (f"bad {i}", False) for i in range(N))

    sft, _ = load_records(_cfg(f"feedback:{feedback_db}", "1,0,0"), "sft", "train")
    assert all(isinstance(c, Conversation) for c in sft)
    assert sorted(c.messages[-1]["content"] for c in sft) == sorted(f"good {i}" for i in range(0, N, 2))

    split_pairs, _ = load_records(_cfg(f"feedback:{feedback_db}#pairs", "0,1,0"), "kto", "train")
    assert len(split_pairs) == 2 * N  # #pairs: KTO gets the pairs, split into a desirable and an undesirable row


def test_dpo_data_loading_tokenizes_the_database(feedback_db: Path, tiny_model_dir: str):
    tok = load_tokenizer(tiny_model_dir)
    rows = tokenized_rows(_cfg(f"feedback:{feedback_db}", "0,1,0"), tok, "reward", "train")
    assert len(rows) == N and all(r["source"].startswith(f"feedback:{feedback_db}:pairs:") for r in rows)
    decoded = {tok.decode(r["chosen_ids"][r["chosen_prompt_len"]:], skip_special_tokens=True).strip() for r in rows}
    assert {f"good {i}" for i in range(N)} <= {d.split("\n")[0] for d in decoded}


def test_fingerprint_follows_new_feedback_and_bad_entries_are_one_line_errors(tmp_path: Path, feedback_db: Path):
    copy = tmp_path / "copy.db"
    copy.write_bytes(feedback_db.read_bytes())
    before = data_fingerprint(f"feedback:{copy}")
    assert data_fingerprint(f"feedback:{copy}") == before
    store = FeedbackStore(open_db(copy))
    store.add_rating(store.local_user(), "chatcmpl-g1", 1, None)  # new feedback: the tokenized cache is stale
    assert data_fingerprint(f"feedback:{copy}") != before
    with pytest.raises(ChatrlError, match="feedback database not found"):
        load_records(_cfg(f"feedback:{tmp_path / 'missing.db'}", "0,1,0"), "reward", "train")
    assert not (tmp_path / "missing.db").exists()  # not created by looking
    with pytest.raises(ChatrlError, match="#nonsense is no feedback export format"):
        load_records(_cfg(f"feedback:{copy}#nonsense", "0,1,0"), "reward", "train")
    empty = tmp_path / "empty.db"
    FeedbackStore(open_db(empty)).local_user()
    with pytest.raises(ChatrlError, match="has no pairs rows yet"):
        load_records(_cfg(f"feedback:{empty}", "0,1,0"), "reward", "train")


def test_chatrl_dpo_trains_on_the_database(feedback_db: Path, tmp_path: Path):
    out = tmp_path / "dpo"
    proc = run_cli("dpo", "--config", "configs/tiny-dpo.yaml", f"output_dir={out}",
                   f"data.paths=[feedback:{feedback_db}]", "data.eval_fraction=0.25", "optim.max_steps=2",
                   "logging.eval_every=2", "checkpoint.every=2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = read_metrics(out)
    assert train and train[0]["loss"] == pytest.approx(0.6931, abs=0.01)  # step 1: policy == reference
    assert (out / "model" / "config.json").is_file()
