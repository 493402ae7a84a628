"""Fixtures of the deploy tests: a nats-server with the accounts of deploy/nats/values.yaml."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from natsconf import SERVICES, merge_config, render

from stepwise.embedded import EmbeddedNats


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
