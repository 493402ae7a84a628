"""Parsing `{{name}}` placeholders and writing them as browser-use's `<secret>` tags."""

from __future__ import annotations

import pytest
from stepwise_libs.secrets import placeholders, to_secret_tags


def test_placeholders_once_each_in_order() -> None:
    text = 'Type "{{password}}" into "A"\nType "{{user}}{{password}}" into "B"'

    assert placeholders(text) == ["password", "user"]


@pytest.mark.parametrize(
    "text",
    ["{{9lives}}", "{{a-b}}", "{{ spaced }}", "{password}", "{{}}", "{{" + "a" * 65 + "}}"],
)
def test_invalid_placeholders_ignored(text: str) -> None:
    assert placeholders(text) == []
    assert to_secret_tags(text) == text


def test_longest_name_accepted() -> None:
    name = "_" + "a" * 63

    assert placeholders("{{" + name + "}}") == [name]


def test_secret_tags_replace_each_placeholder() -> None:
    assert to_secret_tags("x{{pin}}y {{pin}}") == "x<secret>pin</secret>y <secret>pin</secret>"
