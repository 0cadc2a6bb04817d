"""Readers: every file format, schema detection, "file:line" sources and bad-input errors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from chatrl.config import DataConfig
from chatrl.data.clean import DataReport
from chatrl.data.prepare import read_examples
from chatrl.errors import ChatrlError

FIX = Path(__file__).parent / "fixtures" / "data"


def _read(path: Path | str, **kw):
    cfg = DataConfig(paths=[str(path)], **kw)
    report = DataReport()
    return read_examples(str(path), cfg, report), report


@pytest.mark.parametrize("name, schema, n", [
    ("preference.jsonl", "preference", 4),
    ("hh.jsonl", "hh", 3),
    ("chat.json", "chat", 3),
    ("alpaca.csv", "alpaca", 3),
    ("prompt_response.jsonl", "prompt_response", 2),
    ("prompts.jsonl", "prompt", 2),
])
def test_schema_detected_for_each_fixture(name, schema, n):
    ds, report = _read(FIX / name)
    assert ds.schema == schema
    assert len(ds.examples) == n == report.kept[str(FIX / name)]
    first_line = {"alpaca.csv": 2, "chat.json": 2}.get(name, 1)  # after the CSV header / the JSON "["
    assert ds.examples[0].source == f"{FIX / name}:{first_line}"


def test_json_array_sources_are_line_numbers():
    ds, _ = _read(FIX / "chat.json")
    text = (FIX / "chat.json").read_text().splitlines()
    for ex in ds.examples:
        line = int(ex.source.rsplit(":", 1)[1])
        assert text[line - 1].strip() == "{"  # each array item starts on the line we report


def test_json_object_with_rows_and_json_lines_in_dot_json(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("wrapped.json", "lines.json"):
        ds, _ = _read(tmp_path / name)
        assert [e.response for e in ds.examples] == ["b", "d"]


def test_gzip_parquet_and_saved_dataset_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (FIX / "preference.jsonl").read_text().splitlines()]
    flat = [dict(r, prompt=r["prompt"] if isinstance(r["prompt"], str) else "x",
                 chosen=r["chosen"] if isinstance(r["chosen"], str) else "y",
                 rejected=r["rejected"] if isinstance(r["rejected"], str) else "z",
                 margin=r.get("margin")) for r in rows]
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "p.parquet")
    Dataset.from_list(flat).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(flat[:3]), "test": Dataset.from_list(flat[3:])}).save_to_disk(
        str(tmp_path / "saved_dict"))
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(FIX / "preference.jsonl", folder / "a.jsonl")

    gz, _ = _read(tmp_path / "p.jsonl.gz")
    assert gz.schema == "preference" and len(gz.examples) == 4 and gz.examples[0].margin == 1.5
    par, _ = _read(tmp_path / "p.parquet")
    assert par.schema == "preference" and [e.response for e in par.examples][-1] == "Paris."
    assert par.examples[3].source.endswith("p.parquet:4")
    saved, _ = _read(tmp_path / "saved")
    assert len(saved.examples) == 4
    train, _ = _read(tmp_path / "saved_dict")  # DatasetDict: the train split by default
    assert len(train.examples) == 3
    test, _ = _read(f"{tmp_path / 'saved_dict'}#test")
    assert [e.response for e in test.examples] == ["Paris."]
    many, _ = _read(folder)
    assert len(many.examples) == 4


def test_csv_cells_with_message_lists(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "c.csv").write_text('messages\n"' + json.dumps(msgs).replace('"', '""') + '"\n')
    ds, _ = _read(tmp_path / "c.csv")
    assert ds.schema == "chat" and ds.examples[0].response == "hello"


def test_hub_name_offline_gives_clear_error():
    with pytest.raises(ChatrlError, match="save_to_disk"):
        _read("someone/not-a-local-dataset")


def test_missing_local_file():
    with pytest.raises(ChatrlError, match="not found"):
        _read("./nope/missing.jsonl")


# ----------------------------------------------------------------------------- bad input


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


GOOD = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("content, line, field, reason", [
    (GOOD + "\n{not json\n", 2, "malformed JSON", "bad_json"),
    (GOOD.encode() + b"\n" + b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n', 2, "UTF-8", "not_utf8"),
    (GOOD + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n", 2, "field 'rejected'", "missing_field"),
    (GOOD + "\n" + json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}) + "\n", 2, "field 'chosen'",
     "wrong_type"),
    (GOOD + "\n" + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n", 2, "field 'rejected'",
     "chosen_equals_rejected"),
    (GOOD + "\n" + json.dumps({"prompt": "q", "chosen": "  ", "rejected": "b"}) + "\n", 2, "field 'chosen'",
     "empty_reply"),
    (GOOD + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}) + "\n", 2,
     "field 'margin'", "wrong_type"),
    (GOOD + "\n[1, 2]\n", 2, "JSON object", "not_an_object"),
])
def test_bad_rows_error_or_skip(tmp_path, content, line, field, reason):
    path = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(ChatrlError) as err:
        _read(path)
    msg = str(err.value)
    assert f"{path}:{line}" in msg and field in msg
    assert "Accepted schemas" in msg and "prompt_response" in msg
    ds, report = _read(path, skip_bad_rows=True)
    assert len(ds.examples) == 1
    assert report.dropped[reason] == 1 and report.examples[reason] == [f"{path}:{line}"]


def test_wrong_message_role_names_the_field(tmp_path):
    path = _write(tmp_path, "chat.jsonl", json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ChatrlError, match=r"chat.jsonl:1: field 'messages\[0\].role'"):
        _read(path)


def test_empty_file_and_unknown_schema(tmp_path):
    empty = _write(tmp_path, "empty.jsonl", "")
    with pytest.raises(ChatrlError, match="empty.jsonl: the file is empty"):
        _read(empty)
    odd = _write(tmp_path, "odd.jsonl", json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ChatrlError, match=r"odd.jsonl:1: cannot recognise .*answer, question.*\n.*Accepted schemas"):
        _read(odd)


def test_everything_filtered_is_an_error(tmp_path):
    path = _write(tmp_path, "allbad.jsonl", "{oops\n{also bad\n")
    with pytest.raises(ChatrlError, match="no usable rows left") as err:
        _read(path, skip_bad_rows=True)
    assert "bad_json" in str(err.value)


def test_malformed_json_array_names_line(tmp_path):
    path = _write(tmp_path, "arr.json", '[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    with pytest.raises(ChatrlError, match=r"arr.json:3: malformed JSON"):
        _read(path)


def test_non_utf8_csv_names_line(tmp_path):
    path = _write(tmp_path, "x.csv", b"prompt\nfine\nbad \xff\n")
    with pytest.raises(ChatrlError, match=r"x.csv:3: .*not valid UTF-8"):
        _read(path)
