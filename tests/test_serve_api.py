"""The OpenAI-compatible server, driven by the official `openai` client over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from chatrl.serve.generation import ChatModel
from chatrl.serve.server import create_app, start_in_thread

KEY = "sk-test-key"
MODEL = "tiny-random"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: str):
    chat = ChatModel(tiny_model_dir, dtype="fp32")
    app = create_app(tiny_model_dir, api_key=KEY, chat=chat, model_name=MODEL, max_active=8)
    srv, thread, url = start_in_thread(app)
    yield url, chat
    srv.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _wait_idle(url: str, timeout: float = 20.0) -> dict:
    """Poll /health until no sequence is being decoded or waiting."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health").json()
        if (health["active"], health["queued"]) == (0, 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_plain_completion(client: openai.OpenAI, server):
    chat = server[1]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, seed=1, temperature=1.0)
    assert r.object == "chat.completion" and r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    assert r.usage.prompt_tokens == len(chat.render(HELLO))
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (5, r.usage.prompt_tokens + 5)
    again = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, seed=1, temperature=1.0)
    assert again.choices[0].message.content == r.choices[0].message.content  # seed -> same sample


def test_streamed_completion_matches_plain_one(client: openai.OpenAI):
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, seed=2)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, seed=2, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # tokens arrived one by one, not as one block
    assert "".join(pieces) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens

    with_usage = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in with_usage[:-1])


def test_n_stop_and_unknown_fields(client: openai.OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=2, seed=5,
                                       extra_body={"frequency_penalty": 0.5, "some_future_field": {"x": 1}})
    a, b = (c.message.content for c in r.choices)
    assert [c.index for c in r.choices] == [0, 1] and a != b
    assert r.usage.completion_tokens == 16
    stop = a[len(a) // 2:len(a) // 2 + 2]
    cut = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, seed=5, stop=[stop])
    assert cut.choices[0].message.content == a[:a.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_auth_is_required_except_for_health(server):
    url = server[0]
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for path in ("/v1/models", "/v1/chat/completions"):
        r = httpx.request("GET" if "models" in path else "POST", url + path, json={"messages": HELLO})
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    page = httpx.get(url + "/")  # the static page holds no data; its API calls send the key typed into it
    assert page.status_code == 200 and "<html" in page.text
    models = openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_the_pages_assets_are_served_without_the_key_and_nothing_else_is(server):
    url = server[0]
    loaded = re.findall(r'(?:src|href)="(static/[^"]+)"', httpx.get(url + "/").text)
    assert loaded == ["static/common.css", "static/vendor/marked.min.js", "static/vendor/purify.min.js",
                      "static/common.js"]
    for path in loaded:  # no Authorization header, like the page itself
        r = httpx.get(f"{url}/{path}")
        kind = "text/css" if path.endswith(".css") else "text/javascript"
        assert r.status_code == 200 and r.content and r.headers["content-type"].split(";")[0] == kind
    for path in ("static/index.html", "static/vendor/README.md", "static/%2e%2e/server.py", "vendor/marked.min.js"):
        assert httpx.get(f"{url}/{path}").status_code == 404, path


@pytest.mark.parametrize("bad, param", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": HELLO, "max_tokens": -1}, "max_tokens"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "n": 100}, "n"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
    ({"messages": []}, "messages"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
])
def test_validation_errors_are_4xx_openai_errors(client: openai.OpenAI, bad: dict, param: str):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, **bad)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param


def test_over_long_input_and_malformed_bodies(client: openai.OpenAI, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=2,
                                       messages=[{"role": "user", "content": "many words " * 1500}])
    assert err.value.body["code"] == "context_length_exceeded"
    headers = {"Authorization": f"Bearer {KEY}"}
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(server[0] + "/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(server[0] + "/v1/nothing-here", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_32_concurrent_streams_complete(server):
    url = server[0]

    async def one(client: openai.AsyncOpenAI, i: int) -> list:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request {i}"}], max_tokens=4, seed=i, stream=True)
        return [chunk async for chunk in stream]

    async def main() -> list[list]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert len({r[0].id for r in results}) == 32
    for chunks in results:
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assert finishes == ["length"]
        assert chunks[-1].usage.completion_tokens == 4
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert _wait_idle(url)["active"] == 0


def test_disconnected_clients_free_their_slots(server):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    # greedy decoding of this prompt settles into repeating "\n" and never samples EOS, so without the
    # disconnect the job would run all 1500 tokens (tens of seconds)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1500, "stream": True, "temperature": 0}
    # streaming: read a couple of chunks, then hang up (1500 tokens would take far longer than the wait below)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        it = r.iter_lines()  # keep a reference: a collected iterator closes the response (= disconnects)
        lines = [line for line in (next(it) for _ in range(6)) if line.startswith("data:")]
        assert json.loads(lines[0][5:])["choices"][0]["delta"]["role"] == "assistant"
        assert httpx.get(url + "/health").json()["active"] == 1
    assert _wait_idle(url, timeout=10)["active"] == 0
    # non-streaming: the client times out and closes the connection
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, headers=headers, timeout=1.0)
    assert _wait_idle(url, timeout=10)["active"] == 0


def test_queued_clients_that_leave_are_dropped(tiny_model_dir: str):
    """With one slot busy, requests wait in the queue; those whose clients leave never run."""
    app = create_app(tiny_model_dir, chat=ChatModel(tiny_model_dir, dtype="fp32"), max_active=1)
    srv, thread, url = start_in_thread(app)
    # greedy: runs to the window (~2000 tokens, a few seconds even with idle-spinning threads off)
    body = {"messages": HELLO, "max_tokens": 2000, "stream": True, "temperature": 0}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            it = r.iter_lines()
            assert next(it).startswith("data:")
            for stream in (False, True):
                with pytest.raises(httpx.ReadTimeout):
                    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": stream},
                                      timeout=0.3) as queued:
                        queued.read()
            health = httpx.get(url + "/health").json()
            assert health["active"] == 1 and health["queued"] <= 2
        health = _wait_idle(url, timeout=10)
        assert (health["active"], health["queued"]) == (0, 0)
    finally:
        srv.should_exit = True
        thread.join(15)
