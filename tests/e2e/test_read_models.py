"""The read models equal a fold of the events stream, and a rebuild reproduces them."""

from __future__ import annotations

import asyncio

import pytest
from stepwise_libs import subjects
from stepwise_libs.jetstream import connect
from support.readmodels import (
    assert_read_models_match_stream,
    dump,
    read_model_snapshot,
    wait_for_position,
    wait_for_sessions,
)

from stepwise.stack import Stack, service_command

from .conftest import SampleRuns

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


async def stream_last_position(nats_url: str) -> int:
    client = await connect(nats_url, "tests")
    try:
        info = await client.jetstream().stream_info(subjects.EVENTS_STREAM)
        return int(info.state.last_seq)
    finally:
        await client.close()


async def assert_projection_settled(stack: Stack) -> None:
    """Compare read models with the stream once the projector has reached the stream's end.

    Sessions of earlier tests may still append (browser_closed follows a run's end), so a
    mismatch is only a failure when the stream did not move during the comparison.
    """
    for _ in range(5):
        position = await stream_last_position(stack.nats_url)
        await wait_for_position(stack.database_url, position)
        try:
            await assert_read_models_match_stream(stack.database_url, stack.nats_url)
            return
        except AssertionError:
            if await stream_last_position(stack.nats_url) == position:
                raise
    await assert_read_models_match_stream(stack.database_url, stack.nats_url)


async def test_read_models_match_stream_and_rebuild(stack: Stack, sample_runs: SampleRuns) -> None:
    runs = [sample_runs.checkout, sample_runs.failing]
    await wait_for_sessions(stack.database_url, {run.session_id: run.last_seq for run in runs})

    # What the running projector wrote equals a fold of the whole stream.
    await assert_projection_settled(stack)
    before = await read_model_snapshot(stack.database_url)
    assert {run.session_id for run in runs} <= {row["session_id"] for row in before["sessions"]}

    # Rebuild with the projector stopped, so that only the rebuild writes.
    stack.stop_service("projector")
    try:
        rebuild = await asyncio.create_subprocess_exec(
            *service_command("projector"),
            "rebuild",
            env=stack.services["projector"].env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(300):
            output, _ = await rebuild.communicate()
        assert rebuild.returncode == 0, output.decode(errors="replace")
        after = await read_model_snapshot(stack.database_url)
        assert after == before, f"rebuild changed the rows:\n{dump(before)}\n---\n{dump(after)}"
        await assert_read_models_match_stream(stack.database_url, stack.nats_url)
    finally:
        stack.start_service("projector")
