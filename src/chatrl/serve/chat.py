"""`chatrl chat`: multi-turn chat in the terminal, streaming tokens as they are generated.

The history is re-rendered through the model's chat template every turn; when it no longer fits
the context window (leaving room for the answer), the oldest turns are dropped with a notice.
Piped stdin works too: each line is one user turn, and answers are printed one per turn.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from chatrl.errors import ChatrlError
from chatrl.serve.generation import ChatModel, Message, SamplingSettings

HELP = """commands:
  /clear         forget the conversation (keeps the system prompt)
  /system TEXT   set the system prompt (empty TEXT: back to the model's default)
  /save FILE     write the conversation as JSON (OpenAI messages)
  /quit          leave (also Ctrl-D)"""


def build_messages(system: str | None, history: list[Message]) -> list[Message]:
    """The messages sent to the chat template: the optional system prompt, then the turns."""
    return ([{"role": "system", "content": system}] if system else []) + list(history)


def trim_to_window(system: str | None, history: list[Message], count_tokens: Callable[[list[Message]], int],
                   budget: int) -> tuple[list[Message], int]:
    """Drop the oldest whole turns (a user message and the replies after it) until the prompt fits `budget`.

    The latest user message is never dropped. Returns (kept history, number of messages dropped);
    the result may still be over budget when the latest message alone is too long.
    """
    kept = list(history)
    dropped = 0
    while count_tokens(build_messages(system, kept)) > budget:
        # the next turn starts at the second user message; everything before it is the oldest turn
        starts = [i for i, m in enumerate(kept) if m["role"] == "user"]
        if len(starts) < 2:
            break
        dropped += starts[1]
        kept = kept[starts[1]:]
    return kept, dropped


@dataclass
class ChatSession:
    """A conversation with one model: `reply(text)` adds a user turn and streams the answer."""

    chat: ChatModel
    settings: SamplingSettings
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    turns: int = 0

    def prompt_budget(self) -> int:
        """Tokens the prompt may use: the window minus room for the answer (at least half the window)."""
        window = self.chat.context_window
        return max(window // 2, window - self.settings.max_new_tokens)

    def fit(self) -> tuple[list[int], int]:
        """Trim the history to the window; returns (prompt token ids, messages dropped)."""
        kept, dropped = trim_to_window(self.system, self.history, lambda m: len(self.chat.render(m)),
                                       self.prompt_budget())
        self.history = kept
        return self.chat.render(build_messages(self.system, kept)), dropped

    def reply(self, text: str, on_text: Callable[[str], None] = lambda s: None,
              on_notice: Callable[[str], None] = lambda s: None) -> dict[str, object]:
        """Add a user turn, generate the answer (streamed to `on_text`), keep it in the history.

        Returns stats: prompt_tokens, completion_tokens, finish_reason, dropped (messages trimmed).
        Ctrl-C stops the answer early; what was generated so far is kept.
        """
        user = {"role": "user", "content": text}
        alone = len(self.chat.render(build_messages(self.system, [user])))
        if alone >= self.chat.context_window:  # refuse before trimming, so the history survives
            raise ChatrlError(f"this message makes a {alone}-token prompt, over the model's "
                              f"{self.chat.context_window}-token window: send a shorter one")
        self.history.append(user)
        prompt_ids, dropped = self.fit()
        if dropped:
            on_notice(f"[context: dropped the {dropped} oldest message(s) to fit the model's "
                      f"{self.chat.context_window}-token window]")
        seed = None if self.settings.seed is None else self.settings.seed + self.turns
        settings = SamplingSettings(self.settings.max_new_tokens, self.settings.temperature, self.settings.top_p,
                                    list(self.settings.stop), seed)
        decoding = self.chat.start(prompt_ids, settings)
        parts: list[str] = []
        try:
            while decoding.finish_reason is None:
                piece = decoding.step()
                if piece:
                    parts.append(piece)
                    on_text(piece)
        except KeyboardInterrupt:
            decoding.finish_reason = "interrupted"
        self.history.append({"role": "assistant", "content": "".join(parts)})
        self.turns += 1
        return {"prompt_tokens": decoding.prompt_tokens, "completion_tokens": decoding.completion_tokens,
                "finish_reason": decoding.finish_reason, "dropped": dropped}

    def clear(self) -> None:
        self.history = []

    def save(self, path: str) -> Path:
        out = Path(path).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": self.chat.path, "messages": build_messages(self.system, self.history)},
                                  ensure_ascii=False, indent=2) + "\n")
        return out


def _command(session: ChatSession, line: str, err: TextIO) -> bool:
    """Handle a /command; returns False when the user wants to quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/clear":
        session.clear()
        print("[conversation cleared]", file=err)
    elif name == "/system":
        session.system = arg or None
        print(f"[system prompt: {arg!r}]" if arg else "[system prompt: the model's default]", file=err)
    elif name == "/save":
        if not arg:
            print("[usage: /save FILE]", file=err)
        else:
            try:
                print(f"[saved {len(session.history)} messages to {session.save(arg)}]", file=err)
            except OSError as e:
                print(f"[could not save to {arg}: {e}]", file=err)
    else:
        print(HELP, file=err)
    return True


def _lines(stream: TextIO, interactive: bool) -> Iterable[str]:
    """User input: `input()` with a prompt on a terminal (readline editing), plain lines from a pipe."""
    if not interactive:
        yield from (line.rstrip("\n") for line in stream)
        return
    try:
        import readline  # noqa: F401 - enables line editing and history for input()
    except ImportError:
        pass
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print(file=sys.stdout)
            return


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr, interactive: bool | None = None, verbose: bool = False) -> int:
    """The read-reply loop: one user turn per input line, until /quit or end of input."""
    interactive = stdin.isatty() if interactive is None else interactive
    if interactive:
        print(f"chatrl chat with {session.chat.path} ({session.chat.context_window}-token window). /help for "
              f"commands.", file=err)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    for line in _lines(stdin, interactive):
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(session, text, err):
                break
            continue
        if interactive:
            write("bot> ")
        try:
            stats = session.reply(text, on_text=write, on_notice=lambda s: print(s, file=err, flush=True))
        except ChatrlError as e:
            print(f"[{e}]", file=err, flush=True)
            continue
        write("\n")
        if stats["finish_reason"] == "interrupted":
            print("[interrupted]", file=err, flush=True)
        if verbose:
            print(f"[turn {session.turns}: prompt {stats['prompt_tokens']} tokens, answer "
                  f"{stats['completion_tokens']} tokens, finish {stats['finish_reason']}, history "
                  f"{len(session.history)} messages]", file=err, flush=True)
    return 0
