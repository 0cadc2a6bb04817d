"""A served page in real headless Chromium (Debian's browser, never a downloaded build) driven by playwright: the
one way the page tests open the chat and arena pages."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    """Debian's chromium (never a downloaded browser build)."""
    for path in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if path and os.access(path, os.X_OK):
            return path
    return None


@contextmanager
def open_page(url: str) -> Iterator[tuple[Any, list[str], Any]]:
    """(a page at `url` in headless Chromium, the JS errors it has raised so far, playwright's sync API). Skips the
    test where chromium or the playwright package is missing."""
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium); the page test needs a real browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            yield page, errors, sync_api
        finally:
            browser.close()
