"""The bundled sample shop, driven through its pages in a real headless Chromium over CDP."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from stepwise.sample_site import SampleSite, sample_test_case, serve_sample_site

CHROMIUM = "/usr/bin/chromium"


class Page:
    """A minimal CDP client for one page: navigate, evaluate JavaScript, wait for a condition."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, seconds: float = 10.0) -> Any:
        """Evaluate `expression` until it is truthy; the page offers no event to await instead."""
        async with asyncio.timeout(seconds):
            while True:
                try:
                    value = await self.evaluate(expression)
                except AssertionError:
                    value = None  # the page is between two documents
                if value:
                    return value
                await asyncio.sleep(0.05)

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href")

    async def text(self) -> str:
        return str(await self.evaluate("document.body.innerText"))


@pytest.fixture
def site() -> Iterator[SampleSite]:
    with serve_sample_site() as running:
        yield running


@pytest.fixture
def chromium_page_url(tmp_path: Path) -> Iterator[str]:
    """Start a headless Chromium and return the CDP WebSocket URL of its first page."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # Chromium writes its debugging port to this file once it listens.
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, f"chromium exited with code {process.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its debugging port in 30 s"
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
            targets = json.load(answer)
        yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def page(chromium_page_url: str) -> AsyncIterator[Page]:
    async with websockets.connect(chromium_page_url, max_size=None) as socket:
        yield Page(socket)


def _fill(selector: str, value: str) -> str:
    return (
        f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
        f"e.value = {json.dumps(value)}; e.dispatchEvent(new Event('input')); return true; }})()"
    )


def _click(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)}).click() ?? true"


async def _log_in(page: Page, site: SampleSite, username: str, password: str) -> None:
    await page.open(site.base_url)
    await page.evaluate(_fill("#username", username))
    await page.evaluate(_fill("#password", password))
    await page.evaluate(_click("#login-button"))


async def test_sample_site_checkout_flow(page: Page, site: SampleSite) -> None:
    # Login page: labelled fields and the Login button.
    await page.open(site.base_url)
    assert "Stepwise Sample Shop" in await page.text()
    labels = await page.evaluate("[...document.querySelectorAll('label')].map(l => l.innerText)")
    assert labels == ["Username", "Password"]

    # Log in and land on the product list.
    await _log_in(page, site, "standard_user", "secret_sauce")
    await page.wait_for("location.pathname === '/inventory.html'")
    await page.wait_for("document.querySelector('h1')?.innerText === 'Products'")
    names = await page.evaluate(
        "[...document.querySelectorAll('.items .name')].map(e => e.innerText)"
    )
    assert names == ["Backpack", "Bike Light", "Bolt T-Shirt", "Fleece Jacket"]
    assert "Remove" not in await page.text()

    # Add the backpack: its button turns into Remove and the badge counts 1.
    await page.evaluate(_click("button[aria-label='Add Backpack to cart']"))
    assert await page.evaluate("document.querySelector('#toggle-backpack').innerText") == "Remove"
    assert await page.evaluate("document.querySelector('#cart-badge').innerText") == "1"

    # Sorting by price puts the cheapest item first.
    await page.evaluate(
        "(() => { const s = document.querySelector('#sort'); s.value = 'price-asc';"
        " s.dispatchEvent(new Event('change')); return true; })()"
    )
    first = await page.evaluate("document.querySelector('.items .name').innerText")
    assert first == "Bike Light"

    # The cart lists the backpack.
    await page.evaluate(_click("#cart-link"))
    await page.wait_for("location.pathname === '/cart.html'")
    await page.wait_for("document.querySelector('h1')?.innerText === 'Your Cart'")
    assert "Backpack" in await page.text()
    assert "Bike Light" not in await page.text()

    # Checkout rejects a missing field, then accepts the full form.
    await page.evaluate(_click("#checkout"))
    await page.wait_for("location.pathname === '/checkout.html'")
    await page.wait_for("document.readyState === 'complete'")
    await page.evaluate(_click("#continue"))
    error = await page.evaluate("document.querySelector('#checkout-error').innerText")
    assert error == "Error: First Name is required"
    await page.evaluate(_fill("#first-name", "Ada"))
    await page.evaluate(_fill("#last-name", "Lovelace"))
    await page.evaluate(_click("#continue"))
    error = await page.evaluate("document.querySelector('#checkout-error').innerText")
    assert error == "Error: Postal Code is required"
    await page.evaluate(_fill("#postal-code", "12345"))
    await page.evaluate(_fill("#country", "France"))
    await page.evaluate(_click("#continue"))

    # The order is complete and the cart is empty again.
    await page.wait_for("location.pathname === '/complete.html'")
    await page.wait_for("document.readyState === 'complete'")
    text = await page.text()
    assert "Thank you for your order!" in text
    assert "Backpack" in text
    assert "France" in text
    assert await page.evaluate("document.querySelector('#cart-badge').innerText") == ""


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("standard_user", "wrong", "Username and password do not match"),
        ("nobody", "secret_sauce", "Username and password do not match"),
        ("locked_out_user", "secret_sauce", "Sorry, this user has been locked out."),
    ],
)
async def test_sample_site_login_rejects(
    page: Page, site: SampleSite, username: str, password: str, message: str
) -> None:
    await _log_in(page, site, username, password)
    shown = await page.wait_for("document.querySelector('#login-error').innerText")
    assert shown == message
    assert await page.evaluate("location.pathname") == "/"


def test_sample_test_cases_are_bundled() -> None:
    checkout = sample_test_case("checkout")
    failing = sample_test_case("failing")
    assert checkout.splitlines()[-1] == '16. Check that the page shows "Thank you for your order!"'
    assert "Free shipping on every order" in failing
    with pytest.raises(FileNotFoundError, match="no sample test case named 'missing'"):
        sample_test_case("missing")


def test_sample_site_command_serves_until_interrupt() -> None:
    from stepwise.embedded import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "stepwise.cli", "sample-site", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in first_line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200
            assert "Stepwise Sample Shop" in response.read().decode()

        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
