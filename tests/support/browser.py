"""Headless Chromium for browser tests: Debian's `chromium` package, driven by Playwright.

Playwright's own browser builds cannot be downloaded here, so the page runs in the system
Chromium (`apt-get install chromium`; .ci/run installs it). Playwright launches it with
`--no-sandbox` unless `chromium_sandbox=True`, which is what running as root needs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from urllib.parse import urlsplit

from playwright.async_api import HttpCredentials, Page, ViewportSize, async_playwright

# The real ELF first: /usr/bin/chromium is Debian's shell wrapper around it.
CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
TIMEOUT_MS = 10_000  # for each action and navigation: fail fast instead of Playwright's 30 s


class ChromiumMissing(RuntimeError):
    """No system Chromium: install it with `apt-get install chromium`."""


def chromium_path() -> str | None:
    """The system Chromium executable ($CHROMIUM_PATH overrides), or None where none is."""
    override = os.environ.get("CHROMIUM_PATH")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


@asynccontextmanager
async def browser_page(
    base_url: str,
    username: str | None = None,
    password: str | None = None,
    *,
    phone: bool = False,
) -> AsyncIterator[Page]:
    """A page in a fresh headless Chromium; relative `page.goto("/x")` go to `base_url`.

    With `username`, the context answers HTTP Basic challenges from `base_url`'s origin
    only. `phone=True` gives a 390x844 touch viewport instead of 1280x800.
    """
    executable = chromium_path()
    if executable is None:
        raise ChromiumMissing(
            "no Chromium found (looked for $CHROMIUM_PATH, " + ", ".join(CANDIDATES) + "); "
            "install it with `apt-get install chromium fonts-dejavu-core`"
        )
    credentials: HttpCredentials | None = None
    if username is not None:
        parts = urlsplit(base_url)
        credentials = {
            "username": username,
            "password": password or "",
            "origin": f"{parts.scheme}://{parts.netloc}",
        }
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, chromium_sandbox=False
        )
        try:
            context = await browser.new_context(
                base_url=base_url,
                http_credentials=credentials,
                viewport=PHONE if phone else DESKTOP,
                is_mobile=phone,
                has_touch=phone,
            )
            context.set_default_timeout(TIMEOUT_MS)
            yield await context.new_page()
            await context.close()
        finally:
            await browser.close()


def phone_page(
    base_url: str, username: str | None = None, password: str | None = None
) -> AbstractAsyncContextManager[Page]:
    """`browser_page` with a phone's viewport (390x844, touch)."""
    return browser_page(base_url, username, password, phone=True)
