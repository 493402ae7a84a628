"""The offline model's decisions on page states captured from the sample site in a real Chromium."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from browser_use.llm.messages import BaseMessage, UserMessage
from stepwise_executor.browser import SessionBrowser
from stepwise_executor.offline_model import OfflineChatModel, message_text
from stepwise_executor.page_state import extract_browser_state, parse_page_state
from stepwise_executor.runner import build_agent

from stepwise.sample_site import SampleSite


class RecordingModel(OfflineChatModel):
    """The offline model, keeping the messages of every call."""

    def __init__(self, target_url: str) -> None:
        super().__init__(target_url)
        self.seen: list[list[BaseMessage]] = []

    async def ainvoke(
        self, messages: list[BaseMessage], output_format: Any = None, **kwargs: Any
    ) -> Any:
        self.seen.append(list(messages))
        return await super().ainvoke(messages, output_format, **kwargs)


class Pages:
    def __init__(self, browser: SessionBrowser, site: SampleSite, folder: Path) -> None:
        self.browser = browser
        self.site = site
        self.folder = folder

    async def run(self, step: str) -> RecordingModel:
        session = await self.browser.start()
        model = RecordingModel(self.site.base_url)
        agent = build_agent(step, model, session, self.folder / "agent", 60, use_vision=False)
        history = await agent.run(max_steps=10)
        assert history.is_successful(), f"{step!r} failed: {history.final_result()}"
        return model

    async def messages(self) -> list[BaseMessage]:
        """Return the messages of the first model call of a step run on the current page."""
        model = await self.run('Check that the page shows "Stepwise Sample Shop"')
        return model.seen[0]


@pytest.fixture
async def pages(sample_site: SampleSite, tmp_path: Path) -> AsyncIterator[Pages]:
    browser = SessionBrowser(
        "offline-model-test", "/usr/bin/chromium", tmp_path / "browsers", sample_site.base_url
    )
    yield Pages(browser, sample_site, tmp_path)
    await browser.close()


def with_task(messages: list[BaseMessage], step: str) -> list[BaseMessage]:
    """Return the messages with the step text in <user_request> replaced by `step`."""
    replaced: list[BaseMessage] = []
    for message in messages:
        if message.role == "user":
            text = re.sub(
                r"<user_request>.*?</user_request>",
                lambda _: f"<user_request>\n{step}\n</user_request>",
                message_text(message),
                flags=re.S,
            )
            replaced.append(UserMessage(content=text))
        else:
            replaced.append(message)
    return replaced


def element_line(messages: list[BaseMessage], index: int) -> str:
    state = extract_browser_state(message_text(messages[-1]))
    assert state is not None
    for line in state.splitlines():
        if f"[{index}]<" in line:
            return line
    raise AssertionError(f"index {index} is not in the page state")


def decide(
    messages: list[BaseMessage], step: str, target_url: str = ""
) -> tuple[str, dict[str, Any]]:
    decision = OfflineChatModel(target_url).decide(with_task(messages, step))
    assert len(decision.actions) == 1
    name, params = next(iter(decision.actions[0].items()))
    return name, params


async def test_login_page_decisions(pages: Pages) -> None:
    await pages.run("Open the login page")
    messages = await pages.messages()
    state = extract_browser_state(message_text(messages[-1]))
    assert state is not None
    page = parse_page_state(state)
    assert len(page.elements) >= 3

    name, params = decide(messages, 'Type "standard_user" into "Username"')
    assert name == "input"
    assert params["text"] == "standard_user"
    assert "username" in element_line(messages, params["index"]).lower()

    name, params = decide(messages, 'Type "secret_sauce" into "Password"')
    assert name == "input"
    assert "type=password" in element_line(messages, params["index"])

    name, params = decide(messages, 'Click "Login"')
    assert name == "click"
    assert "<button" in element_line(messages, params["index"])

    name, params = decide(messages, 'Click "Sign up now"')
    assert name == "done"
    assert params["success"] is False
    assert 'No element matching "Sign up now" was found on the page' in params["text"]

    name, params = decide(messages, 'Check that the page shows "Stepwise Sample Shop"')
    assert (name, params["success"]) == ("done", True)

    name, params = decide(messages, "Press enter")
    assert (name, params) == ("send_keys", {"keys": "Enter"})

    name, params = decide(messages, "Open /cart.html", pages.site.base_url)
    assert (name, params["url"]) == ("navigate", pages.site.base_url.rstrip("/") + "/cart.html")

    name, params = decide(messages, "Do a barrel roll")
    assert (name, params["success"]) == ("done", False)


async def test_missing_text_polls_then_fails(pages: Pages) -> None:
    await pages.run("Open the login page")
    messages = with_task(await pages.messages(), 'Check that the page shows "Free shipping"')
    model = OfflineChatModel()
    names = [next(iter(model.decide(messages).actions[0])) for _ in range(4)]
    assert names == ["wait", "wait", "wait", "done"]
    final = model.decide(messages).actions[0]["done"]
    assert final["success"] is False
    assert final["text"] == 'Text "Free shipping" was not found on the page'


async def test_inventory_page_decisions(pages: Pages) -> None:
    for step in (
        "Open the login page",
        'Type "standard_user" into "Username"',
        'Type "secret_sauce" into "Password"',
        'Click "Login"',
    ):
        await pages.run(step)
    messages = await pages.messages()

    name, params = decide(messages, 'Click "Add Backpack to cart"')
    assert name == "click"
    assert "Add Backpack to cart" in element_line(messages, params["index"])

    name, params = decide(messages, 'Select "Price (low to high)" in "Sort"')
    assert name == "select_dropdown"
    assert params["text"] == "Price (low to high)"
    assert "<select" in element_line(messages, params["index"])

    name, params = decide(messages, 'Click "Cart"')
    assert name == "click"
    assert "<a" in element_line(messages, params["index"])

    name, params = decide(messages, 'Check that the page does not show "Remove"')
    assert (name, params["success"]) == ("done", True)


async def test_products_check_fails_after_failed_login(pages: Pages) -> None:
    for step in (
        "Open the login page",
        'Type "standard_user" into "Username"',
        'Type "wrong" into "Password"',
        'Click "Login"',
    ):
        await pages.run(step)
    # The login page still shows "Log in to see the products.", with a lowercase "products".
    messages = with_task(await pages.messages(), 'Check that the page shows "Products"')
    model = OfflineChatModel()
    names = [next(iter(model.decide(messages).actions[0])) for _ in range(4)]
    assert names == ["wait", "wait", "wait", "done"]
    final = model.decide(messages).actions[0]["done"]
    assert final["success"] is False
    assert final["text"] == 'Text "Products" was not found on the page'
