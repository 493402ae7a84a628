"""A command whose session id cannot be part of a NATS subject must not jam its consumer."""

from __future__ import annotations

import httpx
import pytest
from faults.harness import WITHOUT_EXECUTOR, alive, create_session, eventually, fault_stack
from faults.harness import wait_for_stream as wait_for_plan
from stepwise_libs import subjects
from stepwise_libs.jetstream import connect

from .test_command_messages import _command

pytestmark = pytest.mark.timeout(240)


async def test_command_with_unusable_session_id_is_acked_and_planner_keeps_serving() -> None:
    with fault_stack(names=WITHOUT_EXECUTOR) as stack:
        client = await connect(stack.nats_url, "tests-hostile")
        try:
            js = client.jetstream()
            for session_id in ("a.b.>", "*", "has space"):
                await js.publish(
                    subjects.planner_command_subject("generate_plan"),
                    _command(session_id, "generate_plan", {}, version=999),
                    stream=subjects.COMMANDS_STREAM,
                )

            async def drained() -> bool:
                info = await js.consumer_info(subjects.COMMANDS_STREAM, subjects.PLANNER_CONSUMER)
                return info.num_pending == 0 and info.num_ack_pending == 0

            await eventually(drained, 10, "the planner to acknowledge the command")
        finally:
            await client.close()
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as http:
            fresh = await create_session(http)
        events = (await wait_for_plan(stack.nats_url, [fresh], seconds=30.0))[fresh]
        assert events[-1].type == "plan_completed"
        alive(stack, "planner")
