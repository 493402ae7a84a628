"""Pytest fixtures of the fakes, registered for the whole suite through `tests/conftest.py`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .gemini import FakeGemini


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    """A started fake Gemini server on loopback; `fake_gemini.base_url` goes to google-genai."""
    with FakeGemini() as fake:
        yield fake
