"""A real nats-server runs the accounts and permissions of deploy/nats/values.yaml.

Each service's user can do its own work: create the topology, consume its own durable
consumer, append events, and use its KV buckets and object store. No user can do what
belongs to another service. Above all, the planner cannot publish an executor command.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError
from natsconf import (
    SERVICES,
    Violations,
    connect_as,
    may_publish,
    merge_config,
    render,
    subject_matches,
    users,
)
from stepwise_libs import subjects
from stepwise_libs.events import SessionCreated
from stepwise_libs.jetstream import EventStore, connect, ensure_topology

from stepwise import nats_users
from stepwise.embedded import EmbeddedNats

DENIED_WAIT = 3.0


# Who may publish what, read from values.yaml without a server.
PUBLISH_TABLE = [
    ("stepwise.cmd.planner.generate_plan", {"gateway"}),
    ("stepwise.cmd.executor.x", {"gateway"}),
    ("stepwise.cmd.executor.execute_plan", {"gateway"}),
    ("stepwise.events.3f1c", {"gateway", "planner", "executor"}),
    ("stepwise.executor.inbox.executor-0", {"executor"}),
    ("$KV.stepwise_leases.3f1c", {"executor"}),
    # Secret values: the gateway writes them, only the executor reads them.
    ("$KV.stepwise_secrets.3f1c", {"gateway", "executor"}),
    ("$JS.API.DIRECT.GET.KV_stepwise_secrets.$KV.stepwise_secrets.3f1c", {"executor"}),
    ("$JS.API.STREAM.MSG.GET.KV_stepwise_secrets", {"executor"}),
    ("$O.stepwise_screenshots.C.abc", {"executor"}),
    ("$JS.ACK.STEPWISE_COMMANDS.planner.1.2.3.4.5", {"planner"}),
    ("$JS.ACK.STEPWISE_COMMANDS.executor.1.2.3.4.5", {"executor"}),
    ("$JS.ACK.STEPWISE_EVENTS.projector.1.2.3.4.5", {"projector"}),
    ("$JS.API.CONSUMER.MSG.NEXT.STEPWISE_COMMANDS.executor", {"executor"}),
    ("$JS.API.STREAM.DELETE.STEPWISE_EVENTS", set()),
    ("$JS.API.STREAM.PURGE.STEPWISE_EVENTS", set()),
]


def test_values_match_stepwise_up_permissions() -> None:
    # `stepwise up` gives its embedded nats-server the users of stepwise.nats_users.
    from_values = users()

    assert set(from_values) == set(nats_users.SERVICE_USERS)
    for name in nats_users.SERVICE_USERS:
        assert from_values[name]["permissions"] == nats_users.PERMISSIONS[name], name


@pytest.mark.parametrize(("subject", "publishers"), PUBLISH_TABLE)
def test_values_publish_rights(subject: str, publishers: set[str]) -> None:
    allowed = {name for name, user in users().items() if may_publish(user, subject)}
    assert allowed == publishers, subject


def test_values_planner_cannot_publish_executor_commands() -> None:
    planner = users()["planner"]
    assert not may_publish(planner, "stepwise.cmd.executor.x")
    assert not may_publish(planner, "stepwise.cmd.executor.execute_plan")
    assert may_publish(planner, "stepwise.events.3f1c")


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("stepwise.cmd.planner.*", "stepwise.cmd.planner.generate_plan", True),
        ("stepwise.cmd.planner.*", "stepwise.cmd.executor.x", False),
        ("stepwise.cmd.planner.*", "stepwise.cmd.planner.a.b", False),
        ("$JS.ACK.STEPWISE_COMMANDS.planner.>", "$JS.ACK.STEPWISE_COMMANDS.planner.1", True),
        ("$JS.ACK.STEPWISE_COMMANDS.planner.>", "$JS.ACK.STEPWISE_COMMANDS.planner", False),
        ("a.b", "a.b.c", False),
    ],
)
def test_subject_matching(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


@pytest.fixture
async def clients(
    secured_nats: EmbeddedNats, passwords: dict[str, str]
) -> AsyncIterator[dict[str, tuple[NATS, Violations]]]:
    opened: dict[str, tuple[NATS, Violations]] = {}
    for name in SERVICES:
        violations = Violations()
        opened[name] = (
            await connect_as(secured_nats, name, passwords[name], violations),
            violations,
        )
    yield opened
    for client, _ in opened.values():
        await client.close()


async def test_wrong_password_rejected(secured_nats: EmbeddedNats) -> None:
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await connect_as(secured_nats, "planner", "not-the-password", Violations())


@pytest.mark.parametrize("service", SERVICES)
async def test_each_service_can_create_the_topology(
    clients: dict[str, tuple[NATS, Violations]], service: str
) -> None:
    client, violations = clients[service]
    await ensure_topology(client.jetstream())
    info = await client.jetstream().stream_info(subjects.EVENTS_STREAM)
    assert info.config.name == subjects.EVENTS_STREAM
    assert violations.messages == []


@pytest.mark.parametrize("service", SERVICES)
async def test_each_service_reads_last_event_from_leader(
    clients: dict[str, tuple[NATS, Violations]], service: str
) -> None:
    gateway, _ = clients["gateway"]
    client, violations = clients[service]
    await ensure_topology(gateway.jetstream())
    session_id = f"perm-{secrets.token_hex(8)}"
    appended = await EventStore(gateway.jetstream()).append(
        session_id, SessionCreated(test_case="t", target_url="u", llm_model="offline")
    )

    # The gateway checks a `since` past the end this way, and appenders a retried batch.
    position, seq = await EventStore(client.jetstream()).last(session_id, direct=False)

    assert (position, seq) == (appended.position, 1)
    assert violations.messages == []


async def test_planner_cannot_publish_an_executor_command(
    clients: dict[str, tuple[NATS, Violations]],
) -> None:
    planner, planner_violations = clients["planner"]
    gateway, _ = clients["gateway"]
    await ensure_topology(gateway.jetstream())
    subject = subjects.executor_command_subject("x")
    js = gateway.jetstream()
    before = (await js.stream_info(subjects.COMMANDS_STREAM, subjects_filter=subject)).state

    await planner.publish(subject, b"{}")
    await planner.flush()
    message = await planner_violations.wait_for("Permissions Violation for Publish")
    assert subject in message

    # Through JetStream it fails too: the server drops the message, no ack comes back.
    with pytest.raises(NatsTimeoutError):
        await planner.jetstream().publish(subject, b"{}", timeout=DENIED_WAIT)
    after = (await js.stream_info(subjects.COMMANDS_STREAM, subjects_filter=subject)).state
    assert after.messages == before.messages

    # The gateway, which owns that subject, stores the same command.
    ack = await js.publish(subject, b"{}", headers={"Nats-Msg-Id": secrets.token_hex(8)})
    assert ack.stream == subjects.COMMANDS_STREAM
    stored = (await js.stream_info(subjects.COMMANDS_STREAM, subjects_filter=subject)).state
    assert stored.messages == before.messages + 1
    await _drain_executor_commands(clients)


async def _drain_executor_commands(clients: dict[str, tuple[NATS, Violations]]) -> None:
    executor, _ = clients["executor"]
    subscription = await executor.jetstream().pull_subscribe(
        f"{subjects.EXECUTOR_COMMANDS}.*",
        durable=subjects.EXECUTOR_CONSUMER,
        stream=subjects.COMMANDS_STREAM,
    )
    while True:
        try:
            messages = await subscription.fetch(10, timeout=1.0)
        except TimeoutError:  # nats' TimeoutError is a subclass
            return
        for message in messages:
            await message.ack()


async def test_planner_consumes_its_own_commands_and_appends_events(
    clients: dict[str, tuple[NATS, Violations]],
) -> None:
    gateway, _ = clients["gateway"]
    planner, planner_violations = clients["planner"]
    await ensure_topology(gateway.jetstream())
    command_id = secrets.token_hex(8)
    await gateway.jetstream().publish(
        subjects.planner_command_subject("generate_plan"),
        command_id.encode(),
        headers={"Nats-Msg-Id": command_id},
    )
    subscription = await planner.jetstream().pull_subscribe(
        f"{subjects.PLANNER_COMMANDS}.*",
        durable=subjects.PLANNER_CONSUMER,
        stream=subjects.COMMANDS_STREAM,
    )
    received: list[bytes] = []
    while command_id.encode() not in received:
        for message in await subscription.fetch(10, timeout=5.0):
            received.append(message.data)
            await message.ack()

    store = EventStore(planner.jetstream())
    event = await store.append(
        f"perm-{command_id}", SessionCreated(test_case="t", target_url="u", llm_model="offline")
    )
    assert event.seq == 1
    assert planner_violations.messages == []


async def test_planner_cannot_take_the_executor_consumer(
    clients: dict[str, tuple[NATS, Violations]],
) -> None:
    planner, violations = clients["planner"]
    with pytest.raises((NatsTimeoutError, asyncio.TimeoutError, APIError)):
        await asyncio.wait_for(
            planner.jetstream().pull_subscribe(
                f"{subjects.EXECUTOR_COMMANDS}.*",
                durable=subjects.EXECUTOR_CONSUMER,
                stream=subjects.COMMANDS_STREAM,
            ),
            DENIED_WAIT * 2,
        )
    await violations.wait_for("Permissions Violation for Publish")


async def test_executor_uses_its_buckets_and_object_store(
    clients: dict[str, tuple[NATS, Violations]],
) -> None:
    executor, violations = clients["executor"]
    js = executor.jetstream()
    await ensure_topology(js)
    leases = await js.key_value(subjects.LEASES_BUCKET)
    await leases.put("session-1", b"executor-0")
    assert (await leases.get("session-1")).value == b"executor-0"
    screenshots = await js.object_store(subjects.SCREENSHOTS_BUCKET)
    name = subjects.screenshot_object_name("session-1", 1, 1)
    await screenshots.put(name, b"\x89PNG fake bytes")
    assert violations.messages == []

    # The gateway reads the screenshot back for the web UI.
    gateway, gateway_violations = clients["gateway"]
    stored = await (await gateway.jetstream().object_store(subjects.SCREENSHOTS_BUCKET)).get(name)
    assert stored.data == b"\x89PNG fake bytes"
    assert gateway_violations.messages == []


async def test_projector_reads_events_but_cannot_append(
    clients: dict[str, tuple[NATS, Violations]],
) -> None:
    gateway, _ = clients["gateway"]
    projector, violations = clients["projector"]
    await ensure_topology(gateway.jetstream())
    session_id = f"perm-{secrets.token_hex(8)}"
    await EventStore(gateway.jetstream()).append(
        session_id, SessionCreated(test_case="t", target_url="u", llm_model="offline")
    )

    subscription = await projector.jetstream().pull_subscribe(
        f"{subjects.EVENTS_PREFIX}.*",
        durable=subjects.PROJECTOR_CONSUMER,
        stream=subjects.EVENTS_STREAM,
    )
    seen: list[str] = []
    while subjects.session_events_subject(session_id) not in seen:
        for message in await subscription.fetch(50, timeout=5.0):
            seen.append(message.subject)
            await message.ack()

    # The gateway tails the session from the start, as a reconnecting client would.
    tail = EventStore(gateway.jetstream()).tail(session_id, 0)
    first = await asyncio.wait_for(anext(tail), 5.0)
    assert first.session_id == session_id
    await tail.aclose()

    await projector.publish(subjects.session_events_subject(session_id), b"{}")
    await projector.flush()
    message = await violations.wait_for("Permissions Violation for Publish")
    assert subjects.session_events_subject(session_id) in message


def test_rendered_config_users(tmp_path: Path) -> None:
    config = render(merge_config())
    for service in SERVICES:
        assert f'"user": "{service}"' in config
        assert f"${service.upper()}_PASSWORD" in config
    assert set(users()) == set(SERVICES)


# Keep this test last in the file: it reads the server log the tests above produced.
def test_server_log_expected_violations_only(secured_nats: EmbeddedNats) -> None:
    expected = (
        '"STEPWISE/user:planner" - Publish Violation - Subject "stepwise.cmd.executor.x"',
        '"STEPWISE/user:planner" - Publish Violation - Subject '
        '"$JS.API.CONSUMER.INFO.STEPWISE_COMMANDS.executor"',
        '"STEPWISE/user:projector" - Publish Violation - Subject "stepwise.events.perm-',
    )
    log = secured_nats.log_path.read_text()
    violations = [line for line in log.splitlines() if "Violation" in line]
    unexpected = [line for line in violations if not any(text in line for text in expected)]
    assert unexpected == [], "a service lacks a permission it uses:\n" + "\n".join(unexpected)


async def test_denied_request_logged_as_permissions(
    secured_nats: EmbeddedNats, passwords: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    host_port = secured_nats.url.removeprefix("nats://")
    client = await connect(f"nats://planner:{passwords['planner']}@{host_port}", "planner")
    try:
        with caplog.at_level(logging.WARNING, logger="stepwise_libs.jetstream"):
            await client.publish("stepwise.cmd.executor.x", b"{}")
            await client.flush()
            deadline = asyncio.get_running_loop().time() + DENIED_WAIT
            while not any("denied" in record.getMessage() for record in caplog.records):
                assert asyncio.get_running_loop().time() < deadline, caplog.text
                await asyncio.sleep(0.05)
    finally:
        await client.close()

    denied = [record for record in caplog.records if "denied" in record.getMessage()]
    assert denied[0].levelno == logging.ERROR
    assert "stepwise.cmd.executor.x" in denied[0].getMessage()
    assert "permissions" in denied[0].getMessage()
    assert not any("connection error" in record.getMessage() for record in caplog.records)
