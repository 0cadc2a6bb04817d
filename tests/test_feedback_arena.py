"""The arena (`chatrl serve --model a=PATH --model b=PATH --arena --db`): POST /v1/arena gives two anonymous replies
of two different models to one prompt, the choice is a pair event naming which model version won; the page does the
same in real headless Chromium; the CLI refuses arena options that cannot work."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from browser_page import open_page
from chatrl.feedback.db import Feedback, Message, open_db
from chatrl.feedback.leaderboard import comparisons
from chatrl.serve.generation import ChatModel
from chatrl.serve.reload import model_version
from chatrl.serve.server import create_app, start_in_thread
from helpers import run_cli
from test_serve_reload import _other_weights


@pytest.fixture(scope="module")
def arena_server(tmp_path_factory, tiny_model_dir: str):
    tmp = tmp_path_factory.mktemp("arena")
    other = _other_weights(tiny_model_dir, tmp / "other")
    app = create_app(tiny_model_dir, dtype="fp32", model_name="old", default_max_tokens=6, db=str(tmp / "chat.db"),
                     arena={"new": ChatModel(str(other), dtype="fp32")})
    srv, thread, url = start_in_thread(app)
    yield url, tmp / "chat.db", {"old": model_version(tiny_model_dir), "new": model_version(other)}
    srv.should_exit = True
    thread.join(15)


def _pair(url: str, text: str) -> dict:
    resp = httpx.post(url + "/v1/arena", json={"messages": [{"role": "user", "content": text}], "temperature": 0},
                      timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_arena_api_two_anonymous_replies_then_the_choice_names_the_winner(arena_server):
    url, db_path, versions = arena_server
    assert httpx.get(url + "/health").json()["arena"] is True
    body = _pair(url, "Which is better?")
    assert body["object"] == "arena" and len(body["completions"]) == 2
    assert "model" not in str(body["completions"])  # anonymous until the choice
    first, second = (c["completion_id"] for c in body["completions"])
    resp = httpx.post(url + "/v1/feedback", json={"prompt_id": body["prompt_id"], "chosen_id": second,
                                                  "rejected_id": first})
    assert resp.status_code == 200, resp.text
    revealed = {m["completion_id"]: (m["model"], m["model_version"]) for m in resp.json()["models"]}
    assert {revealed[first][0], revealed[second][0]} == {"old", "new"}
    winner_name, winner_version = revealed[second]
    assert versions[winner_name] == winner_version

    db = open_db(db_path)
    with db.session() as s:
        event = s.scalars(select(Feedback).where(Feedback.kind == "pair")).one()
        chosen, rejected = s.get(Message, event.chosen_id), s.get(Message, event.rejected_id)
        assert chosen.parent_id == rejected.parent_id  # two replies to one stored prompt
        assert (chosen.model_name, chosen.model_version) == (winner_name, winner_version)
        assert rejected.model_version == versions[revealed[first][0]] != winner_version
    found = comparisons(db)
    assert [(c.winner, c.loser) for c in found] == [(winner_version, rejected.model_version)]
    db.close()


def test_arena_order_is_random_and_stream_is_refused(arena_server):
    url, db_path, versions = arena_server
    firsts = set()
    for i in range(12):  # P(the same model first 12 times) = 2 * 2**-12
        body = _pair(url, f"order {i}")
        cid = body["completions"][0]["completion_id"]
        with open_db(db_path).session() as s:
            firsts.add(s.scalar(select(Message.model_name).where(Message.completion_id == cid)))
    assert firsts == {"old", "new"}
    resp = httpx.post(url + "/v1/arena", json={"messages": [{"role": "user", "content": "x"}], "stream": True})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stream"


@pytest.mark.parametrize(("args", "says"), [
    (["--model", "a=x", "--model", "b=y", "--arena"], "--db"),
    (["--model", "a=x", "--arena", "--db", "c.db"], "two or more"),
    (["--model", "a=x", "--model", "y", "--arena", "--db", "c.db"], "NAME=PATH"),
    (["--model", "a=x", "--model", "a=y", "--arena", "--db", "c.db"], "distinct"),
    (["--model", "x", "--model", "y"], "--arena"),
])
def test_serve_refuses_arena_options_that_cannot_work(args, says, tmp_path: Path):
    done = run_cli("serve", *args, "--port", "0", timeout=120)
    assert done.returncode != 0
    assert says in done.stderr and "Traceback" not in done.stderr


@pytest.mark.browser
def test_arena_page_choice_lands_in_the_database(arena_server):
    url, db_path, versions = arena_server
    with open_page(url + "/") as (page, errors, sync_api):
        page.fill("#input", "Arena from the browser")
        page.press("#input", "Enter")
        sides = page.locator(".round .side")
        sync_api.expect(sides).to_have_count(2, timeout=60_000)
        sync_api.expect(page.locator(".side .name")).to_have_count(0)  # no names before the choice
        ids = [sides.nth(i).get_attribute("data-completion-id") for i in range(2)]
        sides.nth(1).locator("button.pick").click()
        sync_api.expect(page.locator(".side .name")).to_have_count(2)
        sync_api.expect(page.locator(".side.won")).to_have_attribute("data-completion-id", ids[1])
        shown = page.locator(".side.won .name").inner_text()
    assert errors == []
    with open_db(db_path).session() as s:
        event = s.scalars(select(Feedback).join(Message, Message.id == Feedback.chosen_id)
                          .where(Message.completion_id == ids[1])).one()
        chosen, rejected = s.get(Message, event.chosen_id), s.get(Message, event.rejected_id)
    assert rejected.completion_id == ids[0] and chosen.model_version != rejected.model_version
    assert shown.endswith(f"{chosen.model_name} ({chosen.model_version[:8]})")
