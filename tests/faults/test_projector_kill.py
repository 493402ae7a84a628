"""SIGKILL the projector again and again during a run; then rebuild the read models twice."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from support.readmodels import assert_read_models_match_stream, dump, read_model_snapshot

from .harness import (
    WITHOUT_EXECUTOR,
    alive,
    assert_consistent,
    create_session,
    fault_stack,
    restart,
    run_projector_command,
    sigkill,
    wait_for_stream,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]

SESSIONS = 20
KILLS = 5


async def test_projector_killed_five_times_loses_nothing() -> None:
    with fault_stack(names=WITHOUT_EXECUTOR) as stack:
        session_ids: list[str] = []
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            for _ in range(KILLS):
                batch = await asyncio.gather(
                    *(create_session(client) for _ in range(SESSIONS // KILLS))
                )
                session_ids += batch
                # Kill it while the planner is still appending the batch's plan events.
                sigkill(stack, "projector")
                restart(stack, "projector")
        await wait_for_stream(stack.nats_url, session_ids)
        alive(stack, "projector", "planner", "gateway")
        await assert_consistent(stack, session_ids)

        stack.stop_service("projector")
        run_projector_command(stack, "rebuild")
        first = await read_model_snapshot(stack.database_url)
        run_projector_command(stack, "rebuild")
        second = await read_model_snapshot(stack.database_url)
        assert len(first["sessions"]) == SESSIONS
        assert first == second, dump(first) + "\n---\n" + dump(second)
        await assert_read_models_match_stream(stack.database_url, stack.nats_url)
        restart(stack, "projector")
