"""Schemas -> records per step, hh-rlhf transcripts, adapters and cleaning counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatrl.config import DataConfig
from chatrl.data.adapters import ADAPTERS
from chatrl.data.clean import DataReport, clean_text
from chatrl.data.prepare import load_records, read_examples
from chatrl.data.schemas import parse_row, parse_transcript
from chatrl.data.types import Conversation, PreferencePair, Prompt
from chatrl.errors import ChatrlError

FIX = Path(__file__).parent / "fixtures" / "data"


def _cfg(name: str, **kw) -> DataConfig:
    return DataConfig(paths=[str(FIX / name)], **kw)


def test_hh_multi_turn_transcript_split_into_messages():
    row = json.loads((FIX / "hh.jsonl").read_text().splitlines()[0])
    ex = parse_row("hh", row, "hh.jsonl:1")
    assert ex.messages == [
        {"role": "user", "content": "Hi, can you help me?"},
        {"role": "assistant", "content": "Sure, what do you need?"},
        {"role": "user", "content": "A recipe for tea."},
    ]
    assert ex.response == "Boil water, add the leaves, wait three minutes."
    assert ex.rejected == "No."


def test_hh_prompt_is_common_prefix_even_when_replies_share_a_start():
    # rejected "Why did the chicken" is a prefix of chosen: the cut must still fall at the last "Assistant:".
    row = json.loads((FIX / "hh.jsonl").read_text().splitlines()[2])
    ex = parse_row("hh", row, "hh.jsonl:3")
    assert ex.messages == [{"role": "user", "content": "Tell me a joke."}]
    assert (ex.response, ex.rejected) == ("Why did the chicken cross the road?", "Why did the chicken")


def test_parse_transcript_without_leading_newlines():
    assert parse_transcript("Human: a\n\nAssistant: b") == [{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]


def test_builtin_hh_sample_parses_and_counts_its_known_bad_rows():
    cfg = DataConfig()
    ds = read_examples(cfg.paths[0], cfg, report := DataReport())
    assert ds.schema == "hh" and report.read[cfg.paths[0]] == 1800
    # the sample has 4 pairs with an empty final reply and 2 whose transcripts diverge early
    assert report.dropped["empty_reply"] == 4 and report.dropped["bad_transcript"] == 2
    assert report.examples["empty_reply"][0].endswith("harmless-base-sample.jsonl:87")
    assert len(ds.examples) == 1800 - 6 - report.dropped["duplicate"]


def test_preference_rows_give_pairs_conversations_and_prompts():
    cfg = _cfg("preference.jsonl", split="1,1,1", eval_fraction=0.0)
    cfg_all = {step: DataConfig(**{**cfg.__dict__, "split": split})
               for step, split in (("sft", "1,0,0"), ("reward", "0,1,0"), ("rlhf", "0,0,1"))}
    pairs, _ = load_records(cfg_all["reward"], "reward", "train")
    assert all(isinstance(p, PreferencePair) for p in pairs) and len(pairs) == 4
    by_prompt = {p.prompt_messages[-1]["content"]: p for p in pairs}
    assert by_prompt["What is 2+2?"].margin == 1.5 and by_prompt["What is 2+2?"].chosen == "2+2 is 4."
    assert by_prompt["Name a colour."].prompt_messages[0] == {"role": "system", "content": "Be brief."}
    assert by_prompt["Say hi."].chosen == "Hi!"  # chosen given as a message list
    convs, _ = load_records(cfg_all["sft"], "sft", "train")
    assert all(isinstance(c, Conversation) for c in convs)
    capital = next(c for c in convs if c.messages[0]["content"] == "Capital of France?")
    assert capital.messages[-1] == {"role": "assistant", "content": "Paris."}
    prompts, _ = load_records(cfg_all["rlhf"], "rlhf", "train")
    capital_p = next(p for p in prompts if p.messages[-1]["content"] == "Capital of France?")
    assert isinstance(capital_p, Prompt) and capital_p.reference == "Paris."


def test_chat_rows_reference_is_last_assistant_reply_and_extra_columns_kept():
    prompts, _ = load_records(_cfg("chat.json", split="0,0,1", eval_fraction=0.0), "rlhf", "train")
    count = next(p for p in prompts if p.messages[0]["content"] == "Count to three.")
    assert count.reference == "1, 2, 3." and count.extra == {"topic": "numbers"}
    multi = next(p for p in prompts if p.messages[0]["role"] == "system")
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant", "user"]
    assert multi.reference == "Fine."
    open_q = next(p for p in prompts if p.reference is None)
    assert open_q.messages == [{"role": "user", "content": "Only a question, no answer yet"}]
    convs, _ = load_records(_cfg("chat.json", split="1,0,0", eval_fraction=0.0), "sft", "train")
    assert len(convs) == 2  # the row without a reply is usable for RLHF only


def test_alpaca_and_prompt_response_become_conversations():
    convs, _ = load_records(_cfg("alpaca.csv", split="1,0,0", eval_fraction=0.0), "sft", "train")
    contents = {c.messages[0]["content"]: c.messages[1]["content"] for c in convs}
    assert contents["Translate to French.\n\ncat"] == "chat"
    assert contents["Give a synonym of happy."] == "glad"
    convs, _ = load_records(_cfg("prompt_response.jsonl", split="1,0,0", eval_fraction=0.0), "sft", "train")
    assert sorted(c.messages[1]["content"] for c in convs) == ["Jupiter.", "Rayleigh scattering."]


def test_reward_step_on_data_without_pairs_names_pair_schemas():
    for name in ("chat.json", "prompts.jsonl"):
        with pytest.raises(ChatrlError, match="reward step needs preference pairs.*preference, hh"):
            load_records(_cfg(name, split="0,1,0"), "reward", "train")
    with pytest.raises(ChatrlError, match="prompt-only"):
        load_records(_cfg("prompts.jsonl", split="1,0,0"), "sft", "train")


def test_forced_schema_and_unknown_schema(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n")
    ds = read_examples(str(path), DataConfig(paths=[str(path)], schema="prompt"), DataReport())
    assert ds.schema == "prompt" and ds.examples[0].response is None and ds.examples[0].extra == {"response": "r"}
    with pytest.raises(ChatrlError, match="data.schema='bogus' is unknown"):
        read_examples(str(path), DataConfig(paths=[str(path)], schema="bogus"), DataReport())


def test_adapters_map_hub_columns(tmp_path):
    rows = {
        "openai/webgpt_comparisons": {"question": {"full_text": "Why?"}, "answer_0": "Because [1].",
                                      "answer_1": "Dunno", "score_0": 1.0, "score_1": -1.0},
        "stanfordnlp/SHP": {"history": "Best pizza?", "human_ref_A": "Napoli", "human_ref_B": "Any", "labels": 0},
        "yitingxie/rlhf-reward-datasets": {"prompt": "\n\nHuman: Hi\n\n", "chosen": "Assistant: Hello!",
                                           "rejected": "Assistant: Go away."},
        "Dahoas/rm-static": {"prompt": "\n\nHuman: Hi\n\nAssistant:", "response": "Hey", "chosen": " Hello!",
                             "rejected": " Go away."},
    }
    got = {}
    for name, row in rows.items():
        schema, adapt = ADAPTERS[name]
        got[name] = parse_row(schema, adapt(row), "x:1")
    assert (got["openai/webgpt_comparisons"].response, got["openai/webgpt_comparisons"].rejected) == \
        ("Because.", "Dunno")
    assert (got["stanfordnlp/SHP"].response, got["stanfordnlp/SHP"].rejected) == ("Any", "Napoli")
    for name in ("yitingxie/rlhf-reward-datasets", "Dahoas/rm-static"):
        assert got[name].messages == [{"role": "user", "content": "Hi"}]
        assert got[name].response.strip() == "Hello!"
    # a local copy can use an adapter by naming it in data.schema
    path = tmp_path / "shp.jsonl"
    path.write_text(json.dumps(rows["stanfordnlp/SHP"]) + "\n")
    ds = read_examples(str(path), DataConfig(paths=[str(path)], schema="stanfordnlp/SHP"), DataReport())
    assert ds.examples[0].response == "Any"


def test_cleaning_normalises_and_counts_drops(tmp_path):
    assert clean_text("  Cafe\u0301  \r\nline  \n\n\n\nend \n") == "Caf\u00e9\nline\n\nend"
    rows = [
        {"prompt": "Hello", "response": "Hi there  \n\n\n\nfriend"},
        {"prompt": "Hello", "response": "Hi there\n\nfriend"},  # duplicate once cleaned
        {"prompt": "   ", "response": "orphan reply"},  # empty prompt
        {"prompt": "Q", "response": ""},  # empty reply
        {"prompt": "Other", "response": "Fine"},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = DataReport()
    ds = read_examples(str(path), DataConfig(paths=[str(path)]), report)
    assert [e.response for e in ds.examples] == ["Hi there\n\nfriend", "Fine"]
    assert dict(report.dropped) == {"duplicate": 1, "empty": 2}
    assert report.examples["duplicate"] == [f"{path}:2"]
    assert report.examples["empty"] == [f"{path}:3", f"{path}:4"]
    limited = read_examples(str(path), DataConfig(paths=[str(path)], max_rows=1), DataReport())
    assert len(limited.examples) == 1
