"""Pages opened from disk in a real, headless Chromium (Debian's ``chromium``, driven by
Playwright through its executable path; ``playwright install`` is never needed).

Use the ``browser_page`` fixture (registered in ``conftest.py``)::

    def test_my_page(browser_page, tmp_path):
        page = browser_page.open(tmp_path / "page.html")   # waits for the load event
        ...                                                 # page is a playwright Page
        assert browser_page.errors == []                    # console errors, page errors, network

``errors`` collects every console message of type ``error``, every uncaught page error and
every request for anything but a ``file:`` or ``data:`` URL (which is aborted: the pages must
work offline). ``browser_page.screenshot(name)`` saves a PNG in ``$SAESWEEP_SCREENSHOTS`` (or the
test's temporary folder) and returns its path. Without Chromium (``$SAESWEEP_CHROMIUM``, default
``/usr/bin/chromium``) or the ``playwright`` package the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("SAESWEEP_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server", "--disable-background-networking"]
"""No sandbox (tests may run as root, as in CI containers); no GPU; /tmp instead of a small
/dev/shm; no proxy look-up and no background requests (the machine has no network)."""
VIEWPORT = {"width": 1280, "height": 900}


class BrowserPage:
    """One Chromium page whose console errors, page errors and network requests are recorded."""

    def __init__(self, page: Any, shots: Path) -> None:
        self.page = page
        self.errors: list[str] = []
        self.shots = shots
        page.on("console", lambda message: message.type == "error" and self.errors.append(f"console: {message.text}"))
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.route("**/*", self._local_only)

    def _local_only(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.errors.append(f"network request: {url}")
            route.abort()

    def open(self, path: Path, fragment: str = "") -> Any:
        """Load ``path`` (plus ``#fragment``) and return the playwright Page."""
        self.page.goto(Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else ""), wait_until="load")
        return self.page

    def screenshot(self, name: str) -> Path:
        """A PNG of the page as shown, ``{name}.png`` in the screenshot folder."""
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=False)
        return path


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[BrowserPage]:
    """A fresh headless Chromium page (see the module docstring); skips without a browser."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SAESWEEP_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install '.[dev]')")
    shots = Path(os.environ.get("SAESWEEP_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        except sync_api.Error as error:
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(error).splitlines()[0]}")
        try:
            yield BrowserPage(browser.new_page(viewport=VIEWPORT), shots)
        finally:
            browser.close()
