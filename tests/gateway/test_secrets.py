"""`POST /api/sessions` with `secrets`: validated, stored in the secrets bucket, named in events."""

from __future__ import annotations

import json

import httpx
import pytest
from nats.js import JetStreamContext
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore
from stepwise_libs.secrets import load_secrets

from .conftest import commands_for

TEST_CASE = (
    'Open the login page\nType "{{user}}" into "Username"\nType "{{password}}" into "Password"'
)
URL = "http://127.0.0.1:8123/login"
USER_VALUE = "u-5f0c9d17e2"
PASSWORD_VALUE = "p-8a1b7c3e44"


def body(secrets: object, test_case: str = TEST_CASE) -> dict[str, object]:
    return {"test_case": test_case, "target_url": URL, "secrets": secrets}


async def test_secrets_go_to_bucket_not_events(
    client: httpx.AsyncClient,
    store: EventStore,
    js: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets = {"user": USER_VALUE, "password": PASSWORD_VALUE, "unused": "x-unused-1"}

    response = await client.post("/api/sessions", json=body(secrets))

    assert response.status_code == 201, response.text
    session_id = response.json()["session_id"]
    assert response.json()["secret_names"] == ["user", "password", "unused"]
    assert await load_secrets(js, session_id) == secrets
    events = await store.read(session_id)
    assert events[0].data["secret_names"] == ["user", "password", "unused"]
    assert events[0].data["test_case"] == TEST_CASE
    raw = (await js.get_msg(subjects.EVENTS_STREAM, seq=events[0].position or 0)).data or b""
    queued = await commands_for(js, session_id)
    assert len(queued) == 1
    for value in secrets.values():
        assert value not in response.text
        assert value.encode() not in raw
        assert value not in json.dumps(queued[0][1].data)
        assert value not in caplog.text


async def test_secrets_bucket_uses_memory_storage(js: JetStreamContext) -> None:
    info = await js.stream_info(f"KV_{subjects.SECRETS_BUCKET}")

    assert info.config.storage == "memory"
    assert info.config.max_age == 24 * 3600


@pytest.mark.parametrize(
    ("secrets", "test_case", "field", "words"),
    [
        ({"user": USER_VALUE}, TEST_CASE, "secrets.password", "{{password}}"),
        (None, TEST_CASE, "secrets.user", "{{user}}"),
        ({}, 'Type "{{pin}}" into "PIN"', "secrets.pin", "no value for 'pin'"),
        ({"9lives": "x"}, "Open the page", "secrets", "'9lives'"),
        ({"bad-name": "x"}, "Open the page", "secrets", "'bad-name'"),
        ({"a" * 65: "x"}, "Open the page", "secrets", "invalid name"),
        ({"pin": ""}, "Open the page", "secrets.pin", "must not be empty"),
        ({"pin": "é" * 2049}, "Open the page", "secrets.pin", "4,098 bytes"),
        ({f"s{n}": "x" for n in range(51)}, "Open the page", "secrets", "maximum of 50"),
        ({"pin": 1234}, "Open the page", "secrets.pin", "string"),
        (["pin"], "Open the page", "secrets", "dictionary"),
    ],
)
async def test_invalid_secrets_rejected(
    client: httpx.AsyncClient, secrets: object, test_case: str, field: str, words: str
) -> None:
    response = await client.post("/api/sessions", json=body(secrets, test_case))

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert words in error["message"]
    assert USER_VALUE not in response.text


async def test_rejected_secret_value_not_echoed(client: httpx.AsyncClient) -> None:
    value = "v-" + "9" * 5000

    response = await client.post("/api/sessions", json=body({"pin": value}, "Open the page"))

    assert response.status_code == 422
    assert "9" * 50 not in response.text


async def test_idempotent_retry_keeps_secret_names(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "secrets-retry-1"}
    secrets = {"user": USER_VALUE, "password": PASSWORD_VALUE}
    first = await client.post("/api/sessions", json=body(secrets), headers=headers)
    again = await client.post("/api/sessions", json=body(secrets), headers=headers)
    other = await client.post(
        "/api/sessions", json=body(secrets | {"extra": "x-extra"}), headers=headers
    )

    assert first.status_code == 201, first.text
    assert again.status_code == 201, again.text
    assert again.json()["session_id"] == first.json()["session_id"]
    assert other.status_code == 422
    assert other.json()["error"]["field"] == "Idempotency-Key"
    assert "secret names" in other.json()["error"]["message"]
