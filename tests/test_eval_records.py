"""The minimal evaluation JSONL reader: prompt rows, hh-rlhf pairs, and error messages."""

from __future__ import annotations

import json

import pytest

from chatrl.data.types import Conversation, PreferencePair, Prompt
from chatrl.errors import ChatrlError
from chatrl.eval.records import as_prompts, parse_hh_dialogue, read_records


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_prompt_forms(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "hello?", "reference": "hi"},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]},
        {"prompt": "q2", "response": "a2"},
        "",
    ])
    recs = read_records(f)
    assert isinstance(recs[0], Prompt) and recs[0].messages == [{"role": "user", "content": "hello?"}]
    assert recs[0].reference == "hi" and recs[0].source.endswith("p.jsonl:1")
    assert recs[1].messages[0]["role"] == "system" and recs[1].reference is None
    assert isinstance(recs[2], Conversation)
    prompts = as_prompts(recs)
    assert prompts[2].messages == [{"role": "user", "content": "q2"}] and prompts[2].reference == "a2"
    assert len(read_records(f, limit=2)) == 2


def test_hh_pair_splits_at_last_shared_assistant_turn(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken..."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."
    f = _write(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    (pair,) = read_records(f)
    assert isinstance(pair, PreferencePair)
    assert pair.prompt_messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": "Tell me a joke"}]
    assert pair.chosen == "Why did the chicken..." and pair.rejected == "No."
    (prompt,) = as_prompts([pair])
    assert prompt.reference == "Why did the chicken..."


def test_hh_replies_sharing_a_prefix(tmp_path):
    # replies that start alike must still be cut at the final "Assistant:" marker
    chosen = "\n\nHuman: q\n\nAssistant: I think yes"
    rejected = "\n\nHuman: q\n\nAssistant: I think no"
    (pair,) = read_records(_write(tmp_path / "hh-prefix.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert (pair.chosen, pair.rejected) == ("I think yes", "I think no")
    assert parse_hh_dialogue("Human: a\n\nAssistant:") == [{"role": "user", "content": "a"}]


def test_real_hh_sample_parses(repo_root):
    recs = read_records(repo_root / "data" / "hh-rlhf-harmless" / "harmless-base-sample.jsonl", limit=20)
    assert len(recs) == 20 and all(isinstance(r, PreferencePair) for r in recs)
    assert all(r.prompt_messages[-1]["role"] == "user" for r in recs)


def test_errors_name_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "{not json"])
    with pytest.raises(ChatrlError, match=r"bad.jsonl:2"):
        read_records(f)
    f = _write(tmp_path / "bad2.jsonl", [{"question": "x"}])
    with pytest.raises(ChatrlError, match=r"bad2.jsonl:1: unknown record"):
        read_records(f)
    with pytest.raises(ChatrlError, match="not found"):
        read_records(tmp_path / "missing.jsonl")


def test_skip_bad_rows_counts_and_names_the_first(tmp_path):
    f = _write(tmp_path / "mixed.jsonl", [{"prompt": "a"}, "{not json", {"question": "x"}, {"prompt": "b"}])
    messages: list[str] = []
    recs = read_records(f, skip_bad=True, log=messages.append)
    assert [r.messages[-1]["content"] for r in recs] == ["a", "b"]
    assert len(messages) == 1 and "skipped 2 bad line(s)" in messages[0] and "mixed.jsonl:2" in messages[0]
    with pytest.raises(ChatrlError, match=r"mixed.jsonl:2"):  # the default still stops at the first bad line
        read_records(f)


def test_shipped_sample_with_its_bad_rows_reads_with_skip(repo_root):
    path = repo_root / "data" / "hh-rlhf-harmless" / "harmless-base-sample.jsonl"
    with pytest.raises(ChatrlError, match=r"harmless-base-sample.jsonl:\d+"):
        read_records(path)
    messages: list[str] = []
    recs = read_records(path, skip_bad=True, log=messages.append)
    total = sum(1 for line in path.open(encoding="utf-8") if line.strip())
    assert len(recs) + int(messages[0].split("skipped ")[1].split(" ")[0]) == total
