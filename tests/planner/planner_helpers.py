"""Helpers of the planner tests: creating sessions and waiting for their plan events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from stepwise_libs.events import Event, SessionCreated
from stepwise_libs.jetstream import EventStore


async def create_session(
    store: EventStore, test_case: str, llm_model: str = "offline", target_url: str = ""
) -> str:
    """Append `session_created` for a new session and return its id."""
    session_id = str(uuid.uuid4())
    await store.append(
        session_id,
        SessionCreated(
            test_case=test_case,
            target_url=target_url or f"http://127.0.0.1:9/shop-{session_id}/",
            llm_model=llm_model,
        ),
    )
    return session_id


async def wait_for_event(
    store: EventStore,
    session_id: str,
    predicate: Callable[[Event], bool],
    within: float = 20.0,
) -> list[Event]:
    """Return the session's events up to the first one matching `predicate`, waiting `within` s."""
    seen: list[Event] = []

    async def collect() -> list[Event]:
        async for event in store.tail(session_id):
            seen.append(event)
            if predicate(event):
                return seen
        raise AssertionError("the tail ended")

    try:
        return await asyncio.wait_for(collect(), within)
    except TimeoutError:
        types = [event.type for event in seen]
        raise AssertionError(f"no matching event within {within} s; saw {types}") from None


def is_plan_end(event: Event) -> bool:
    return event.type in ("plan_completed", "plan_failed", "command_rejected")
