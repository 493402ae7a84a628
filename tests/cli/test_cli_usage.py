"""Bad usage of the `stepwise` command: exit code 2 and a message that names the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.embedded import free_port
from stepwise.gateway_client import token_from_env


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # No stack runs on this folder, so nothing here starts one by accident.
    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STEPWISE_GATEWAY_URL", raising=False)
    return CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "1. Open the page"], "missing --url"),
        (["run", "--url", "ftp://example.com", "1. Open"], "invalid --url 'ftp://example.com'"),
        (["run", "--url", "example.com/login", "1. Open"], "invalid --url 'example.com/login'"),
        (["run", "--url", "http://", "1. Open"], "invalid --url 'http://'"),
        (["run", "--url", "http://127.0.0.1/"], "missing test case"),
        (["run", "--url", "http://127.0.0.1/", "   "], "the test case is empty"),
        (
            ["run", "--url", "http://127.0.0.1/", "--file", "no/such/case.txt"],
            "test case file not found: no/such/case.txt",
        ),
        (
            ["run", "--url", "http://127.0.0.1/", "--gateway", "localhost:8000", "1. Open"],
            "invalid --gateway 'localhost:8000'",
        ),
        (
            ["demo", "--case", "nope"],
            "no sample test case named 'nope'; available: checkout, failing",
        ),
    ],
)
def test_cli_rejects_bad_usage(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(app, args)

    assert result.exit_code == 2, result.output
    assert message in result.output


def test_run_rejects_text_and_file_together(runner: CliRunner, tmp_path: Path) -> None:
    case = tmp_path / "case.txt"
    case.write_text("1. Open the page\n")

    result = runner.invoke(
        app, ["run", "--url", "http://127.0.0.1/", "--file", str(case), "1. Open"]
    )

    assert result.exit_code == 2, result.output
    assert "either as an argument or with --file, not both" in result.output


def test_run_rejects_directory_as_file(runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "qa"
    folder.mkdir()

    result = runner.invoke(app, ["run", "--url", "http://127.0.0.1/", "--file", str(folder)])

    assert result.exit_code == 2, result.output
    assert f"the test case file {folder} is a directory" in result.output
    assert "not found" not in result.output


def test_run_rejects_empty_file(runner: CliRunner, tmp_path: Path) -> None:
    case = tmp_path / "empty.txt"
    case.write_text("\n  \n")

    result = runner.invoke(app, ["run", "--url", "http://127.0.0.1/", "--file", str(case)])

    assert result.exit_code == 2, result.output
    assert f"the test case file {case} is empty" in result.output


@pytest.mark.parametrize(
    "args",
    [["run", "--no-such-option"], ["up", "--port", "0"], ["up", "--port", "http"], ["nope"]],
)
def test_cli_rejects_unknown_or_invalid_options(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(app, args)

    assert result.exit_code == 2, result.output


def test_run_reads_test_case_from_stdin(runner: CliRunner) -> None:
    gateway = f"http://127.0.0.1:{free_port()}"
    args = ["run", "--url", "http://127.0.0.1/", "--gateway", gateway, "--file", "-"]

    read = runner.invoke(app, args, input="1. Open the page\n")
    empty = runner.invoke(app, args, input="  \n")

    # The test case was read, so the run went on to look for the gateway.
    assert read.exit_code == 1, read.output
    assert f"no ready gateway at {gateway}" in read.output
    assert empty.exit_code == 2, empty.output
    assert "the test case on standard input is empty" in empty.output


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_sample_site_rejects_invalid_port(runner: CliRunner, port: str) -> None:
    result = runner.invoke(app, ["sample-site", "--port", port])

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "--port" in result.output


def test_run_fails_when_gateway_is_unreachable(runner: CliRunner) -> None:
    gateway = f"http://127.0.0.1:{free_port()}"

    result = runner.invoke(
        app, ["run", "--url", "http://127.0.0.1/", "--gateway", gateway, "1. Open the page"]
    )

    assert result.exit_code == 1, result.output
    assert f"no ready gateway at {gateway}" in result.output


def test_console_script_exits_two_with_message(tmp_path: Path) -> None:
    # The installed entry point, not just the Typer app, maps bad usage to exit code 2.
    env = {**os.environ, "STEPWISE_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "stepwise.cli", "run", "--url", "not a url", "1. Open"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert "invalid --url 'not a url'" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"STEPWISE_API_TOKENS": ""}, None),
        ({"STEPWISE_API_TOKENS": "a" * 32}, "a" * 32),
        ({"STEPWISE_API_TOKENS": f"ci:{'b' * 32}, ui:{'c' * 32}"}, "b" * 32),
        ({"STEPWISE_API_TOKENS": f"ci:{'b' * 32}", "STEPWISE_API_TOKEN": "d" * 32}, "d" * 32),
    ],
)
def test_token_from_env(environ: dict[str, str], expected: str | None) -> None:
    assert token_from_env(environ) == expected
