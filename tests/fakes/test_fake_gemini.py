"""The fake Gemini server serves the real google-genai client as scripted and records its calls."""

from __future__ import annotations

import pytest
from google import genai
from google.genai import errors, types

from fakes.gemini import FakeGemini, RecordedRequest


def _client(fake: FakeGemini) -> genai.Client:
    return genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=fake.base_url))


async def test_scripted_responses_reach_client_in_order(fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_json({"steps": [{"description": 'Click "Login"'}]})
    fake_gemini.reply_status(503)
    fake_gemini.reply_with(lambda request: {"echo": request.prompt_text})
    client = _client(fake_gemini)

    first = await client.aio.models.generate_content(
        model="gemini-2.5-flash",
        contents="plan this",
        config=types.GenerateContentConfig(
            response_mime_type="application/json",
            response_schema={"type": "object", "properties": {"steps": {"type": "array"}}},
        ),
    )
    assert first.parsed == {"steps": [{"description": 'Click "Login"'}]}
    assert first.usage_metadata is not None and first.usage_metadata.total_token_count

    with pytest.raises(errors.ServerError) as failure:
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents="again")
    assert failure.value.code == 503
    assert failure.value.status == "UNAVAILABLE"

    third = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="echo me")
    assert third.text == '{"echo": "echo me"}'

    request = fake_gemini.requests[0]
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.headers["x-goog-api-key"] == "test-key"
    assert request.generation_config["responseMimeType"] == "application/json"
    assert request.generation_config["responseSchema"]["type"] == "OBJECT"
    assert [r.prompt_text for r in fake_gemini.requests] == ["plan this", "again", "echo me"]


def test_unscripted_requests_fail_loudly_and_always_status_overrides(
    fake_gemini: FakeGemini,
) -> None:
    client = _client(fake_gemini)
    with pytest.raises(errors.ClientError, match="no scripted response for request #1"):
        client.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert len(fake_gemini.unscripted) == 1

    fake_gemini.reply_json({"never": "used"})
    fake_gemini.always_status(503)
    for _ in range(2):
        with pytest.raises(errors.ServerError):
            client.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert fake_gemini.pending == 1
    fake_gemini.always_status(None)
    assert client.models.generate_content(model="gemini-2.5-flash", contents="x").parsed is None
    assert len(fake_gemini.wait_for_requests(4, timeout=1)) == 4


async def test_streaming_and_default_responses(fake_gemini: FakeGemini) -> None:
    seen: list[RecordedRequest] = []

    def answer(request: RecordedRequest) -> str:
        seen.append(request)
        return "streamed text"

    fake_gemini.default = answer
    # Keep the client referenced: once collected it closes its aiohttp session mid-stream.
    client = _client(fake_gemini)
    chunks = [
        chunk.text
        async for chunk in await client.aio.models.generate_content_stream(
            model="gemini-2.5-pro", contents="stream please"
        )
    ]
    assert chunks == ["streamed text"]
    assert seen[0].rpc == "streamGenerateContent"
    assert seen[0].query.get("alt") == ["sse"]
    assert seen[0].model == "gemini-2.5-pro"


async def test_browser_use_chat_google_reaches_fake(
    fake_gemini: FakeGemini, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANONYMIZED_TELEMETRY", "false")
    monkeypatch.setenv("BROWSER_USE_VERSION_CHECK", "false")
    from browser_use.llm.google.chat import ChatGoogle
    from browser_use.llm.messages import SystemMessage, UserMessage
    from pydantic import BaseModel

    class Verdict(BaseModel):
        answer: str

    fake_gemini.reply_json({"answer": "42"})
    llm = ChatGoogle(
        model="gemini-2.5-flash",
        api_key="test-key",
        http_options={"base_url": fake_gemini.base_url},
    )

    result = await llm.ainvoke(
        [SystemMessage(content="be brief"), UserMessage(content="the answer?")],
        output_format=Verdict,
    )

    assert result.completion == Verdict(answer="42")
    (request,) = fake_gemini.requests
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.generation_config["responseMimeType"] == "application/json"
    assert "answer" in request.generation_config["responseSchema"]["properties"]
    assert "be brief" in request.prompt_text
