"""The chat page at `/` in real headless Chromium: type a message, watch the answer stream in, reset."""

from __future__ import annotations

import pytest

from browser_page import open_page
from chatrl.serve.server import create_app, start_in_thread

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page_url(tiny_model_dir: str):
    app = create_app(tiny_model_dir, dtype="fp32", model_name="tiny-random", default_max_tokens=12)
    srv, thread, url = start_in_thread(app)
    yield url + "/"
    srv.should_exit = True
    thread.join(15)


@pytest.fixture
def chat_page(page_url: str):
    """(a page at the chat URL in headless Chromium, its JS errors so far, playwright's sync API)."""
    with open_page(page_url) as opened:
        yield opened


def test_chat_page_streams_an_answer_and_resets(chat_page, tmp_path):
    page, errors, sync_api = chat_page
    sync_api.expect(page.locator("#model")).to_contain_text("tiny-random")
    page.fill("#max_tokens", "8")
    page.fill("#input", "Hello from the browser")
    page.press("#input", "Enter")

    answer = page.locator(".msg.assistant").first
    sync_api.expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    assert page.locator(".msg.user").first.text_content() == "Hello from the browser"
    assert answer.text_content().strip()
    assert int(answer.get_attribute("data-chunks")) >= 2  # it arrived in pieces: streamed
    sync_api.expect(page.locator("#status")).to_contain_text("8 answer tokens")

    # second turn: the page sends the whole conversation, so the prompt grows
    first_status = page.locator("#status").text_content()
    page.fill("#input", "And a follow-up")
    page.click("#send")
    sync_api.expect(page.locator(".msg.assistant").nth(1)).to_have_attribute("data-done", "true",
                                                                              timeout=60_000)
    prompt_tokens = [int(s.split(" prompt")[0].split()[-1])
                     for s in (first_status, page.locator("#status").text_content())]
    assert prompt_tokens[1] > prompt_tokens[0] + 8
    page.screenshot(path=str(tmp_path / "chat.png"))

    page.click("#reset")
    assert page.locator(".msg").count() == 0
    assert page.evaluate("messages.length") == 0
    assert errors == []


HOSTILE = ("**bold** and *it* with `code`\n\n- one\n- two\n\n```\nx < y\n```\n\n"
           "<script>window.__xss = 1</script> <img src=x onerror=\"window.__xss = 2\">\n\n"
           "[link](javascript:window.__xss=3) <b onclick=\"window.__xss = 4\">b</b> [ok](https://example.com)")


def test_replies_render_markdown_with_html_kept_as_text(chat_page):
    page, errors, _ = chat_page
    assert page.evaluate("typeof marked.parse === 'function' && typeof DOMPurify.sanitize === 'function'")
    page.evaluate("text => renderReply(bubble('assistant', ''), text)", HOSTILE)
    reply = page.locator(".msg.assistant").first
    assert reply.locator("strong").inner_text() == "bold" and reply.locator("em").inner_text() == "it"
    assert reply.locator("li").count() == 2 and "x < y" in reply.locator("pre code").inner_text()
    text = reply.inner_text()
    assert "<script>window.__xss = 1</script>" in text and "<img src=x onerror=" in text  # shown as text
    assert reply.locator("script, img, b").count() == 0  # no element from the reply's raw HTML
    hrefs = reply.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    assert "https://example.com" in hrefs and not any(h and "javascript" in h for h in hrefs)
    if reply.locator("a", has_text="link").count():
        reply.locator("a", has_text="link").click()
    page.wait_for_timeout(200)
    assert page.evaluate("window.__xss") is None
    assert errors == []
