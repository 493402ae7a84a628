"""Steps run by Gemini through browser-use's ChatGoogle, against the fake Gemini server on loopback."""

from __future__ import annotations

from typing import Any

from fakes.gemini import FakeGemini, RecordedRequest, Reply
from nats.aio.client import Client as NATS

from stepwise.sample_site import SampleSite

from .test_run import run_plan

MODEL = "gemini-2.5-flash"


def agent_output(action: dict[str, Any], goal: str) -> dict[str, Any]:
    return {
        "thinking": f"I will {goal}.",
        "evaluation_previous_goal": "",
        "memory": "",
        "next_goal": goal,
        "action": [action],
    }


def script_open_and_done(fake: FakeGemini, url: str) -> None:
    fake.reply_json(
        agent_output({"navigate": {"url": url, "new_tab": False}}, "open the login page")
    )
    fake.reply_json(
        agent_output({"done": {"text": "The login page is open", "success": True}}, "finish")
    )


def gemini_env(fake: FakeGemini) -> dict[str, str]:
    return {"GEMINI_API_KEY": "test-key", "STEPWISE_GEMINI_BASE_URL": fake.base_url}


async def test_gemini_runs_one_step(
    nats_client: NATS, sample_site: SampleSite, fake_gemini: FakeGemini, make_settings
) -> None:
    script_open_and_done(fake_gemini, sample_site.base_url)
    _, events = await run_plan(
        nats_client,
        make_settings(**gemini_env(fake_gemini)),
        "Open the login page",
        sample_site.base_url,
        MODEL,
    )
    types = [event.type for event in events]
    assert "step_failed" not in types, [
        event.data for event in events if event.type == "step_failed"
    ]
    completed = next(event.data for event in events if event.type == "step_completed")
    assert [action["name"] for action in completed["actions"]] == ["navigate"]
    assert "I will open the login page." in completed["thinking"]
    requests: list[RecordedRequest] = fake_gemini.requests
    assert len(requests) == 2
    assert all(request.model == MODEL for request in requests)
    assert "Open the login page" in requests[0].prompt_text
    assert types[-2:] == ["execution_completed", "browser_closed"]


async def test_gemini_503_twice_then_success(
    nats_client: NATS, sample_site: SampleSite, fake_gemini: FakeGemini, make_settings
) -> None:
    fake_gemini.reply_status(503, times=2)
    script_open_and_done(fake_gemini, sample_site.base_url)
    _, events = await run_plan(
        nats_client,
        make_settings(**gemini_env(fake_gemini)),
        "Open the login page",
        sample_site.base_url,
        MODEL,
    )
    retries = [
        event.data["action"]
        for event in events
        if event.type == "action_executed" and event.data["action"]["name"] == "model_retry"
    ]
    assert [retry["params"]["attempt"] for retry in retries] == [1, 2]
    assert all("503" in retry["error"] for retry in retries)
    assert any(event.type == "step_completed" for event in events)
    assert len(fake_gemini.requests) == 4


async def test_gemini_always_503_fails_step(
    nats_client: NATS, sample_site: SampleSite, fake_gemini: FakeGemini, make_settings
) -> None:
    fake_gemini.always_status(503)
    _, events = await run_plan(
        nats_client,
        make_settings(**gemini_env(fake_gemini)),
        "Open the login page",
        sample_site.base_url,
        MODEL,
    )
    retries = [
        event
        for event in events
        if event.type == "action_executed" and event.data["action"]["name"] == "model_retry"
    ]
    assert len(retries) == 3
    failed = next(event.data for event in events if event.type == "step_failed")
    assert failed["category"] == "model_error"
    assert "after 3 retries" in failed["error"]
    assert "503" in failed["error"]
    assert len(fake_gemini.requests) == 4
    assert [event.type for event in events][-2:] == ["execution_failed", "browser_closed"]


async def test_gemini_invalid_output_fails_step(
    nats_client: NATS, sample_site: SampleSite, fake_gemini: FakeGemini, make_settings
) -> None:
    fake_gemini.default = Reply(text="this is not JSON")
    _, events = await run_plan(
        nats_client,
        make_settings(**gemini_env(fake_gemini)),
        "Open the login page",
        sample_site.base_url,
        MODEL,
    )
    failed = next(event.data for event in events if event.type == "step_failed")
    assert failed["category"] == "invalid_model_output"
    assert len(fake_gemini.requests) == 3


async def test_gemini_400_fails_without_retry(
    nats_client: NATS, sample_site: SampleSite, fake_gemini: FakeGemini, make_settings
) -> None:
    fake_gemini.reply_status(400, "API key not valid")
    _, events = await run_plan(
        nats_client,
        make_settings(**gemini_env(fake_gemini)),
        "Open the login page",
        sample_site.base_url,
        MODEL,
    )
    failed = next(event.data for event in events if event.type == "step_failed")
    assert failed["category"] == "model_error"
    assert "API key not valid" in failed["error"]
    assert not any(event.type == "action_executed" for event in events)
    assert len(fake_gemini.requests) == 1
