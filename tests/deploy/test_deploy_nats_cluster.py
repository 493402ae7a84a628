"""Three nats-server processes clustered on loopback, with the accounts of values.yaml.

This is the shape the NATS Helm chart runs in prod: a 3-node cluster with JetStream,
and Stepwise's streams at 3 replicas (STEPWISE_STREAM_REPLICAS=3). Killing the node
that leads the events stream loses no event, and appends go on.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError, ServiceUnavailableError
from natsconf import ensure_topology_when_formed
from stepwise_libs import subjects
from stepwise_libs.events import Event, SessionCreated
from stepwise_libs.jetstream import EventStore

from stepwise.embedded import EmbeddedNats

REPLICAS = 3
FORM_TIMEOUT = 60.0


@pytest.fixture
async def gateway_client(
    cluster: list[EmbeddedNats], passwords: dict[str, str]
) -> AsyncIterator[NATS]:
    client = await nats.connect(
        servers=[node.url for node in cluster],
        user="gateway",
        password=passwords["gateway"],
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        connect_timeout=5,
    )
    yield client
    await client.close()


async def _wait_for_new_leader(client: NATS, old_leader: str | None) -> str:
    async with asyncio.timeout(FORM_TIMEOUT):
        while True:
            try:
                info = await client.jetstream().stream_info(subjects.EVENTS_STREAM)
            except (ServiceUnavailableError, nats.errors.TimeoutError, APIError):
                info = None
            if info is not None and info.cluster is not None:
                leader = info.cluster.leader
                if leader is not None and leader != old_leader:
                    return leader
            await asyncio.sleep(0.1)


async def _read_all(js: JetStreamContext, session_id: str, count: int) -> list[Event]:
    events: list[Event] = []
    try:
        async with asyncio.timeout(FORM_TIMEOUT):
            while len(events) < count:
                events = await EventStore(js).read(session_id)
                if len(events) < count:
                    await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"read {len(events)} of {count} events in {FORM_TIMEOUT} s") from None
    return events


async def test_cluster_keeps_events_when_leader_dies(
    cluster: list[EmbeddedNats], gateway_client: NATS
) -> None:
    await ensure_topology_when_formed(gateway_client.jetstream(), REPLICAS)
    js = gateway_client.jetstream()
    for stream in (subjects.EVENTS_STREAM, subjects.COMMANDS_STREAM):
        info = await js.stream_info(stream)
        assert info.config.num_replicas == REPLICAS, stream
    for bucket in (subjects.CONTROL_BUCKET, subjects.LEASES_BUCKET):
        status = await (await js.key_value(bucket)).status()
        assert status.stream_info.config.num_replicas == REPLICAS, bucket

    store = EventStore(js)
    session_id = "cluster-session"
    for _ in range(10):
        await store.append(
            session_id, SessionCreated(test_case="t", target_url="u", llm_model="offline")
        )

    # Kill the node that leads the events stream, the worst one to lose.
    info = await js.stream_info(subjects.EVENTS_STREAM)
    assert info.cluster is not None
    leader = info.cluster.leader
    [victim] = [node for node in cluster if node.log_path.parent.name == leader]
    assert victim.process is not None
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    # Appends right away: while the stream elects a leader, EventStore.append retries.
    for _ in range(10):
        await store.append(
            session_id, SessionCreated(test_case="t", target_url="u", llm_model="offline")
        )
    new_leader = await _wait_for_new_leader(gateway_client, leader)

    # The leader's count first: a direct get may be served by a follower.
    after = await js.stream_info(subjects.EVENTS_STREAM)
    assert after.cluster is not None
    assert after.cluster.leader == new_leader
    assert new_leader != leader
    assert after.state.messages == 20
    # NOTE: EventStore reads with direct gets, which any replica may serve. A follower
    # can lag the leader for a moment, so a read right after an append may end one
    # event short. The read is retried until it is complete or the time is up.
    events = await _read_all(js, session_id, 20)
    assert [event.seq for event in events] == list(range(1, 21))
    assert len({event.id for event in events}) == 20
