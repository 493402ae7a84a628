"""Settings, URL resolution, failure categories and retry delays of the executor."""

from __future__ import annotations

import pytest
from stepwise_executor.errors import categorize_failure
from stepwise_executor.models import RETRY_MAX_SECONDS, retry_delay
from stepwise_executor.offline_model import resolve_url, text_on_page
from stepwise_executor.page_state import parse_attributes, parse_page_state
from stepwise_executor.settings import ExecutorSettings
from stepwise_libs.settings import SettingsError


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STEPWISE_STEP_TIMEOUT", "soon"),
        ("STEPWISE_STEP_TIMEOUT", "0"),
        ("STEPWISE_CHROMIUM", "/nonexistent/chromium"),
        ("STEPWISE_EXECUTOR_ID", "bad id.with.dots"),
        ("STEPWISE_GEMINI_BASE_URL", "127.0.0.1:9"),
    ],
)
def test_settings_reject_bad_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        ExecutorSettings()
    assert raised.value.variable == variable
    assert value in str(raised.value)


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "STEPWISE_STEP_TIMEOUT",
        "STEPWISE_CHROMIUM",
        "STEPWISE_EXECUTOR_ID",
        "STEPWISE_GEMINI_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = ExecutorSettings()
    assert settings.step_timeout == 120.0
    assert settings.chromium == "/usr/bin/chromium"
    assert "." not in settings.executor_id
    assert settings.browsers_dir.name == "executor"


@pytest.mark.parametrize(
    ("target", "base", "expected"),
    [
        ("", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/"),
        ("/cart.html", "http://127.0.0.1:8000/shop/", "http://127.0.0.1:8000/cart.html"),
        ("cart.html", "http://127.0.0.1:8000/shop/", "http://127.0.0.1:8000/shop/cart.html"),
        ("https://example.org/a", "http://127.0.0.1:8000/", "https://example.org/a"),
        ("example.org/a", "http://127.0.0.1:8000/", "https://example.org/a"),
    ],
)
def test_resolve_url(target: str, base: str, expected: str) -> None:
    assert resolve_url(target, base) == expected


@pytest.mark.parametrize(
    ("message", "category"),
    [
        ('Text "Products" was not found on the page', "check_failed"),
        ('Text "Remove" is still shown on the page', "check_failed"),
        ('No input field matching "Email" was found on the page', "element_not_found"),
        ("Element index 999 not available - page may have changed.", "element_not_found"),
    ],
)
def test_categorize_failure(message: str, category: str) -> None:
    assert categorize_failure(message) == category


def test_retry_delay_grows_and_is_capped() -> None:
    for attempt in range(1, 12):
        delay = retry_delay(attempt)
        ceiling = min(RETRY_MAX_SECONDS, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert retry_delay(30) <= RETRY_MAX_SECONDS


def test_parse_attributes_with_spaces() -> None:
    attributes = parse_attributes("type=button aria-label=Add Backpack to cart id=add-backpack")
    assert attributes == {
        "type": "button",
        "aria-label": "Add Backpack to cart",
        "id": "add-backpack",
    }


def test_parse_page_state_nesting() -> None:
    state = """
Current tab: 01AB
Available tabs:
Tab 01AB: http://127.0.0.1:1/inventory.html - Products
Interactive elements:
[Start of page]
Products
[12]<span />
\t[40]<a />
\t\tCart
\t1
|SHADOW(open)|*[7]<input type=text placeholder=Search />
[End of page]
"""
    page = parse_page_state(state)
    assert page.url == "http://127.0.0.1:1/inventory.html"
    assert [element.index for element in page.elements] == [12, 40, 7]
    span, link, field = page.elements
    assert span.texts == ["Cart", "1"]
    assert link.texts == ["Cart"]
    assert link.depth == 1
    assert field.is_text_field
    assert "Products" in page.visible_text.splitlines()


LOGIN_PAGE_STATE = """
Current tab: 01AB
Available tabs:
Tab 01AB: http://127.0.0.1:1/ - Login
Interactive elements:
[Start of page]
Stepwise Sample Shop
Log in to see the products.
“Sign in”   with your   account
[End of page]
"""


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Stepwise Sample Shop", True),
        ("see the products", True),
        ("Products", False),
        ("stepwise sample shop", False),
        ('"Sign in" with your account', True),
        ("Sign in with", False),
    ],
)
def test_text_on_page_is_case_sensitive(text: str, shown: bool) -> None:
    page = parse_page_state(LOGIN_PAGE_STATE)
    assert text_on_page(page, text) is shown
