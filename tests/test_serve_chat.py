"""`chatrl chat` driven through a pipe: one user turn per line, history carried into the next prompt."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

from chatrl.serve.chat import ChatSession, run_chat
from chatrl.serve.generation import ChatModel, SamplingSettings


def test_chat_through_a_pipe_keeps_context(tiny_model_dir: str, tmp_path):
    saved = tmp_path / "conversation.json"
    stdin = f"What is RLHF?\n\n/system You are terse.\nAnd PPO?\n/save {saved}\n/quit\nnever sent\n"
    proc = subprocess.run(
        [sys.executable, "-m", "chatrl", "chat", "--model", tiny_model_dir, "--dtype", "fp32",
         "--max-new-tokens", "5", "--seed", "0", "--verbose"],
        input=stdin, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    turns = [tuple(map(int, m)) for m in re.findall(r"\[turn \d+: prompt (\d+) tokens, answer (\d+) tokens",
                                                     proc.stderr)]
    assert len(turns) == 2  # the blank line, the commands and the line after /quit are not turns
    (p1, a1), (p2, a2) = turns
    assert a1 == a2 == 5
    # the second prompt holds the first question and answer (plus a new system prompt and question)
    assert p2 > p1 + a1
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "You are terse." and messages[1]["content"] == "What is RLHF?"
    assert messages[3]["content"] == "And PPO?"
    assert messages[2]["content"] in proc.stdout and messages[4]["content"] in proc.stdout
    assert "never sent" not in proc.stdout + proc.stderr


def test_run_chat_commands_in_process(tiny_model_dir: str):
    chat = ChatModel(tiny_model_dir, dtype="fp32")
    session = ChatSession(chat, SamplingSettings(max_new_tokens=3, seed=1))
    out, err = io.StringIO(), io.StringIO()
    run_chat(session, stdin=io.StringIO("hi\n/clear\nhello again\n/bogus\n"), out=out, err=err,
             interactive=False, verbose=True)
    assert "[conversation cleared]" in err.getvalue() and "/save FILE" in err.getvalue()  # /bogus shows help
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["hello again"]
    assert out.getvalue().count("\n") >= 2  # one line (at least) per answer
