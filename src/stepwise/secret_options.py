"""Secret values for `stepwise run`: from `--secret` options and `STEPWISE_SECRET_<name>` variables.

A test case names a secret as `{{name}}`. `--secret name=VALUE` gives the value
on the command line. `--secret name`, and every placeholder without a `--secret`,
takes it from the environment variable `STEPWISE_SECRET_<name>` (or the same with
the name in upper case). So a CI job passes its secrets without them showing in
the process list.
"""

from __future__ import annotations

from collections.abc import Mapping

from stepwise_libs.secrets import SECRET_NAME, placeholders

ENV_PREFIX = "STEPWISE_SECRET_"


class SecretOptionError(ValueError):
    """A `--secret` option or a placeholder value is invalid or missing; the message names it."""


def env_names(name: str) -> list[str]:
    """Return the environment variables that may hold the value of secret `name`, in order."""
    names = [ENV_PREFIX + name]
    if name.upper() != name:
        names.append(ENV_PREFIX + name.upper())
    return names


def _from_env(name: str, environ: Mapping[str, str], reason: str) -> str:
    for variable in env_names(name):
        value = environ.get(variable)
        if value is None:
            continue
        if not value:
            raise SecretOptionError(f"the environment variable {variable} for {reason} is empty")
        return value
    raise SecretOptionError(
        f"{reason} has no value: set the environment variable {env_names(name)[0]} "
        f"or pass --secret {name}=VALUE"
    )


def resolve_secrets(
    options: list[str], test_case: str, environ: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """Return the secret values by name, and the names whose value was on the command line.

    Raises SecretOptionError naming the option, variable or placeholder at fault;
    no message contains a value.
    """
    values: dict[str, str] = {}
    inline: list[str] = []
    for option in options:
        name, equals, value = option.partition("=")
        if not SECRET_NAME.fullmatch(name):
            raise SecretOptionError(
                f"invalid --secret name {name[:80]!r}: a name is a letter or underscore and "
                "then up to 63 letters, digits or underscores, as in --secret password"
            )
        if name in values:
            raise SecretOptionError(f"--secret {name} is given twice")
        if equals:
            if not value:
                raise SecretOptionError(f"--secret {name}= has an empty value")
            values[name] = value
            inline.append(name)
        else:
            values[name] = _from_env(name, environ, f"--secret {name}")
    for name in placeholders(test_case):
        if name not in values:
            values[name] = _from_env(name, environ, f"the placeholder {{{{{name}}}}}")
    return values, inline
