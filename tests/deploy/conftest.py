"""Fixtures of the deploy tests: nats-servers with the accounts of deploy/nats/values.yaml.

`secured_nats` is one server; `cluster` is three nats-server processes clustered on
loopback with JetStream, the shape the NATS Helm chart runs in prod.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from natsconf import SERVICES, merge_config, render

from stepwise.embedded import EmbeddedNats, free_port

CLUSTER_NODES = 3


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {name: secrets.token_hex(16) for name in ("sys", *SERVICES)}


@pytest.fixture(scope="module")
def secured_nats(
    tmp_path_factory: pytest.TempPathFactory, passwords: dict[str, str]
) -> Iterator[EmbeddedNats]:
    folder = tmp_path_factory.mktemp("nats-auth")
    config = folder / "auth.conf"
    config.write_text(render(merge_config()))
    # The chart passes the passwords to nats-server as environment variables, and so does this test.
    names = {f"{name.upper()}_PASSWORD": value for name, value in passwords.items()}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        server = EmbeddedNats(folder, extra_args=["-c", str(config)]).start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path, passwords: dict[str, str]) -> Iterator[list[EmbeddedNats]]:
    route_ports = [free_port() for _ in range(CLUSTER_NODES)]
    routes = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in route_ports)
    accounts = render(merge_config())
    names = {f"{name.upper()}_PASSWORD": value for name, value in passwords.items()}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    nodes: list[EmbeddedNats] = []
    try:
        for index in range(CLUSTER_NODES):
            folder = tmp_path / f"n{index}"
            folder.mkdir()
            config = folder / "node.conf"
            config.write_text(
                f'server_name: "n{index}"\n'
                f"cluster {{\n"
                f'  name: "stepwise"\n'
                f'  listen: "127.0.0.1:{route_ports[index]}"\n'
                f"  routes: [{routes}]\n"
                f"}}\n" + accounts
            )
            nodes.append(EmbeddedNats(folder, extra_args=["-c", str(config)]).start())
        yield nodes
    finally:
        for node in nodes:
            node.kill()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
