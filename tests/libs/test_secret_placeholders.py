"""Parsing `{{name}}` placeholders and writing them as browser-use's `<secret>` tags."""

from __future__ import annotations

import pytest
from stepwise_libs.secrets import invalid_placeholders, placeholders, to_secret_tags


def test_placeholders_once_each_in_order() -> None:
    text = 'Type "{{password}}" into "A"\nType "{{user}}{{password}}" into "B"'

    assert placeholders(text) == ["password", "user"]


@pytest.mark.parametrize(
    "text",
    ["{{9lives}}", "{{a-b}}", "{{ two words }}", "{password}", "{{}}", "{{" + "a" * 65 + "}}"],
)
def test_invalid_placeholders_ignored(text: str) -> None:
    assert placeholders(text) == []
    assert to_secret_tags(text) == text


def test_longest_name_accepted() -> None:
    name = "_" + "a" * 63

    assert placeholders("{{" + name + "}}") == [name]


def test_secret_tags_replace_each_placeholder() -> None:
    assert to_secret_tags("x{{pin}}y {{pin}}") == "x<secret>pin</secret>y <secret>pin</secret>"


@pytest.mark.parametrize("text", ["{{ password }}", "{{password }}", "{{\tpassword\t}}"])
def test_spaces_inside_braces_accepted(text: str) -> None:
    assert placeholders(f"Type {text}") == ["password"]
    assert to_secret_tags(f"Type {text}") == "Type <secret>password</secret>"
    assert invalid_placeholders(text) == []


@pytest.mark.parametrize(
    "text", ["{{1pw}}", "{{ 9lives }}", "{{a-b}}", "{{pass.word}}", "{{" + "a" * 65 + "}}"]
)
def test_invalid_placeholder_names_reported(text: str) -> None:
    assert invalid_placeholders(f"Type {text} and {{{{ok}}}}") == [text]


@pytest.mark.parametrize("text", ["{{ok}}", "{{ a + b }}", "{password}", "{{}}", "no braces"])
def test_text_not_reported_as_invalid_placeholder(text: str) -> None:
    assert invalid_placeholders(text) == []
