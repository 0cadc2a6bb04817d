"""KTO's data: the `kto` schema ({prompt, completion, label}, TRL's unpaired format), pairs split into two labelled
rows, undesirable replies kept out of SFT, the mismatched KL rows and the collated batch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chatrl.cli import main
from chatrl.config import DataConfig
from chatrl.data.prepare import load_records, tokenized_rows
from chatrl.data.schemas import detect_row
from chatrl.data.tokenize import collate_unpaired, with_mismatched
from chatrl.data.types import LabeledCompletion
from chatrl.errors import ChatrlError
from chatrl.models.loading import load_tokenizer

ROWS = [  # what `chatrl feedback export --format kto` writes, plus a string prompt and a CSV-style label
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "completion": "Paris.", "label": True},
    {"prompt": [{"role": "user", "content": "Capital of France?"}], "completion": "Lyon, I think.", "label": False},
    {"prompt": "Say hi.", "completion": [{"role": "assistant", "content": "Hi!"}], "label": "true"},
    {"prompt": "Name a colour.", "completion": "No.", "label": False, "rating_id": 7},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(path: Path, split: str = "0,1,0") -> DataConfig:
    return DataConfig(paths=[str(path)], split=split, eval_fraction=0.0)


def test_kto_rows_are_recognised_and_parsed(tmp_path: Path) -> None:
    assert detect_row({"prompt", "completion", "label"}) == "kto"
    assert detect_row({"prompt", "completion"}) == "prompt_response"  # no label: an SFT row as before
    recs, report = load_records(_cfg(_write(tmp_path / "fb.jsonl", ROWS)), "kto", "train")
    assert report.schemas == {str(tmp_path / "fb.jsonl"): "kto"}
    assert all(isinstance(r, LabeledCompletion) for r in recs)
    by_reply = {r.completion: r for r in recs}
    assert set(by_reply) == {"Paris.", "Lyon, I think.", "Hi!", "No."}
    assert [by_reply[k].desirable for k in ("Paris.", "Lyon, I think.", "Hi!", "No.")] == [True, False, True, False]
    assert by_reply["Paris."].prompt_messages[0] == {"role": "system", "content": "Be brief."}
    assert by_reply["Hi!"].prompt_messages == [{"role": "user", "content": "Say hi."}]


def test_undesirable_replies_are_not_sft_targets_or_references(tmp_path: Path) -> None:
    path = _write(tmp_path / "fb.jsonl", ROWS)
    convs, _ = load_records(_cfg(path, "1,0,0"), "sft", "train")
    assert sorted(c.messages[-1]["content"] for c in convs) == ["Hi!", "Paris."]
    prompts, _ = load_records(_cfg(path, "0,0,1"), "rlhf", "train")
    assert sorted(str(p.reference) for p in prompts) == ["Hi!", "None", "None", "Paris."]


def test_pairs_split_into_a_desirable_and_an_undesirable_row(tmp_path: Path) -> None:
    pairs = [{"prompt": f"Question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    recs, _ = load_records(_cfg(_write(tmp_path / "pairs.jsonl", pairs)), "kto", "train")
    got = sorted((r.prompt_messages[-1]["content"], r.completion, r.desirable) for r in recs)
    assert got == sorted([(f"Question {i}?", f"good {i}", True) for i in range(3)]
                         + [(f"Question {i}?", f"bad {i}", False) for i in range(3)])


def test_bad_rows_name_file_line_and_field(tmp_path: Path) -> None:
    for i, (bad, field) in enumerate(((dict(ROWS[0], label="yes"), "label"), (dict(ROWS[0], label=1.0), "label"),
                                      (dict(ROWS[0], completion=""), "completion"))):
        path = _write(tmp_path / f"bad{i}.jsonl", [ROWS[1], bad])
        with pytest.raises(ChatrlError) as err:
            load_records(_cfg(path), "kto", "train")
        first = str(err.value).splitlines()[0]
        assert first.startswith(f"{path}:2: field '{field}'") and "schema 'kto'" in first
    with pytest.raises(ChatrlError, match="KTO needs labelled replies"):
        load_records(_cfg(_write(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "r"}])), "kto", "train")


def _row(prompt: list[int], reply: list[int], desirable: bool = True) -> dict:
    return {"input_ids": prompt + reply, "prompt_len": len(prompt), "desirable": desirable}


def test_mismatched_rows_take_the_nearest_other_prompts_completion() -> None:
    # prompts A, A, B, C (a pair split in two puts A twice in a row); replies 10, 11, 12, 13
    rows = [_row([1, 2], [10]), _row([1, 2], [11], False), _row([3], [12, 12]), _row([4, 4, 4], [13])]
    kl = [(r["kl_ids"], r["kl_prompt_len"]) for r in with_mismatched(rows, max_length=64)]
    assert kl == [([1, 2, 13], 2),      # row 0: row -1 (cyclic) is C
                  ([1, 2, 13], 2),      # row 1: row 0 has the same prompt A, so row -1 again
                  ([3, 11], 1),         # row 2: row 1 (prompt A)
                  ([4, 4, 4, 12, 12], 3)]
    same = with_mismatched([_row([1], [10]), _row([1], [11])], max_length=64)
    assert [r["kl_ids"] for r in same] == [[1, 11], [1, 10]]  # one prompt only: the previous row's reply
    assert with_mismatched(rows, max_length=4)[3]["kl_ids"] == [4, 4, 4, 12]  # cut to max_length


def test_collated_batch_holds_examples_then_kl_rows() -> None:
    rows = with_mismatched([_row([1, 2], [10, 10, 10]), _row([3], [12], False)], max_length=64)
    rows = [{**r, "ref_logps": [-1.0 - i, -5.0 - i]} for i, r in enumerate(rows)]
    b = collate_unpaired(rows, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 10, 10, 10], [3, 12, 0, 0, 0], [1, 2, 12, 0, 0], [3, 10, 10, 10, 0]]
    assert b.reply_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0]]
    assert b.desirable.tolist() == [True, False] and b.ref_logps.tolist() == [-1.0, -2.0, -5.0, -6.0]
    kl = b.half(second=True)
    assert kl.input_ids.tolist() == [[1, 2, 12, 0], [3, 10, 10, 10]]  # cut to its own longest row
    assert kl.ref_logps.tolist() == [-5.0, -6.0]


def test_tokenized_kto_rows_mark_the_prompt(tmp_path: Path, tiny_model_dir) -> None:
    tok = load_tokenizer("tiny-random")
    cfg = DataConfig(paths=[str(_write(tmp_path / "fb.jsonl", ROWS))], split="0,1,0", eval_fraction=0.0,
                     max_length=128, max_prompt_length=96)
    rows = tokenized_rows(cfg, tok, "kto", "train")
    paris = next(r for r in rows if tok.decode(r["input_ids"][r["prompt_len"]:]).startswith("Paris."))
    assert paris["desirable"] is True
    assert tok.decode(paris["input_ids"][:paris["prompt_len"]]).rstrip().endswith("assistant")


def test_data_inspect_shows_the_class_balance(tmp_path: Path, tiny_model_dir, capsys) -> None:
    assert main(["data", "inspect", str(_write(tmp_path / "fb.jsonl", ROWS)), "--tokenizer", tiny_model_dir]) == 0
    out = capsys.readouterr().out
    assert re.search(r"│ kto\s+│ 4\s+│ 4\s+│ 0\s+│ 4\s+│ 0\s+│ 2\s+│ 2\s+│", out), out
