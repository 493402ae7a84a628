"""Connecting to NATS with one URL or a comma-separated list of them."""

from __future__ import annotations

import pytest
from stepwise_libs.jetstream import connect, server_urls

from stepwise.embedded import EmbeddedNats, free_port


def test_server_urls_splits_a_list() -> None:
    urls = server_urls(" nats://a:4222, nats://b:4222 ,,nats://c:4222")

    assert urls == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]


def test_server_urls_rejects_empty_value() -> None:
    with pytest.raises(ValueError, match="no NATS URL"):
        server_urls(" , ")


async def test_connect_skips_a_dead_server(nats_server: EmbeddedNats) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"

    client = await connect(f"{dead},{nats_server.url}", "tests-connect")
    try:
        assert client.is_connected
        assert client.connected_url is not None
        assert client.connected_url.port == nats_server.port
    finally:
        await client.close()
