import asyncio
import uuid
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore, _Pending, connect, ensure_topology

from stepwise.embedded import EmbeddedNats


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


async def burst(store: EventStore, session_id: str, tag: str, count: int) -> list[ev.Event]:
    """Start `count` appends without awaiting each, as a caller that pipelines does."""
    return await asyncio.gather(
        *(
            store.append(session_id, ev.PlanProgress(plan_id=tag, message=str(index)))
            for index in range(count)
        )
    )


async def batch_ids(nats_client: NATS, events: list[ev.Event]) -> set[str]:
    """The Nats-Batch-Id headers the stored messages of these events carry."""
    js = nats_client.jetstream()
    found = set()
    for event in events:
        message = await js.get_msg(subjects.EVENTS_STREAM, seq=event.position, direct=True)
        batch_id = (message.headers or {}).get("Nats-Batch-Id")
        if batch_id is not None:
            found.add(batch_id)
    return found


async def test_burst_is_stored_in_call_order(nats_client: NATS) -> None:
    session_id = new_session()
    store = EventStore(nats_client.jetstream())

    returned = await burst(store, session_id, "burst", 2500)

    stored = await store.read(session_id)
    assert [event.seq for event in stored] == list(range(1, 2501))
    assert [event.data["message"] for event in stored] == [str(index) for index in range(2500)]
    assert [(event.seq, event.position) for event in returned] == [
        (event.seq, event.position) for event in stored
    ]
    # More than one batch: the server takes at most 1,000 messages in one.
    assert len(await batch_ids(nats_client, stored)) >= 3


async def test_burst_and_other_writer_keep_seq_dense(nats_client: NATS) -> None:
    session_id = new_session()
    first, second = EventStore(nats_client.jetstream()), EventStore(nats_client.jetstream())

    await asyncio.gather(
        burst(first, session_id, "first", 600),
        append_progress(second, session_id, "second", 60),
    )

    stored = await first.read(session_id)
    assert [event.seq for event in stored] == list(range(1, 661))
    for tag, count in (("first", 600), ("second", 60)):
        messages = [event.data["message"] for event in stored if event.data["plan_id"] == tag]
        assert messages == [str(index) for index in range(count)]


async def test_cancelled_waiting_append_is_not_stored(nats_client: NATS) -> None:
    session_id = new_session()
    store = EventStore(nats_client.jetstream())
    tasks = [
        asyncio.create_task(store.append(session_id, ev.PlanProgress(plan_id="p", message=name)))
        for name in ("a", "b", "c")
    ]
    # Let each task start: "a" writes, "b" and "c" wait for the session's lock.
    await asyncio.sleep(0)
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(results[1], asyncio.CancelledError)
    stored = await store.read(session_id)
    assert [event.data["message"] for event in stored] == ["a", "c"]
    assert [event.seq for event in stored] == [1, 2]


def batch_in_flight(store: EventStore, session_id: str) -> bool:
    """Whether the session's queued appends have all been claimed by a running drain."""
    writes = store._writes.get(session_id)
    return writes is not None and writes.drain is not None and not writes.queue


async def test_cancelled_caller_in_batch_keeps_event(nats_client: NATS) -> None:
    session_id = new_session()
    store = EventStore(nats_client.jetstream())
    await store.append(session_id, ev.PlanProgress(plan_id="p", message="first"))
    tasks = [
        asyncio.create_task(
            store.append(session_id, ev.PlanProgress(plan_id="p", message=str(index)))
        )
        for index in range(100)
    ]
    # Task 0 writes its event by itself; the other 99 wait, then go as one batch.
    # Cancel one of them while that batch is being written.
    deadline = asyncio.get_running_loop().time() + 10
    while not batch_in_flight(store, session_id):
        assert asyncio.get_running_loop().time() < deadline, "no batch started in 10 s"
        await asyncio.sleep(0)
    tasks[50].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(results[50], asyncio.CancelledError)
    others = results[:50] + results[51:]
    assert [type(result) for result in others] == [ev.Event] * 99
    stored = await store.read(session_id)
    assert [event.seq for event in stored] == list(range(1, 102))
    assert [event.data["message"] for event in stored[1:]] == [str(index) for index in range(100)]


async def test_retried_batch_is_stored_once(nats_client: NATS) -> None:
    session_id = new_session()
    store = EventStore(nats_client.jetstream())
    await store.append(session_id, ev.PlanProgress(plan_id="p", message="first"))
    before = store._tails[session_id]
    events = await burst(store, session_id, "batch", 100)
    assert len(await batch_ids(nats_client, events)) == 1

    # As after a lost acknowledgement: the writer still has the tail from before the
    # batch and sends the same events again.
    store._tails[session_id] = before
    again = [_Pending(event) for event in events]
    await store._append_batch(session_id, again)

    stored = await store.read(session_id)
    assert [event.seq for event in stored] == list(range(1, 102))
    assert [pending.future.result().position for pending in again] == [
        event.position for event in events
    ]


async def test_stream_without_atomic_batches_appends_one_by_one(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        client = await connect(server.url, "tests")
        try:
            js = client.jetstream()
            await ensure_topology(js)
            config = (await js.stream_info(subjects.EVENTS_STREAM)).config
            config.allow_atomic = False
            await js.update_stream(config)
            session_id = new_session()
            store = EventStore(js)

            await burst(store, session_id, "burst", 100)

            stored = await store.read(session_id)
            assert [event.seq for event in stored] == list(range(1, 101))
            assert [event.data["message"] for event in stored] == [str(i) for i in range(100)]
            assert await batch_ids(client, stored) == set()
        finally:
            await client.close()
    finally:
        server.stop()
