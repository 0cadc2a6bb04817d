"""A fake OpenAI-compatible judge for the tests: /v1/chat/completions on a loopback port, in a thread, answering
what the test's `answer(text)` returns; it records every request it receives (time, text, headers)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Hang:
    """Answer nothing for `seconds` (the client times out first)."""

    seconds: float = 5.0


@dataclass
class Status:
    """Answer an HTTP error with this status and body."""

    code: int
    body: str = '{"error": {"message": "the judge is down"}}'


Answer = str | Hang | Status


@dataclass
class Request:
    time: float
    text: str
    headers: dict[str, str]


class FakeJudge:
    """`with FakeJudge(answer) as judge:` serves on judge.url (…/v1) until the block ends."""

    def __init__(self, answer: Callable[[str], Answer], delay: float = 0.0) -> None:
        self.answer, self.delay = answer, delay
        self.requests: list[Request] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True  # a hanging handler must not hold up the test's exit
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeJudge:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def texts(self) -> list[str]:
        return [r.text for r in self.requests]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                with judge._lock:
                    judge.requests.append(Request(time.monotonic(), text, dict(self.headers)))
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    time.sleep(judge.delay)
                    self._send(judge.answer(text), body.get("model", ""))
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                finally:
                    with judge._lock:
                        judge.in_flight -= 1

            def _send(self, answer: Answer, model: str) -> None:
                if isinstance(answer, Hang):
                    time.sleep(answer.seconds)
                    return
                code, payload = (answer.code, answer.body) if isinstance(answer, Status) else (200, json.dumps({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))
                data = payload.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
