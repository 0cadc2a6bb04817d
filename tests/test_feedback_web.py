"""The chat page on a `chatrl serve --db` server, in real headless Chromium: thumbs up with a comment, regenerate and
choose, edit, and the sidebar of past conversations; every action lands in the database."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from browser_page import open_page
from chatrl.feedback.db import Conversation, Feedback, Message, open_db
from chatrl.serve.server import create_app, start_in_thread

pytestmark = pytest.mark.browser
HTML_COMMENT = '<img src=x onerror="window.__xss = 1">too short'


@pytest.fixture
def page_with_db(tmp_path, tiny_model_dir: str):
    app = create_app(tiny_model_dir, dtype="fp32", model_name="tiny-random", default_max_tokens=8,
                     db=str(tmp_path / "chat.db"))
    srv, thread, url = start_in_thread(app)
    try:
        with open_page(url + "/") as (page, errors, sync_api):
            yield page, errors, sync_api.expect, tmp_path / "chat.db"
    finally:
        srv.should_exit = True
        thread.join(15)


def test_page_feedback_regenerate_edit_and_history(page_with_db):
    page, errors, expect, db_path = page_with_db
    page.fill("#input", "Hello from the browser")
    page.press("#input", "Enter")
    first = page.locator(".msg.assistant").first
    expect(first).to_have_attribute("data-done", "true", timeout=60_000)
    first_id = first.get_attribute("data-completion-id")
    assert first_id.startswith("chatcmpl-")

    page.locator(".tools .up").first.click()
    expect(page.locator("#status")).to_have_text("feedback saved")
    page.fill(".tools input.comment", HTML_COMMENT)
    page.locator(".tools button.comment").click()
    expect(page.locator(".tools input.comment")).to_have_count(0)  # gone once stored

    page.locator(".tools .regen").first.click()
    alt = page.locator(".msg.assistant").nth(1)
    expect(alt).to_have_attribute("data-done", "true", timeout=60_000)
    expect(page.locator(".prefer")).to_have_count(2)
    page.locator(".prefer").nth(1).click()  # the regenerated reply wins
    expect(first).to_have_class("msg assistant md rejected")
    alt_id = alt.get_attribute("data-completion-id")
    assert page.evaluate("messages[1].content") == alt.get_attribute("data-text")

    page.locator(".tools .edit").last.click()
    alt.locator("textarea").fill("A better answer.")
    alt.locator("button.save").click()
    expect(alt).to_have_text("A better answer.")
    assert page.evaluate("messages[1].content") == "A better answer."

    with open_db(db_path).session() as s:
        events = s.scalars(select(Feedback).order_by(Feedback.id)).all()
        ids = {m.id: m.completion_id for m in s.scalars(select(Message))}
    assert [e.kind for e in events] == ["rating", "rating", "pair", "edit"]
    assert events[1].comment == HTML_COMMENT and events[1].rating == 1  # verbatim
    assert (ids[events[2].chosen_id], ids[events[2].rejected_id]) == (alt_id, first_id)
    assert ids[events[3].message_id] == alt_id and events[3].edited == "A better answer."

    # the sidebar lists it; a fresh page opens it on its newest branch and continues the same conversation
    page.reload()
    expect(page.locator("#history button")).to_have_count(1)
    expect(page.locator("#history button")).to_have_text("Hello from the browser")
    page.locator("#history button").click()
    expect(page.locator(".msg.user")).to_have_text(["Hello from the browser"])
    assert page.locator(".msg.assistant").get_attribute("data-completion-id") == alt_id
    page.fill("#input", "And a follow-up")
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant").nth(1)).to_have_attribute("data-done", "true", timeout=60_000)
    with open_db(db_path).session() as s:
        assert len(s.scalars(select(Conversation)).all()) == 1
        follow = s.scalar(select(Message).where(Message.content == "And a follow-up"))
        assert ids[follow.parent_id] == alt_id  # it continues from the reply the page showed
    assert page.evaluate("window.__xss") is None and errors == []
