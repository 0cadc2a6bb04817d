"""`chatrl serve` under hostile input, as a client sends it: real HTTP on one keep-alive connection.

Every malformed body must get a 4xx with OpenAI's error shape, never a 5xx, and must leave the server (and the
same connection) able to answer a normal request. A fixed list covers each kind of fault; a seeded generator
mutates valid requests at the JSON and at the byte level for the rest.
"""

from __future__ import annotations

import http.client
import json
import random
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from chatrl.serve.generation import ChatModel
from chatrl.serve.schemas import MAX_DEPTH
from chatrl.serve.server import MAX_BODY_BYTES, create_app, start_in_thread

KEY = "sk-fuzz"
WINDOW = 128  # a small window keeps every accepted request short on the tiny model
PATH = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
NORMAL = {"messages": HI, "max_tokens": 2, "seed": 0}
JSON_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir: str) -> Iterator[tuple[str, ChatModel]]:
    chat = ChatModel(tiny_model_dir, dtype="fp32", context_window=WINDOW)
    app = create_app(tiny_model_dir, api_key=KEY, chat=chat, model_name="tiny", default_max_tokens=4)
    srv, thread, url = start_in_thread(app)
    yield url, chat
    srv.should_exit = True
    thread.join(15)


@pytest.fixture()
def conn(server) -> Iterator[http.client.HTTPConnection]:
    host, port = server[0].removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    yield connection
    connection.close()


def post(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST on `conn`; asserts the server kept the connection open. Returns (status, parsed JSON or raw text)."""
    conn.request("POST", PATH, body=body, headers=headers or JSON_HEADERS)
    sock = conn.sock
    resp = conn.getresponse()
    raw = resp.read()
    assert not resp.will_close and conn.sock is sock, f"the server dropped the connection after {body[:80]!r}"
    is_json = resp.getheader("content-type", "").startswith("application/json")
    return resp.status, json.loads(raw) if is_json else raw.decode()


def assert_openai_error(status: int, body: Any, sent: bytes) -> None:
    assert 400 <= status < 500, f"{status} for {sent[:120]!r}: {body}"
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error"
    assert all(err[k] is None or isinstance(err[k], str) for k in ("param", "code"))


def assert_alive(conn: http.client.HTTPConnection) -> None:
    status, body = post(conn, json.dumps(NORMAL).encode())
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant", body


def _with(**fields: Any) -> bytes:
    return json.dumps({"messages": HI, "max_tokens": 2, **fields}).encode()


def _nested(depth: int, inner: str = "1", kind: str = "array") -> str:
    if kind == "array":
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


# --------------------------------------------------------------------------- the fixed list

# every value is of the wrong type or out of range for its field: 400 naming that field
WRONG_FIELDS: dict[str, list[Any]] = {
    "model": [1, 1.5, True, [], {}],
    "max_tokens": ["4", 1.5, True, [4], {}, 0, -1, -(10**30)],
    "max_completion_tokens": ["4", 2.0, False, 0, -5],
    "temperature": ["1", True, [1], {}, -0.1, 2.01, 1e308, -1e308],
    "top_p": ["1", True, [1], {}, 0, -1, 1.01],
    "n": ["1", 1.5, True, [1], {}, 0, -3, 9, 10**20],
    "stop": [1, True, [1], [None], {}, ["a"] * 5, "x" * 2000],
    "seed": ["1", 1.5, True, [1], {}, 2**64, -(2**63) - 1],
    "stream": ["yes", 1, 0, [], {}],
    "stream_options": ["x", 1, True, [], {"include_usage": "yes"}],
    "messages": ["hi", 1, True, {}, None, [], ["hi"], [1], [None], [[]]],
}

BAD_MESSAGES: list[Any] = [
    [{"content": "hi"}], [{"role": "user"}], [{}],
    [{"role": r, "content": "hi"} for r in ("tool", "function", "wizard", "", "USER")],
    [{"role": None, "content": "hi"}], [{"role": 1, "content": "hi"}], [{"role": ["user"], "content": "hi"}],
    [{"role": "user", "content": None}], [{"role": "user", "content": 1}], [{"role": "user", "content": {}}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"type": "text", "text": 1}]}],
    [{"role": "user", "content": ["hi"]}],
]

VALID_PREFIX = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'
RAW_BODIES: list[bytes] = [
    b"", b"   \n", b"null", b"true", b"123", b'"a string"', b"[]", b"{}", b'{"messages": null}',
    b"{not json", b"{'messages': []}", VALID_PREFIX, VALID_PREFIX + b", ", VALID_PREFIX + b"}}", VALID_PREFIX + b"} x",
    VALID_PREFIX[:17], b'{"messages": [{"role": "user", "content": "hi\n"}]}',  # raw control character in a string
    # NaN / Infinity literals (Python's json accepts them by default), and numbers past every range
    VALID_PREFIX + b', "temperature": NaN}', VALID_PREFIX + b', "top_p": Infinity}', VALID_PREFIX + b', "seed": -Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
    VALID_PREFIX + b', "temperature": 1e400}', VALID_PREFIX + b', "n": -0}',
    # invalid UTF-8: stray bytes, an overlong '/', an encoded surrogate, a truncated sequence; a JSON lone surrogate
    b"\xff\xfe", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}', b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    b'{"messages": [{"role": "user", "content": "\xe2\x82"}]}',
    b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff", "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1, "max_tokens": 2}',
]
for _depth in (MAX_DEPTH + 1, 1000, 5000, 100_000):
    for _kind in ("array", "object"):
        RAW_BODIES += [_nested(_depth, kind=_kind).encode(),
                       f'{{"messages": {_nested(_depth, kind=_kind)}}}'.encode(),
                       f'{{"messages": {json.dumps(HI)}, "extra": {_nested(_depth, kind=_kind)}}}'.encode(),
                       f'{{"messages": [{{"role": "user", "content": {_nested(_depth, kind=_kind)}}}]}}'.encode()]

FIXED: list[bytes] = (
    RAW_BODIES
    + [_with(**{field: v}) for field, values in WRONG_FIELDS.items() if field != "messages" for v in values]
    + [json.dumps({"messages": v}).encode() for v in WRONG_FIELDS["messages"] + BAD_MESSAGES]
    + [_with(stream=True, max_tokens=10**9), _with(stream=True, n=0), _with(stream=True, temperature=-1)]
    + [_with(messages=[{"role": "user", "content": "x" * 2_000_000}]),  # huge strings, within the body limit
       _with(messages=[{"role": "user", "content": "hi"}] * 50_000),
       _with(model="m" * 1_000_000, n=100)]
)


def test_every_fixed_malformed_body_is_a_4xx_on_a_live_connection(conn):
    for body in FIXED:
        status, answer = post(conn, body)
        assert_openai_error(status, answer, body)
        assert_alive(conn)


def test_wrong_field_values_name_the_field(conn):
    for field, values in WRONG_FIELDS.items():
        for value in values:
            body = _with(**{field: value}) if field != "messages" else json.dumps({"messages": value}).encode()
            status, answer = post(conn, body)
            assert status == 400 and (answer["error"]["param"] or "").startswith(field), (field, value, answer)


def test_nesting_is_refused_as_invalid_json_but_a_deep_enough_real_request_passes(conn):
    for kind in ("array", "object"):
        status, answer = post(conn, f'{{"messages": {json.dumps(HI)}, "x": {_nested(100_000, kind=kind)}}}'.encode())
        assert status == 400 and answer["error"]["code"] == "invalid_json" and "nested" in answer["error"]["message"]
    # unknown fields are ignored, however (moderately) nested: a JSON-schema tool definition must not be refused
    status, _ = post(conn, _with(tools=json.loads(_nested(MAX_DEPTH - 2, kind="object"))))
    assert status == 200


def test_wrong_content_types(conn):
    headers = {"Authorization": f"Bearer {KEY}"}
    for content_type, body in (("application/xml", b"<messages><m>hi</m></messages>"),
                               ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\nhi"),
                               ("application/x-www-form-urlencoded", b"messages=hi&max_tokens=2"),
                               ("text/plain; charset=latin-1", b"\xe9t\xe9")):
        status, answer = post(conn, body, {**headers, "Content-Type": content_type})
        assert_openai_error(status, answer, body)
    # curl -d sends a form content type with a JSON body: accepted on purpose, as before
    status, _ = post(conn, json.dumps(NORMAL).encode(), {**headers, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert_alive(conn)


def test_a_body_over_the_limit_is_413_without_reading_it(conn):
    conn.putrequest("POST", PATH)
    for name, value in {**JSON_HEADERS, "Content-Length": str(MAX_BODY_BYTES + 1)}.items():
        conn.putheader(name, value)
    conn.endheaders()  # announce 16 MiB + 1, send nothing: the answer must come from the header alone
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 413 and body["error"]["code"] == "request_too_large"


# --------------------------------------------------------------------------- seeded random bodies

def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(["int", "bigint", "float", "str", "unicode", "bool", "null", "list", "dict"][:7 if depth > 3 else 9])
    if kind == "int":
        return rng.choice([-1, 0, 1, 2, 3, 8, 9, 2**31, 2**63, -(2**63), 10**30])
    if kind == "bigint":
        return rng.choice([1, -1]) * 10 ** rng.randint(19, 400)
    if kind == "float":
        return rng.choice([0.0, -0.0, 0.5, 1.0, 2.5, -1.5, 1e-320, 1e308, float("nan"), float("inf"), float("-inf")])
    if kind == "str":
        return rng.choice(["", "user", "assistant", "system", "text", "x" * rng.randint(1, 5000), "\x00", "\n"])
    if kind == "unicode":
        return "".join(chr(rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randint(1, 20)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["role", "content", "type", "text", "a"]): _random_value(rng, depth + 1) for _ in range(3)}


FIELDS = list(WRONG_FIELDS) + ["unknown_field"]


def _mutate_json(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "seed": 1}
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        if action < 0.5:
            body[rng.choice(FIELDS)] = _random_value(rng)
        elif action < 0.7 and body:
            body.pop(rng.choice(list(body)))
        else:
            message = dict(role="user", content="Hi")
            message[rng.choice(["role", "content", "name"])] = _random_value(rng)
            if rng.random() < 0.3:
                message.pop(rng.choice(list(message)))
            body["messages"] = rng.choice([[message], [message] * rng.randint(2, 5), message])
    return body


def _mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    action = rng.randrange(5)
    if action == 0:
        return raw[:rng.randrange(len(raw))]  # truncated
    position = rng.randrange(len(raw) + 1)
    if action == 1:
        return raw[:position] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))) + raw[position:]
    if action == 2:
        return raw[:position] + rng.choice([b"[", b"{", b"]", b"}", b",", b":", b'"', b"\\"]) + raw[position:]
    if action == 3:
        return raw[:position] + _nested(rng.choice([70, 3000])).encode() + raw[position:]
    return raw


def random_bodies(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        raw = json.dumps(_mutate_json(rng)).encode()  # allow_nan: NaN / Infinity literals appear
        yield _mutate_bytes(rng, raw) if rng.random() < 0.5 else raw


@pytest.mark.parametrize("seed", [0, 1])
def test_random_malformed_bodies_never_5xx(conn, seed: int):
    statuses = []
    for i, body in enumerate(random_bodies(seed, 150)):
        status, answer = post(conn, body)
        statuses.append(status)
        if status >= 400:
            assert_openai_error(status, answer, body)
        else:  # a mutation that happens to be a valid request is answered normally (JSON or SSE)
            assert status == 200, (status, body[:200])
        if i % 25 == 0:
            assert_alive(conn)
    assert_alive(conn)
    assert statuses.count(400) > 100  # the generator really produced mostly invalid requests


# --------------------------------------------------------------------------- max_tokens and the window

@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_over_the_window_is_400_naming_the_numbers(client: openai.OpenAI, server, field: str,
                                                              stream: bool):
    prompt = len(server[1].render(HI))
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HI, stream=stream, **{field: 10**9})
    assert err.value.status_code == 400 and err.value.body["code"] == "context_length_exceeded"
    message = err.value.body["message"]
    assert f"maximum context length is {WINDOW} tokens" in message
    assert f"requested {prompt + 10**9} tokens ({prompt} in the messages, {10**9} in the completion)" in message


def test_max_tokens_that_exactly_fills_the_window_is_accepted(client: openai.OpenAI, server):
    room = WINDOW - len(server[1].render(HI))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=room + 1)
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=room, seed=3)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= WINDOW
    # without max_tokens the server's default (4) is clamped to the room left (2), never refused
    base = len(server[1].render([{"role": "user", "content": ""}]))
    long = next(m for k in range(WINDOW - base - 8, WINDOW - base)
                if WINDOW - len(server[1].render(m := [{"role": "user", "content": "word " * k}])) == 2)
    r = client.chat.completions.create(model="tiny", messages=long, seed=3)
    assert r.usage.completion_tokens <= 2 and r.usage.prompt_tokens == WINDOW - 2
