"""Tokenization: assistant-only labels, pair ends at EOS, left truncation, collators, packing, cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from chatrl.config import DataConfig
from chatrl.data import prepare
from chatrl.data.tokenize import (
    IGNORE,
    collate_pairs,
    collate_sft,
    encode_conversation,
    encode_pair,
    encode_prompt,
    length_batches,
    pack_rows,
)
from chatrl.data.types import Conversation, PreferencePair, Prompt

FIX = Path(__file__).parent / "fixtures" / "data"
CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi.\n\nHow can I help?"},
    {"role": "user", "content": "Count to three"},
    {"role": "assistant", "content": "1, 2, 3."},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _ids(tok, messages, gen=False):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_labels_are_minus_100_exactly_outside_assistant_replies(tok):
    row = encode_conversation(tok, Conversation(CONV), max_length=512)
    assert row["input_ids"] == _ids(tok, CONV)
    # independent expectation by token counts: reply i spans from the end of the prefix rendered with the
    # generation prompt to the end of the turn, minus the "\n" the template puts after <|im_end|>
    expected = [IGNORE] * len(row["input_ids"])
    for i, m in enumerate(CONV):
        if m["role"] == "assistant":
            start, end = len(_ids(tok, CONV[:i], gen=True)), len(_ids(tok, CONV[: i + 1])) - 1
            expected[start:end] = row["input_ids"][start:end]
    assert row["labels"] == expected
    trained = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE]
    assert tok.decode(trained) == "Hi.\n\nHow can I help?<|im_end|>1, 2, 3.<|im_end|>"
    masked = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab == IGNORE])
    assert "Hello there" in masked and "<|im_start|>assistant\n" in masked and "1, 2, 3." not in masked


def test_train_on_prompt_and_truncation(tok):
    full = encode_conversation(tok, CONV, max_length=512, train_on_prompt=True)
    assert full["labels"] == full["input_ids"]
    cut = encode_conversation(tok, CONV, max_length=40)
    assert cut["input_ids"] == full["input_ids"][:40] and len(cut["labels"]) == 40
    assert encode_conversation(tok, CONV, max_length=40, overlength="drop") is None
    # truncated before any assistant token: nothing to train on
    assert encode_conversation(tok, CONV, max_length=5) is None


def test_fallback_template_without_chat_template(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    row = encode_conversation(plain, CONV[1:3], max_length=512)
    text = plain.decode(row["input_ids"])
    assert text.startswith("Human: Hello there\n\nAssistant:")
    trained = plain.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE])
    assert trained.strip() == "Hi.\n\nHow can I help?" + plain.eos_token


def test_pair_ends_exactly_at_end_of_turn(tok):
    pair = PreferencePair(CONV[:4], chosen="One two three.", rejected="No.")
    chosen, rejected, chosen_plen, rejected_plen = encode_pair(tok, pair, max_length=512, max_prompt_length=256)
    prompt = _ids(tok, CONV[:4], gen=True)
    assert chosen_plen == rejected_plen == len(prompt)
    assert chosen[-1] == rejected[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert chosen[: len(prompt)] == prompt == rejected[: len(prompt)]
    assert tok.decode(chosen[len(prompt):]) == "One two three.<|im_end|>"
    assert tok.decode(rejected[len(prompt):]) == "No.<|im_end|>"


def test_long_prompt_is_left_truncated_keeping_reply_end(tok):
    long_prompt = [{"role": "user", "content": "word " * 200}]
    pair = PreferencePair(long_prompt, chosen="Yes indeed.", rejected="Nope.")
    chosen, rejected, chosen_plen, _ = encode_pair(tok, pair, max_length=512, max_prompt_length=16)
    prompt = _ids(tok, long_prompt, gen=True)
    assert chosen[:16] == prompt[-16:] and tok.decode(chosen[16:]) == "Yes indeed.<|im_end|>"
    assert rejected[:16] == prompt[-16:] and chosen_plen == 16
    tight = encode_pair(tok, pair, max_length=10, max_prompt_length=16)
    assert len(tight.chosen) == 10 and tight.chosen == chosen[-10:]
    # the reply keeps its len(chosen) - 16 tokens; the rest of the 10 are prompt
    assert tight.chosen_prompt_len == 10 - (len(chosen) - 16)
    assert encode_pair(tok, pair, 512, 16, overlength="drop") is None

    ids = encode_prompt(tok, Prompt(long_prompt), max_prompt_length=16)
    assert ids == prompt[-16:]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert encode_prompt(tok, long_prompt, 16, overlength="drop") is None
    assert encode_prompt(tok, long_prompt, 10_000) == prompt


def test_collators_pad_and_order():
    sft = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert sft.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert sft.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert sft.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    pairs = collate_pairs([{"chosen_ids": [1, 2], "rejected_ids": [3], "margin": 0.5},
                           {"chosen_ids": [4], "rejected_ids": [5, 6, 7], "margin": None}], pad_id=9)
    assert pairs.input_ids.tolist() == [[1, 2, 9], [4, 9, 9], [3, 9, 9], [5, 6, 7]]
    assert pairs.attention_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]]
    assert torch.equal(pairs.margin, torch.tensor([0.5, 0.0]))


def test_pack_rows_fills_without_splitting_rows():
    rows = [{"input_ids": [i] * n, "labels": [-100] + [i] * (n - 1)} for i, n in ((1, 3), (2, 4), (3, 2), (4, 5))]
    packed = pack_rows(rows, max_length=8)
    assert [r["input_ids"] for r in packed] == [[1, 1, 1, 2, 2, 2, 2], [3, 3, 4, 4, 4, 4, 4]]
    assert packed[0]["labels"] == [-100, 1, 1, -100, 2, 2, 2]
    assert all(len(r["input_ids"]) <= 8 for r in packed)


def test_tokenized_rows_per_step_and_cache_hit(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATRL_HOME", str(tmp_path / "home"))
    cfg = DataConfig(paths=[str(FIX / "preference.jsonl")], split="1,1,1", eval_fraction=0.0)
    sft = prepare.tokenized_rows(cfg, tok, "sft", "train")
    assert set(sft[0]) == {"input_ids", "labels", "source"}
    reward = prepare.tokenized_rows(cfg, tok, "reward", "train")
    assert set(reward[0]) == {"chosen_ids", "rejected_ids", "chosen_prompt_len", "rejected_prompt_len", "margin",
                              "source"}
    rlhf = prepare.tokenized_rows(cfg, tok, "rlhf", "train")
    assert set(rlhf[0]) == {"prompt_ids", "messages", "reference", "extra", "source"}
    assert len(list((tmp_path / "home" / "tokenized").glob("*.json"))) == 3
    data = tmp_path / "p.jsonl"
    data.write_text((FIX / "preference.jsonl").read_text())
    copy_cfg = DataConfig(**{**cfg.__dict__, "paths": [str(data)]})
    copied = prepare.tokenized_rows(copy_cfg, tok, "reward", "train")

    def boom(*a, **k):
        raise AssertionError("cache miss: data was read again")

    monkeypatch.setattr(prepare, "load_records", boom)
    assert prepare.tokenized_rows(cfg, tok, "reward", "train") == reward
    assert prepare.tokenized_rows(copy_cfg, tok, "reward", "train") == copied
    with pytest.raises(AssertionError, match="cache miss"):  # other settings -> another key
        prepare.tokenized_rows(DataConfig(**{**cfg.__dict__, "max_length": 64}), tok, "reward", "train")
    with pytest.raises(AssertionError, match="cache miss"):  # same path, new content -> another key
        data.write_text(data.read_text() + json.dumps({"prompt": "new", "chosen": "a", "rejected": "b"}) + "\n")
        prepare.tokenized_rows(copy_cfg, tok, "reward", "train")


def test_length_batches_group_similar_lengths_and_cover_every_row_once() -> None:
    lengths = [5, 40, 7, 39, 6, 41, 8]
    batches = length_batches(lengths, 3)
    # longest first: [41, 40, 39], then [8, 7, 6], then [5]
    assert batches == [[5, 1, 3], [6, 2, 4], [0]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # padded tokens: sorted batches pad 41+40+39 -> 3x41 and 8+7+6 -> 3x8; data order would pad to 40/41/8
    assert sum(len(b) * max(lengths[i] for i in b) for b in batches) == 3 * 41 + 3 * 8 + 5
    assert length_batches([], 4) == []
