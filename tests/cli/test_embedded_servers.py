"""The embedded nats-server and Postgres: start, keep data across a restart, stop cleanly."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from stepwise import processes
from stepwise.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedServerError, port_open


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Outside /tmp/pytest-of-<user>: a concurrent pytest start resets that folder to 0700,
    # which locks out the unprivileged user Postgres runs as under root.
    path = Path(tempfile.mkdtemp(prefix="stepwise-embedded-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _publish_and_count(url: str, publish: bool) -> int:
    client = NATS()
    await client.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = client.jetstream()
        if publish:
            await js.add_stream(name="PROBE", subjects=["probe.>"])
            await js.publish("probe.one", b"kept")
        info = await js.stream_info("PROBE")
        return int(info.state.messages)
    finally:
        await client.close()


async def test_embedded_nats_keeps_stream_across_restart(data_dir: Path) -> None:
    server = EmbeddedNats(data_dir).start()
    try:
        first_pid = server.process.pid if server.process else 0
        assert await _publish_and_count(server.url, publish=True) == 1
    finally:
        server.stop()
    assert not processes.alive(first_pid)
    assert not port_open(server.host, server.port)

    # A new server on the same folder, on a new port, still has the stream and its message.
    again = EmbeddedNats(data_dir).start()
    try:
        assert await _publish_and_count(again.url, publish=False) == 1
    finally:
        again.stop()
    assert again.process is not None
    assert again.process.returncode is not None


def test_embedded_postgres_keeps_rows_across_restart(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir).start()
    try:
        created = server._psql(
            "create table probe (value text); insert into probe values ('kept')", "stepwise"
        )
        assert created.returncode == 0, created.stderr
        assert server.process is not None
        tree = [server.process.pid, *processes.descendants(server.process.pid)]
        assert len(tree) > 1, "postgres started no background processes"
    finally:
        server.stop()
    assert [pid for pid in tree if processes.alive(pid)] == []
    assert not (server.pgdata / "postmaster.pid").exists()

    again = EmbeddedPostgres(data_dir).start()
    try:
        selected = again._psql("select value from probe", "stepwise")
        assert selected.returncode == 0, selected.stderr
        assert selected.stdout.strip() == "kept"
    finally:
        again.stop()


def test_embedded_postgres_rejects_busy_port(data_dir: Path) -> None:
    server = EmbeddedNats(data_dir / "nats").start()
    try:
        with pytest.raises(
            EmbeddedServerError, match=f"port 127.0.0.1:{server.port} is already in use"
        ):
            EmbeddedPostgres(data_dir / "postgres", port=server.port).start()
    finally:
        server.stop()
