"""Generation pieces: nucleus filter, stop strings, incremental detokenising, seeded decoding, chat history."""

from __future__ import annotations

import pytest
import torch

from chatrl.errors import ChatrlError
from chatrl.serve.chat import ChatSession, build_messages, trim_to_window
from chatrl.serve.generation import (
    ChatModel,
    IncrementalDetokenizer,
    SamplingSettings,
    StopMatcher,
    sample_token,
    top_p_filter,
)


@pytest.fixture(scope="module")
def chat(tiny_model_dir: str) -> ChatModel:
    return ChatModel(tiny_model_dir, dtype="fp32")


def test_top_p_filter_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    # sorted: .5 (mass before 0), .25 (.5), .15 (.75), .1 (.9); top_p=.7 keeps .5 and .25 -> 2/3, 1/3
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))
    assert torch.allclose(top_p_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_sample_token_greedy_and_nucleus():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert sample_token(logits, 0.0, 1.0) == 1
    gen = torch.Generator().manual_seed(0)
    # softmax(logits) = [.032, .644, .087, .237]: top_p=.6 keeps only token 1, whatever the draw
    assert {sample_token(logits, 1.0, 0.6, gen) for _ in range(20)} == {1}
    assert {sample_token(logits, 1.0, 0.85, gen) for _ in range(200)} == {1, 3}


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["END"])
    assert m.push("abcE") == ("abc", False)  # "E" might start "END"
    assert m.push("N") == ("", False)
    assert m.push("Dzz") == ("", True)
    m = StopMatcher(["END", "\n\n"])
    assert m.push("xE") == ("x", False)
    assert m.push("q\n") == ("Eq", False)
    assert m.push("\nrest") == ("", True)
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)


def test_incremental_detokenizer_matches_full_decode(chat: ChatModel):
    text = "héllo wörld 😀 你好 — naïve café, ok?\nnext line"
    ids = chat.tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(chat.tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == chat.tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert sum(1 for p in pieces if p) > 5  # and it did stream, not emit everything at the end


def _generate(chat: ChatModel, **kw) -> tuple[str, str | None, int]:
    settings = SamplingSettings(**{"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, **kw})
    dec = chat.start(chat.render([{"role": "user", "content": "Hello!"}]), settings)
    text = dec.run()
    return text, dec.finish_reason, dec.completion_tokens


def test_seeded_generation_is_reproducible_and_respects_budget(chat: ChatModel):
    a = _generate(chat, seed=7)
    assert a == _generate(chat, seed=7)
    assert a[1:] == ("length", 12)
    assert _generate(chat, seed=8)[0] != a[0]


def test_stop_string_cuts_the_answer(chat: ChatModel):
    full, _, _ = _generate(chat, seed=3, max_new_tokens=16)
    assert len(full) >= 10
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut, reason, _ = _generate(chat, seed=3, max_new_tokens=16, stop=[stop])
    assert (cut, reason) == (full[:full.find(stop)], "stop")


def test_eos_ends_with_stop_and_window_clamps_length(tiny_model_dir: str):
    chat = ChatModel(tiny_model_dir, dtype="fp32")
    prompt = chat.render([{"role": "user", "content": "Hello!"}])
    first = chat.start(prompt, SamplingSettings(max_new_tokens=1, temperature=0))
    first.run()
    chat.eos_ids.add(first.completion_ids[0])  # the greedy first token now counts as EOS
    dec = chat.start(prompt, SamplingSettings(max_new_tokens=5, temperature=0))
    assert (dec.run(), dec.finish_reason, dec.completion_tokens) == ("", "stop", 0)

    chat.context_window = len(prompt) + 3
    dec = chat.start(prompt, SamplingSettings(max_new_tokens=50, temperature=1.0, seed=0))
    dec.run()
    assert (dec.finish_reason, dec.completion_tokens) == ("length", 3)
    chat.context_window = len(prompt)
    with pytest.raises(ChatrlError, match="window"):
        chat.start(prompt, SamplingSettings())


def test_trim_to_window_drops_oldest_whole_turns():
    history = [{"role": r, "content": f"{r}{i // 2}"} for i, r in enumerate(["user", "assistant"] * 2 + ["user"])]
    count = lambda msgs: 10 * len(msgs)  # noqa: E731 - 10 tokens per message
    # system + 5 messages = 60 tokens; budget 45: drop turn 0 (2 messages) -> 40 tokens
    kept, dropped = trim_to_window("sys", history, count, 45)
    assert (kept, dropped) == (history[2:], 2)
    kept, dropped = trim_to_window("sys", history, count, 35)
    assert (kept, dropped) == (history[4:], 4)
    # the latest user message is never dropped, even if it alone is over budget
    assert trim_to_window(None, history, count, 5) == (history[4:], 4)
    assert build_messages("sys", history[4:]) == [{"role": "system", "content": "sys"}, history[4]]


def test_session_keeps_history_in_the_prompt(chat: ChatModel):
    session = ChatSession(chat, SamplingSettings(max_new_tokens=4, seed=0), system="Be nice.")
    streamed: list[str] = []
    s1 = session.reply("First question?", on_text=streamed.append)
    answer1 = session.history[1]["content"]
    assert "".join(streamed) == answer1 and s1["completion_tokens"] == 4
    s2 = session.reply("Second question?")
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    # turn 2's prompt = turn 1's prompt + turn 1's answer + the new user turn
    assert s2["prompt_tokens"] > s1["prompt_tokens"] + s1["completion_tokens"]
    rendered = chat.tokenizer.decode(chat.render(build_messages(session.system, session.history[:3])))
    assert "First question?" in rendered and answer1 in rendered and "Be nice." in rendered


def test_session_trims_old_turns_with_a_notice(tiny_model_dir: str):
    chat = ChatModel(tiny_model_dir, dtype="fp32")
    chat.context_window = 120
    session = ChatSession(chat, SamplingSettings(max_new_tokens=20, seed=0))
    notices: list[str] = []
    for i in range(6):
        stats = session.reply(f"question number {i} " + "word " * 15, on_notice=notices.append)
        assert stats["prompt_tokens"] <= 100  # window 120 minus room for a 20-token answer
    assert notices and "dropped" in notices[0]
    assert session.history[-2]["content"].startswith("question number 5")
    assert not any("question number 0" in m["content"] for m in session.history)
    with pytest.raises(ChatrlError, match="shorter"):
        session.reply("word " * 200)
    assert session.history[-1]["role"] == "assistant"  # the refused message was not kept
