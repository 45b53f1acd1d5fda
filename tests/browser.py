"""Open a local HTML file in a real headless Chromium (Debian's, driven by Playwright) and report what it saw.

`.ci/run` installs Debian's ``chromium`` package; Playwright's Python package (a dev dependency) drives it through
``executable_path``, so no browser is downloaded. Without either, the tests that need a browser are skipped and
say why.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium on this machine (Debian package `chromium`; .ci/run installs it)")
    pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency) is not installed")
    return path


def render(page_path: str | Path, screenshot: str | Path | None = None) -> dict:
    """Load ``page_path`` headless; returns console errors, page errors, failed / non-file requests and images."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    seen: dict = {"console_errors": [], "page_errors": [], "failed_requests": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda m: m.type == "error" and seen["console_errors"].append(m.text))
            page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
            page.on("requestfailed", lambda r: seen["failed_requests"].append(r.url[:80]))
            page.on("request", lambda r: seen["requests"].append(r.url[:80]))
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            seen["images"] = page.evaluate(
                "() => Array.from(document.images).map(i => ({src: i.src.slice(0, 30), complete: i.complete, "
                "width: i.naturalWidth, height: i.naturalHeight, alt: i.alt}))")
            seen["text"] = page.inner_text("body")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen
