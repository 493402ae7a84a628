"""Secret placeholders in a real Chromium: the value is typed, and stays out of events and logs."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fakes.gemini import FakeGemini, RecordedRequest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from stepwise_executor.secrets import REGISTRY, install_log_redaction
from stepwise_executor.session import LiveSession
from stepwise_executor.settings import ExecutorSettings
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.fold import fold
from stepwise_libs.jetstream import EventStore
from stepwise_libs.phrases import split_test_case
from stepwise_libs.secrets import store_secrets
from support.login_site import LoginSite, login_test_case, random_secret

from .test_gemini import agent_output, gemini_env


@pytest.fixture
def login_site() -> Iterator[LoginSite]:
    with LoginSite(random_secret(), random_secret()) as site:
        yield site


async def run_live(
    js: JetStreamContext,
    settings: ExecutorSettings,
    test_case: str,
    target_url: str,
    secrets: dict[str, str] | None,
    secret_names: list[str],
    model: str = "offline",
    mode: str = "execution",
) -> LiveSession:
    """Plan a session and run it in-process until its task ends; return the live session."""
    store = EventStore(js)
    session_id = str(uuid.uuid4())
    if secrets is not None:
        await store_secrets(js, session_id, secrets)

    steps = split_test_case(test_case)
    await store.append(
        session_id,
        ev.SessionCreated(
            test_case=test_case, target_url=target_url, llm_model=model, secret_names=secret_names
        ),
    )
    await store.append(session_id, ev.PlanStarted(plan_id="plan-1", model=model))
    await store.append(
        session_id,
        ev.PlanCompleted(
            plan_id="plan-1",
            plan_text=test_case,
            steps=[ev.PlanStep(number=n, description=s) for n, s in enumerate(steps, 1)],
        ),
    )

    live = LiveSession(js, store, settings, fold(session_id, await store.read(session_id)))
    live.start_execution("task-1", "command-1", mode)
    assert live.task is not None
    await live.task
    return live


async def run_session(
    js: JetStreamContext,
    settings: ExecutorSettings,
    test_case: str,
    target_url: str,
    secrets: dict[str, str] | None,
    secret_names: list[str],
    model: str = "offline",
) -> tuple[str, list[ev.Event], list[bytes]]:
    """Run a planned session to its end; return its id, events and the events' stored bytes."""
    live = await run_live(js, settings, test_case, target_url, secrets, secret_names, model)

    events = await EventStore(js).read(live.session_id)
    raw = [
        (await js.get_msg(subjects.EVENTS_STREAM, seq=event.position or 0)).data or b""
        for event in events
    ]
    return live.session_id, events, raw


async def secrets_entry_gone(js: JetStreamContext, session_id: str) -> bool:
    bucket = await js.key_value(subjects.SECRETS_BUCKET)
    try:
        await bucket.get(session_id)
    except (KeyNotFoundError, KeyDeletedError):
        return True
    return False


async def test_offline_model_types_secret_values(
    nats_client: NATS, login_site: LoginSite, make_settings
) -> None:
    js = nats_client.jetstream()
    values = {"user": login_site.username, "password": login_site.password}

    session_id, events, raw = await run_session(
        js, make_settings(), login_test_case(), login_site.url, values, ["user", "password"]
    )

    failures = [event.data for event in events if event.type == "step_failed"]
    assert failures == []
    assert login_site.attempts == [(login_site.username, login_site.password)]
    for value in values.values():
        assert all(value.encode() not in data for data in raw)
    typed = [
        event.data["action"]["params"]["text"]
        for event in events
        if event.type == "action_executed" and event.data["action"]["name"] == "input"
    ]
    assert typed == ["<secret>user</secret>", "<secret>password</secret>"]
    assert [event.type for event in events][-2:] == ["execution_completed", "browser_closed"]
    assert await secrets_entry_gone(js, session_id)
    assert not REGISTRY.active


def _element_index(request: RecordedRequest, pattern: str) -> int:
    # The last match is in the page's state; the system prompt's examples come first.
    found = re.findall(r"\[(\d+)\]<" + pattern, request.prompt_text)
    assert found, f"no element matching {pattern!r} in:\n{request.prompt_text}"
    return int(found[-1])


def _done(goal: str) -> dict[str, Any]:
    return agent_output({"done": {"text": goal, "success": True}}, goal)


async def test_gemini_gets_names_never_values(
    nats_client: NATS, login_site: LoginSite, fake_gemini: FakeGemini, make_settings
) -> None:
    js = nats_client.jetstream()
    values = {"user": login_site.username, "password": login_site.password}
    fake_gemini.reply_json(
        agent_output({"navigate": {"url": login_site.url, "new_tab": False}}, "open the page")
    )
    fake_gemini.reply_json(_done("The login page is open"))
    for name, field in (("user", "username"), ("password", "password")):
        fake_gemini.reply_with(
            lambda request, name=name, field=field: agent_output(
                {
                    "input": {
                        "index": _element_index(request, f"input[^\\n]*{field}"),
                        "text": f"<secret>{name}</secret>",
                    }
                },
                f"type the {name}",
            )
        )
        fake_gemini.reply_json(_done(f"Typed the {name}"))
    fake_gemini.reply_with(
        lambda request: agent_output(
            {"click": {"index": _element_index(request, "button")}}, "log in"
        )
    )
    fake_gemini.reply_json(_done("Logged in"))
    fake_gemini.reply_json(_done("The page shows You are logged in"))

    _, events, raw = await run_session(
        js,
        make_settings(**gemini_env(fake_gemini)),
        login_test_case(),
        login_site.url,
        values,
        ["user", "password"],
        model="gemini-2.5-flash",
    )

    failures = [event.data for event in events if event.type == "step_failed"]
    assert failures == []
    assert login_site.attempts == [(login_site.username, login_site.password)]
    assert fake_gemini.unscripted == []
    sent = [json.dumps(request.body) for request in fake_gemini.requests]
    assert len(sent) == 9
    for value in values.values():
        assert all(value not in body for body in sent)
        assert all(value.encode() not in data for data in raw)
    # The step's task names the secret as browser-use expects it.
    assert "<secret>password</secret>" in fake_gemini.requests[4].prompt_text
    # The username typed in step 2 is in the page state of step 3, masked as its tag.
    assert "<secret>user</secret>" in fake_gemini.requests[4].prompt_text


async def test_missing_bucket_entry_fails_step(
    nats_client: NATS, login_site: LoginSite, make_settings
) -> None:
    _, events, _ = await run_session(
        nats_client.jetstream(),
        make_settings(),
        'Open the login page\nType "{{password}}" into "Password"',
        login_site.url,
        None,
        ["password"],
    )

    failed = [event.data for event in events if event.type == "step_failed"]
    assert [item["step_number"] for item in failed] == [2]
    assert failed[0]["category"] == "secret_missing"
    assert "stepwise_secrets" in failed[0]["error"]
    assert "create a new session" in failed[0]["error"]


async def test_placeholder_without_secret_fails_step(
    nats_client: NATS, login_site: LoginSite, make_settings
) -> None:
    _, events, _ = await run_session(
        nats_client.jetstream(),
        make_settings(),
        'Open the login page\nType "{{token}}" into "Password"',
        login_site.url,
        {"password": "unused-value"},
        ["password"],
    )

    failed = [event.data for event in events if event.type == "step_failed"]
    assert [item["step_number"] for item in failed] == [2]
    assert failed[0]["category"] == "secret_missing"
    assert "{{token}}" in failed[0]["error"]
    assert "password" in failed[0]["error"]
    assert login_site.attempts == []


def test_registry_redacts_payload_strings() -> None:
    REGISTRY.add("session-a", {"password": "pa55-word", "pin": "55"})
    try:
        payload = ev.StepFailed(
            task_id="t",
            step_number=1,
            error="typed pa55-word at http://site/?pin=55",
            actions=[ev.ActionRecord(name="input", params={"text": "pa55-word"})],
        )
        redacted = REGISTRY.redact_payload(payload)
    finally:
        REGISTRY.discard("session-a")

    assert redacted.error == "typed {{password}} at http://site/?pin={{pin}}"
    assert redacted.actions[0].params == {"text": "{{password}}"}
    assert not REGISTRY.active


def test_log_redaction_covers_args_extras_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    factory = logging.getLogRecordFactory()
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_log_redaction()
        REGISTRY.add("session-b", {"password": "s3cr3t-value"})
        logger = logging.getLogger("tests.secrets")
        with caplog.at_level(logging.INFO):
            logger.info("typed %s", "s3cr3t-value", extra={"url": "http://x/?p=s3cr3t-value"})
            try:
                raise ValueError("bad s3cr3t-value")
            except ValueError:
                logger.exception("failed")
        formatter = logging.Formatter("%(message)s %(url)s", defaults={"url": ""})
        lines = [formatter.format(record) for record in caplog.records]
    finally:
        REGISTRY.discard("session-b")
        logging.setLogRecordFactory(factory)
        root.removeHandler(handler)

    assert lines[0].startswith("typed {{password}}")
    assert all("s3cr3t-value" not in line for line in lines)
    assert "bad {{password}}" in lines[1]
    assert "ValueError" in lines[1]
    assert caplog.records[0].url == "http://x/?p={{password}}"


async def test_offline_check_with_placeholder_fails(
    nats_client: NATS, login_site: LoginSite, make_settings
) -> None:
    _, events, raw = await run_session(
        nats_client.jetstream(),
        make_settings(),
        'Open the login page\nCheck that the page shows "{{password}}"',
        login_site.url,
        {"password": login_site.password},
        ["password"],
    )

    failed = [event.data for event in events if event.type == "step_failed"]
    assert [item["step_number"] for item in failed] == [2]
    assert "{{password}}" in failed[0]["error"]
    assert "only into Type and Select steps" in failed[0]["error"]
    assert all(login_site.password.encode() not in data for data in raw)


async def test_open_profile_keeps_no_value(
    nats_client: NATS, login_site: LoginSite, make_settings
) -> None:
    # Run till end pauses at the failing last step with the browser open after the login.
    live = await run_live(
        nats_client.jetstream(),
        make_settings(),
        login_test_case() + 'Check that the page shows "Never shown"\n',
        login_site.url,
        {"user": login_site.username, "password": login_site.password},
        ["user", "password"],
        mode="run_till_end",
    )
    try:
        assert live.browser.is_open
        assert login_site.attempts == [(login_site.username, login_site.password)]
        holders = [
            str(path)
            for path in live.browser.folder.rglob("*")
            if path.is_file()
            and any(
                value.encode() in path.read_bytes()
                for value in (login_site.username, login_site.password)
            )
        ]
    finally:
        await live.close_browser("execution finished", None)

    assert holders == []
