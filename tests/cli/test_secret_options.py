"""`stepwise run --secret`: values from the command line or from STEPWISE_SECRET_<name>."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stepwise.secret_options import SecretOptionError, resolve_secrets

CASE = 'Type "{{user}}" into "Username"\nType "{{password}}" into "Password"'


def test_placeholders_read_from_environment() -> None:
    environ = {"STEPWISE_SECRET_user": "u-value", "STEPWISE_SECRET_PASSWORD": "p-value"}

    values, inline = resolve_secrets([], CASE, environ)

    assert values == {"user": "u-value", "password": "p-value"}
    assert inline == []


def test_exact_variable_name_wins_over_upper_case() -> None:
    environ = {"STEPWISE_SECRET_pin": "exact", "STEPWISE_SECRET_PIN": "upper"}

    values, _ = resolve_secrets(["pin"], "Open the page", environ)

    assert values == {"pin": "exact"}


def test_inline_value_reported_for_warning() -> None:
    values, inline = resolve_secrets(
        ["user=u=with=equals", "password"], CASE, {"STEPWISE_SECRET_password": "p"}
    )

    assert values == {"user": "u=with=equals", "password": "p"}
    assert inline == ["user"]


@pytest.mark.parametrize(
    ("options", "test_case", "environ", "words"),
    [
        ([], CASE, {"STEPWISE_SECRET_user": "u"}, "the placeholder {{password}} has no value"),
        (["user"], "x", {}, "set the environment variable STEPWISE_SECRET_user"),
        (["user=u", "user=v"], "x", {}, "--secret user is given twice"),
        (["user="], "x", {}, "empty value"),
        (["9x=1"], "x", {}, "invalid --secret name '9x'"),
        (
            ["pin"],
            "x",
            {"STEPWISE_SECRET_pin": ""},
            "STEPWISE_SECRET_pin for --secret pin is empty",
        ),
    ],
)
def test_invalid_secret_options(
    options: list[str], test_case: str, environ: dict[str, str], words: str
) -> None:
    with pytest.raises(SecretOptionError) as raised:
        resolve_secrets(options, test_case, environ)

    assert words in str(raised.value)


def test_run_exits_2_naming_missing_secret() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stepwise.cli", "run", "--url", "http://127.0.0.1:9/", CASE],
        env={"PATH": "/usr/bin:/bin", "STEPWISE_SECRET_user": "u-value"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert "{{password}}" in result.stderr
    assert "STEPWISE_SECRET_password" in result.stderr
    assert "u-value" not in result.stdout + result.stderr
