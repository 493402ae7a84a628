"""Which hosts `stepwise up` lets its executor open: STEPWISE_ALLOWED_HOSTS and its default."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepwise.stack import LOOPBACK_ALLOWED_HOSTS, Stack, StackConfig, is_loopback_host


def build_stack(
    home: Path, host: str, extra_env: dict[str, str] | None = None
) -> tuple[Stack, list[str]]:
    reports: list[str] = []
    config = StackConfig(home=home, host=host, extra_env=extra_env or {})
    stack = Stack(config, report=lambda level, message: reports.append(message))
    return stack, reports


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_gateway_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "stepwise.example.com"])
def test_other_gateway_hosts(host: str) -> None:
    assert not is_loopback_host(host)


def test_loopback_gateway_allows_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEPWISE_ALLOWED_HOSTS", raising=False)
    stack, reports = build_stack(tmp_path, "127.0.0.1")

    env = stack._environment("executor")
    stack._report_allowed_hosts()

    assert env["STEPWISE_ALLOWED_HOSTS"] == LOOPBACK_ALLOWED_HOSTS == "127.0.0.1,localhost,::1"
    assert len(reports) == 1
    assert "loopback (127.0.0.1,localhost,::1)" in reports[0]
    assert "gateway listens on 127.0.0.1" in reports[0]
    assert "set STEPWISE_ALLOWED_HOSTS" in reports[0]
    # Only the executor opens pages.
    assert "STEPWISE_ALLOWED_HOSTS" not in stack._environment("planner")


def test_public_gateway_allows_no_private_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEPWISE_ALLOWED_HOSTS", raising=False)
    stack, reports = build_stack(tmp_path, "0.0.0.0")

    env = stack._environment("executor")
    stack._report_allowed_hosts()

    assert "STEPWISE_ALLOWED_HOSTS" not in env
    assert reports == []


def test_user_allowed_hosts_replace_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEPWISE_ALLOWED_HOSTS", "10.0.0.7:8080")
    stack, reports = build_stack(tmp_path, "127.0.0.1")

    env = stack._environment("executor")
    stack._report_allowed_hosts()

    assert env["STEPWISE_ALLOWED_HOSTS"] == "10.0.0.7:8080"
    assert reports == []


def test_extra_env_allowed_hosts_replace_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEPWISE_ALLOWED_HOSTS", raising=False)
    stack, reports = build_stack(
        tmp_path, "127.0.0.1", {"STEPWISE_ALLOWED_HOSTS": "127.0.0.1:8765"}
    )

    env = stack._environment("executor")
    stack._report_allowed_hosts()

    assert env["STEPWISE_ALLOWED_HOSTS"] == "127.0.0.1:8765"
    assert reports == []
