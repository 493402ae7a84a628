"""Playwright on Debian's Chromium against the whole stack, with screenshots kept as artifacts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# The end-to-end suite's stack and sample site: every service its own process.
from e2e.conftest import e2e_site, stack  # noqa: F401 - pytest fixtures
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    browser = playwright_driver.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[
            "--no-sandbox",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser, stack) -> Iterator[Page]:  # noqa: F811 - the imported fixture
    context = browser.new_context(
        base_url=stack.gateway_url, viewport={"width": 1400, "height": 1000}
    )
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        # A refused socket while the gateway restarts is expected, but a script error is not.
        if (
            message.type == "error"
            and "WebSocket" not in message.text
            and "Failed to load resource" not in message.text
        ):
            errors.append(message.text)

    page.on("console", on_console)
    yield page
    context.close()
    assert not errors, f"the page logged errors: {errors}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def api(stack) -> Iterator[httpx.Client]:  # noqa: F811 - the imported fixture
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as client:
        yield client
