"""The NATS users file of `stepwise up`: created private, reused, repaired or rejected."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from stepwise_libs.settings import redact_url

from stepwise import nats_users
from stepwise.stack import SERVICES, Stack, StackConfig


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_passwords_created_private(tmp_path: Path) -> None:
    passwords = nats_users.load_or_create_passwords(tmp_path)

    path = tmp_path / nats_users.USERS_FILE
    assert _mode(path) == 0o600
    assert set(passwords) == set(nats_users.USERS)
    assert len(set(passwords.values())) == len(nats_users.USERS)
    assert json.loads(path.read_text()) == passwords


def test_passwords_reused_on_next_load(tmp_path: Path) -> None:
    first = nats_users.load_or_create_passwords(tmp_path)

    assert nats_users.load_or_create_passwords(tmp_path) == first


def test_missing_user_added_and_wide_mode_narrowed(tmp_path: Path) -> None:
    first = nats_users.load_or_create_passwords(tmp_path)
    path = tmp_path / nats_users.USERS_FILE
    path.write_text(json.dumps({"gateway": first["gateway"]}))
    path.chmod(0o644)

    second = nats_users.load_or_create_passwords(tmp_path)

    assert second["gateway"] == first["gateway"]
    assert set(second) == set(nats_users.USERS)
    assert _mode(path) == 0o600


@pytest.mark.parametrize("content", ["not json", "[]", '{"gateway": "short"}'])
def test_invalid_passwords_file_rejected(tmp_path: Path, content: str) -> None:
    path = tmp_path / nats_users.USERS_FILE
    path.write_text(content)

    with pytest.raises(nats_users.NatsUsersError, match=str(path)):
        nats_users.load_or_create_passwords(tmp_path)


def test_server_config_holds_no_password(tmp_path: Path) -> None:
    passwords = nats_users.load_or_create_passwords(tmp_path)
    config = nats_users.server_config()

    for user, password in passwords.items():
        assert password not in config
        assert f"${nats_users.password_variable(user)}" in config
    assert set(nats_users.server_environment(passwords).values()) == set(passwords.values())


def test_url_with_credentials_and_redacted() -> None:
    url = nats_users.url_with_credentials("nats://127.0.0.1:4222", "planner", "0a1b")

    assert url == "nats://planner:0a1b@127.0.0.1:4222"
    assert redact_url(url) == "nats://planner:***@127.0.0.1:4222"
    assert redact_url("nats://token@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_given_nats_url_used_as_is(tmp_path: Path) -> None:
    url = "nats://ops:0a1b2c@127.0.0.1:4222"
    stack = Stack(StackConfig(home=tmp_path, nats_url=url))

    for name in SERVICES:
        assert stack._environment(name)["STEPWISE_NATS_URL"] == url, name
    assert stack.nats_users_path is None
    assert stack.nats_address == "nats://ops:***@127.0.0.1:4222"
    assert not (tmp_path / nats_users.USERS_FILE).exists()
