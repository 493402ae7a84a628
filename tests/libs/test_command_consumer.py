"""The command pull loop that planner and executor share."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from stepwise_libs import commands as cmd
from stepwise_libs import subjects
from stepwise_libs.consumer import run_command_consumer
from stepwise_libs.jetstream import EventStore, connect, ensure_topology, publish_command

from stepwise.embedded import EmbeddedNats


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    # Its own server: the commands stream is a work queue, which allows one consumer per subject.
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server
    server.stop()


async def test_stopping_consumer_gives_back_fetched_commands(own_nats: EmbeddedNats) -> None:
    client = await connect(own_nats.url, "tests")
    try:
        js = client.jetstream()
        await ensure_topology(js)
        subject = subjects.executor_command_subject("pause_execution")
        sent = [cmd.new_command(uuid.uuid4().hex, cmd.PauseExecution()) for _ in range(2)]
        for command in sent:
            await publish_command(js, subject, command)
        handled: list[str] = []
        stop = asyncio.Event()

        async def handle(command: cmd.Command, body: cmd.CommandBody, message: Msg) -> None:
            # The stop request arrives while the first command of the batch is handled.
            handled.append(command.command_id)
            await message.ack()
            stop.set()

        await asyncio.wait_for(
            run_command_consumer(
                js,
                EventStore(js),
                "executor",
                f"{subjects.EXECUTOR_COMMANDS}.*",
                handle,
                stop,
                batch=2,
            ),
            10,
        )

        assert handled == [sent[0].command_id]
        # The second command went back to the stream, so the next fetch delivers it.
        subscription = await js.pull_subscribe_bind("executor", stream=subjects.COMMANDS_STREAM)
        [message] = await subscription.fetch(1, timeout=5)
        again, _ = cmd.decode_command(message.data)
        assert again.command_id == sent[1].command_id
        await message.ack()
    finally:
        await client.close()
