import asyncio
import uuid

import pytest
from nats.aio.client import Client as NATS
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore


def new_session() -> str:
    return uuid.uuid4().hex


async def append_progress(store: EventStore, session_id: str, tag: str, count: int) -> None:
    for index in range(count):
        await store.append(session_id, ev.PlanProgress(plan_id=tag, message=str(index)))


async def test_concurrent_writers_keep_seq_dense(nats_client: NATS) -> None:
    session_id = new_session()
    first, second = EventStore(nats_client.jetstream()), EventStore(nats_client.jetstream())

    await asyncio.gather(
        append_progress(first, session_id, "first", 40),
        append_progress(second, session_id, "second", 40),
    )

    events = await first.read(session_id)
    assert [event.seq for event in events] == list(range(1, 81))
    assert sorted(
        event.data["message"] for event in events if event.data["plan_id"] == "first"
    ) == sorted(str(index) for index in range(40))
    positions = [event.position for event in events]
    assert positions == sorted(positions)


async def test_retried_event_id_is_stored_once(nats_client: NATS) -> None:
    session_id = new_session()
    store = EventStore(nats_client.jetstream())
    payload = ev.BrowserClosed(reason="test")

    first = await store.append(session_id, payload, event_id="fixed-id-" + session_id)
    store.forget(session_id)
    again = await store.append(session_id, payload, event_id="fixed-id-" + session_id)

    assert again.seq == first.seq == 1
    assert [event.seq for event in await store.read(session_id)] == [1]


@pytest.mark.parametrize("since", [0, 1, 17, 59])
async def test_position_after_finds_next_event(nats_client: NATS, since: int) -> None:
    session_id, other = new_session(), new_session()
    store = EventStore(nats_client.jetstream())
    # Interleave another session so positions are not contiguous.
    for index in range(60):
        await store.append(session_id, ev.PlanProgress(plan_id="p", message=str(index)))
        if index % 3 == 0:
            await store.append(other, ev.PlanProgress(plan_id="q", message=str(index)))

    events = await store.read(session_id)
    expected = next(event.position for event in events if event.seq == since + 1)

    assert await store.position_after(session_id, since) == expected
    assert await store.position_after(session_id, 60) is None


async def test_tail_resumes_after_since_then_live(nats_client: NATS) -> None:
    session_id = new_session()
    store = EventStore(nats_client.jetstream())
    await append_progress(store, session_id, "p", 10)
    received: list[int] = []
    caught_up = asyncio.Event()

    async def consume() -> None:
        async for event in store.tail(session_id, since=7):
            received.append(event.seq)
            if event.seq == 10:
                caught_up.set()
            if event.seq == 12:
                return

    consumer = asyncio.create_task(consume())
    # The two live events go in only after the stored ones have arrived.
    await asyncio.wait_for(caught_up.wait(), 10)
    await append_progress(store, session_id, "live", 2)
    await asyncio.wait_for(consumer, 10)

    assert received == [8, 9, 10, 11, 12]


async def test_tail_replaces_a_stalled_consumer(nats_client: NATS) -> None:
    session_id = new_session()
    js = nats_client.jetstream()
    store = EventStore(js)
    await append_progress(store, session_id, "p", 3)
    received: list[int] = []
    caught_up = asyncio.Event()

    async def consume() -> None:
        async for event in store.tail(session_id, idle_timeout=0.5):
            received.append(event.seq)
            if event.seq == 3:
                caught_up.set()
            if event.seq == 6:
                return

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(caught_up.wait(), 10)

    # Deleting the consumer on the server leaves the subscription waiting for messages
    # that never come, as a consumer does whose stream changed leader.
    subject = subjects.session_events_subject(session_id)
    deleted = 0
    for info in await js.consumers_info(subjects.EVENTS_STREAM):
        if info.config.filter_subject == subject:
            await js.delete_consumer(subjects.EVENTS_STREAM, info.name)
            deleted += 1
    assert deleted == 1
    await append_progress(store, session_id, "after", 3)

    # Without the idle check, the tail waits here for longer than this bound.
    await asyncio.wait_for(consumer, 4)
    assert received == [1, 2, 3, 4, 5, 6]
