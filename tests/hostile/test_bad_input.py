"""Bad test cases and target URLs: a clear 422 naming the field, and nothing stored."""

from __future__ import annotations

import httpx
import pytest
from stepwise_libs import subjects
from stepwise_libs.jetstream import connect

from stepwise.stack import Stack

GOOD_CASE = 'Open the login page\nClick "Login"'
GOOD_URL = "http://127.0.0.1:9/"

BAD_INPUTS = {
    "test case of 1 MB": ({"test_case": "a" * (1 << 20), "target_url": GOOD_URL}, "test_case"),
    "empty test case": ({"test_case": "", "target_url": GOOD_URL}, "test_case"),
    "blank test case": ({"test_case": " \n\t ", "target_url": GOOD_URL}, "test_case"),
    "NUL in test case": ({"test_case": "Open\x00 the page", "target_url": GOOD_URL}, "test_case"),
    "escape in test case": ({"test_case": "Click \x1b[31m", "target_url": GOOD_URL}, "test_case"),
    "DEL in test case": ({"test_case": "Click\x7f", "target_url": GOOD_URL}, "test_case"),
    "file URL": ({"test_case": GOOD_CASE, "target_url": "file:///etc/passwd"}, "target_url"),
    "javascript URL": ({"test_case": GOOD_CASE, "target_url": "javascript:alert(1)"}, "target_url"),
    "ftp URL": ({"test_case": GOOD_CASE, "target_url": "ftp://127.0.0.1/"}, "target_url"),
    "URL with credentials": (
        {"test_case": GOOD_CASE, "target_url": "http://admin:hunter2@127.0.0.1:9/"},
        "target_url",
    ),
    "URL with user only": (
        {"test_case": GOOD_CASE, "target_url": "https://admin@127.0.0.1:9/"},
        "target_url",
    ),
    "relative URL": ({"test_case": GOOD_CASE, "target_url": "/login"}, "target_url"),
    "URL with control character": (
        {"test_case": GOOD_CASE, "target_url": "http://127.0.0.1:9/\x00"},
        "target_url",
    ),
    "test case not a string": ({"test_case": ["a"], "target_url": GOOD_URL}, "test_case"),
    "missing target URL": ({"test_case": GOOD_CASE}, "target_url"),
}


async def _stored_events(nats_url: str) -> int:
    client = await connect(nats_url, "tests-hostile")
    try:
        info = await client.jetstream().stream_info(subjects.EVENTS_STREAM)
        return info.state.messages
    finally:
        await client.close()


@pytest.mark.parametrize("body, field", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
async def test_bad_session_input_is_422_naming_field_and_stores_nothing(
    hostile_stack: Stack, body: dict[str, object], field: str
) -> None:
    before = await _stored_events(hostile_stack.nats_url)
    async with httpx.AsyncClient(base_url=hostile_stack.gateway_url, timeout=30) as client:
        response = await client.post("/api/sessions", json=body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert error["message"].strip(), error
    # Nothing stored: no event on the stream, so no session_created.
    assert await _stored_events(hostile_stack.nats_url) == before


async def test_raw_oversized_body_is_4xx_json(hostile_stack: Stack) -> None:
    before = await _stored_events(hostile_stack.nats_url)
    raw = b'{"test_case": "' + b"x" * (2 << 20) + b'", "target_url": "http://127.0.0.1:9/"}'
    async with httpx.AsyncClient(base_url=hostile_stack.gateway_url, timeout=60) as client:
        response = await client.post(
            "/api/sessions", content=raw, headers={"content-type": "application/json"}
        )
    assert 400 <= response.status_code < 500, response.text[:500]
    assert response.json()["error"]["field"] == "test_case", response.text[:500]
    assert await _stored_events(hostile_stack.nats_url) == before


@pytest.mark.parametrize("path", ["/api/sessions", "/api/sessions/{session_id}/plan/continue"])
async def test_body_that_is_not_an_object_names_body(hostile_stack: Stack, path: str) -> None:
    async with httpx.AsyncClient(base_url=hostile_stack.gateway_url, timeout=30) as client:
        session = await client.post(
            "/api/sessions", json={"test_case": GOOD_CASE, "target_url": GOOD_URL}
        )
        assert session.status_code == 201, session.text
        url = path.format(session_id=session.json()["session_id"])
        response = await client.post(url, json=[1, 2, 3])
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "body", response.text
