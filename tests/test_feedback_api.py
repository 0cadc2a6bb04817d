"""`chatrl serve --db`: completions stored with ids, `POST /v1/feedback`, users and keys, hostile input, rate limit;
driven by the official `openai` client (and httpx for chatrl's own endpoints) against a real server subprocess."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import select

from chatrl.cli import main
from chatrl.feedback.db import Feedback, Message, open_db
from chatrl.serve.generation import ChatModel
from chatrl.serve.reload import model_version
from chatrl.serve.server import create_app, start_in_thread
from feedback_server import ServeProcess

MODEL = "tiny-random"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """A server whose database has no users: everyone is the local user."""
    tmp = tmp_path_factory.mktemp("open-server")
    server = ServeProcess(tmp / "chat.db", tmp)
    yield server, tmp / "chat.db"
    server.stop()


@pytest.fixture(scope="module")
def users_server(tmp_path_factory):
    """A server with users alice, bob, admin (admin) and rl; at most 30 requests a minute per key."""
    tmp = tmp_path_factory.mktemp("users-server")
    db = tmp / "chat.db"
    keys = {}
    for name in ("alice", "bob", "admin", "rl"):
        keys[name] = _add_user(db, name, admin=name == "admin")
    server = ServeProcess(db, tmp, "--rate-limit", "30")
    yield server, keys
    server.stop()


def _add_user(db: Path, name: str, admin: bool) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["users", "add", name, "--db", str(db), *(["--admin"] if admin else [])]) == 0
    return out.getvalue().strip()


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _feedback(url: str, body, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/v1/feedback", content=content, headers=headers, timeout=60)


def test_completions_are_stored_and_take_every_kind_of_feedback(open_server, tiny_model_dir: str):
    server, db_path = open_server
    assert "no users yet" in server.log() and "local user" in server.log()
    client = _client(server.url)
    two = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, n=2, seed=1, temperature=0.9)
    ids = two.model_extra["completion_ids"]
    assert ids == [two.id, f"{two.id}:1"] and two.model_extra["model_version"] == model_version(tiny_model_dir)
    prompt_id, conversation = two.model_extra["prompt_id"], two.model_extra["conversation_id"]
    # a regenerated reply in the same conversation answers the same stored prompt
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True,
                                                 extra_body={"conversation_id": conversation}))
    last = [c for c in chunks if c.model_extra.get("completion_ids")]
    assert len(last) == 1 and last[0].choices[0].finish_reason  # the ids ride on the final finish chunk
    assert last[0].model_extra["prompt_id"] == prompt_id and last[0].model_extra["completion_ids"] == [chunks[0].id]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    answers = [_feedback(server.url, body) for body in (
        {"completion_id": chunks[0].id, "rating": 1, "comment": "nice"},
        {"completion_id": ids[1], "rating": -1},
        {"prompt_id": prompt_id, "chosen_id": chunks[0].id, "rejected_id": ids[0]},
        {"completion_id": ids[1], "edited": "I am a tiny test model."},
    )]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert [a.json()["kind"] for a in answers] == ["rating", "rating", "pair", "edit"]

    db = open_db(db_path)  # what the server committed, read by another connection
    with db.session() as s:
        stored = {m.completion_id: m for m in s.scalars(select(Message).where(Message.completion_id.is_not(None)))}
        events = s.scalars(select(Feedback).order_by(Feedback.id)).all()
    assert stored[chunks[0].id].content == streamed and stored[ids[0]].content == two.choices[0].message.content
    assert json.loads(stored[ids[0]].sampling)["temperature"] == 0.9 and stored[ids[0]].model_name == MODEL
    assert stored[chunks[0].id].parent_id == stored[ids[0]].parent_id == int(prompt_id.removeprefix("msg-"))
    assert [(e.kind, e.rating) for e in events] == [("rating", 1), ("rating", -1), ("pair", None), ("edit", None)]
    assert events[3].edited == "I am a tiny test model." and events[0].comment == "nice"

    listed = httpx.get(server.url + "/v1/conversations").json()["data"]
    mine = next(c for c in listed if c["id"] == conversation)
    assert [m["role"] for m in mine["messages"]] == ["user", "assistant", "assistant", "assistant"]
    pairs = httpx.get(server.url + "/v1/feedback/export", params={"format": "pairs"}).text.splitlines()
    assert {json.loads(row)["chosen"] for row in pairs} >= {streamed, "I am a tiny test model."}


SQL = "x'); DROP TABLE feedback; --"
HTML = '<script>alert(1)</script><img src=x onerror="alert(2)">'


@pytest.mark.parametrize("case, status, code", [
    ("sql_comment", 200, None),
    ("html_comment", 200, None),
    ("megabyte_comment", 413, "request_too_large"),
    ("megabyte_edit", 413, "request_too_large"),
    ("sql_completion_id", 404, "not_found"),
    ("unknown_completion_id", 404, "not_found"),
    ("sql_prompt_id", 404, "not_found"),
    ("rating_2", 400, "invalid_value"),
    ("rating_string", 400, "invalid_value"),
    ("rating_bool", 400, "invalid_value"),
    ("rating_and_edit", 400, "invalid_value"),
    ("unknown_field", 400, "invalid_value"),
    ("long_id", 400, "invalid_value"),
    ("not_json", 400, "invalid_json"),
    ("deep_json", 400, "invalid_json"),
])
def test_hostile_feedback_is_stored_verbatim_or_refused(open_server, case: str, status: int, code: str | None):
    server, db_path = open_server
    reply = _client(server.url).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    cid = reply.id
    body = {
        "sql_comment": {"completion_id": cid, "rating": -1, "comment": SQL},
        "html_comment": {"completion_id": cid, "rating": 1, "comment": HTML},
        "megabyte_comment": {"completion_id": cid, "rating": 1, "comment": "a" * 2**20},
        "megabyte_edit": {"completion_id": cid, "edited": "é" * 2**20},
        "sql_completion_id": {"completion_id": "' OR '1'='1", "rating": 1},
        "unknown_completion_id": {"completion_id": "chatcmpl-000000000000000000000000", "rating": 1},
        "sql_prompt_id": {"prompt_id": "msg-1; DELETE FROM messages", "chosen_id": cid, "rejected_id": cid},
        "rating_2": {"completion_id": cid, "rating": 2},
        "rating_string": {"completion_id": cid, "rating": "1"},
        "rating_bool": {"completion_id": cid, "rating": True},
        "rating_and_edit": {"completion_id": cid, "rating": 1, "edited": "x"},
        "unknown_field": {"completion_id": cid, "rating": 1, "admin": True},
        "long_id": {"completion_id": "c" * 5000, "rating": 1},
        "not_json": b"{'completion_id': 1",
        "deep_json": ("[" * 100_000 + "]" * 100_000).encode(),
    }[case]
    answer = _feedback(server.url, body)
    assert answer.status_code == status, answer.text[:500]
    if status != 200:
        error = answer.json()["error"]
        assert error["code"] == code and {"message", "type", "code"} <= set(error)
        return
    with open_db(db_path).session() as s:  # stored as sent, and the tables it names are all still there
        stored = s.scalar(select(Feedback).where(Feedback.id == int(answer.json()["id"].removeprefix("fb-"))))
        assert stored.comment == body["comment"] and s.scalar(select(Message).limit(1)) is not None


def test_a_conversation_id_must_be_yours(open_server):
    client = _client(open_server[0].url)
    for bad in ("conv-999999", "conv-1 OR 1=1", "1; DROP TABLE users"):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                           extra_body={"conversation_id": bad})
        assert err.value.body["code"] == "not_found"


def test_users_need_their_keys_and_see_their_own_conversations(users_server):
    server, keys = users_server
    assert "API keys of its users required" in server.log()
    for key in (None, "sk-chatrl-wrong"):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                       headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401 and set(r.json()["error"]) >= {"message", "type", "code"}
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(server.url, "sk-chatrl-wrong").models.list()
    alice, bob = _client(server.url, keys["alice"]), _client(server.url, keys["bob"])
    a = alice.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "alice here"}], max_tokens=3)
    b = bob.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "bob here"}], max_tokens=3)
    stolen = _feedback(server.url, {"completion_id": a.id, "rating": -1}, keys["bob"])
    assert stolen.status_code == 404  # bob cannot rate (or learn about) alice's reply
    assert _feedback(server.url, {"completion_id": a.id, "rating": 1}, keys["alice"]).status_code == 200
    assert _feedback(server.url, {"completion_id": b.id, "rating": -1}, keys["bob"]).status_code == 200

    def conversations(name: str, **params) -> httpx.Response:
        return httpx.get(server.url + "/v1/conversations", params=params,
                         headers={"Authorization": f"Bearer {keys[name]}"})

    assert {c["user"] for c in conversations("alice").json()["data"]} == {"alice"}
    assert conversations("alice", all="true").status_code == 403
    assert {c["user"] for c in conversations("admin", all="true").json()["data"]} == {"alice", "bob"}
    exported = httpx.get(server.url + "/v1/feedback/export", params={"format": "kto"},
                         headers={"Authorization": f"Bearer {keys['bob']}"}).text.splitlines()
    assert [json.loads(row)["label"] for row in exported] == [False]  # bob's rating only


def test_rate_limit_is_per_key(users_server):
    server, keys = users_server
    codes = [httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {keys['rl']}"}).status_code
             for _ in range(31)]
    assert codes == [200] * 30 + [429]
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {keys['rl']}"})
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {keys['admin']}"}).is_success


def test_a_reply_that_cannot_be_stored_is_an_error_not_a_silent_loss(tmp_path, tiny_model_dir: str):
    chat = ChatModel(tiny_model_dir, dtype="fp32")
    app = create_app(tiny_model_dir, chat=chat, model_name=MODEL, db=str(tmp_path / "chat.db"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    app.state.recorder.store.record_completion = broken
    srv, thread, url = start_in_thread(app)
    try:
        client = _client(url)
        with pytest.raises(openai.APIError, match="could not be stored: disk full"):
            list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True))
        with pytest.raises(openai.InternalServerError, match="disk full"):
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    finally:
        srv.should_exit = True
        thread.join(15)


def test_hostile_query_parameters_are_4xx(open_server):
    url = open_server[0].url
    answers = [
        httpx.get(url + "/v1/conversations", params={"limit": "1; DROP TABLE users"}),
        httpx.get(url + "/v1/conversations", params={"all": "maybe"}),
        httpx.get(url + "/v1/feedback/export", params={"format": "<script>alert(1)</script>"}),
        httpx.post(url + "/admin/reload", json={"model": 5}),
        httpx.post(url + "/admin/reload", json=["not", "an", "object"]),
    ]
    assert [a.status_code for a in answers] == [400] * 5, [a.text for a in answers]
    assert all(set(a.json()["error"]) >= {"message", "type", "code"} for a in answers)
    assert httpx.get(url + "/v1/conversations", params={"limit": 1}).json()["data"] is not None
