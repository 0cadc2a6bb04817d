"""The chat page at `/` in real headless Chromium: type a message, watch the answer stream in, reset."""

from __future__ import annotations

import os
import shutil

import pytest

from chatrl.serve.server import create_app, start_in_thread

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    """Debian's chromium (never a downloaded browser build)."""
    for path in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def page_url(tiny_model_dir: str):
    app = create_app(tiny_model_dir, dtype="fp32", model_name="tiny-random", default_max_tokens=12)
    srv, thread, url = start_in_thread(app)
    yield url + "/"
    srv.should_exit = True
    thread.join(15)


def test_chat_page_streams_an_answer_and_resets(page_url: str, tmp_path):
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium); the page test needs a real browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_url)
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
        finally:
            browser.close()
