"""The `stepwise` command: run the stack, run a test case, run the demo.

Exit codes of `run` and `demo --once`: 0 when every step passed, 1 when the
test or its plan failed (or the stack could not start), 2 on bad usage.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape

from stepwise.gateway_client import GatewayClient, token_from_env
from stepwise.runner import EXIT_FAILED, EXIT_PASSED, EXIT_USAGE, RunOutcome, SessionRun
from stepwise.sample_site import sample_test_case, serve_sample_site
from stepwise.secret_options import SecretOptionError, env_names, resolve_secrets
from stepwise.stack import (
    ALLOWED_HOSTS_VARIABLE,
    Stack,
    StackConfig,
    StackError,
    default_home,
    running_gateway,
)

app = typer.Typer(
    name="stepwise",
    help="Turn a plain-language test case into a plan and run it in a real Chromium, live.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)

HostOption = Annotated[str, typer.Option(help="Address the gateway listens on.")]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model for the plan and the steps: 'offline', or a Gemini model such as "
        "gemini-2.5-flash (needs GEMINI_API_KEY). Default: the gateway's default model.",
    ),
]
TimeoutOption = Annotated[
    float, typer.Option(help="Seconds to wait for the whole run before giving up.", min=1)
]


def _fail_usage(message: str) -> typer.Exit:
    error_console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(EXIT_USAGE)


def _report(level: str, message: str) -> None:
    style = {"error": "bold red", "warning": "yellow"}.get(level, "dim")
    error_console.print(f"[{style}]{escape(message)}[/]")


def _configure_logging(verbose: bool) -> None:
    # platformdirs warns about a missing XDG_RUNTIME_DIR, which the embedded Postgres never uses.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived while a run was in progress."""


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set `stop` on the first SIGINT or SIGTERM; later ones print that the stack is stopping."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            error_console.print("[yellow]stopping, please wait[/yellow]")
            return
        stop.set()
        error_console.print(
            f"[yellow]{signal.Signals(signum).name} received, stopping the stack[/yellow]"
        )

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _interrupt_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `_StopRequested` in the main thread, once."""

    def handle(signum: int, frame: FrameType | None) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # the clean-up that follows must not be cut short
        raise _StopRequested(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_stack(config: StackConfig, cancel: threading.Event | None = None) -> Stack:
    with error_console.status("starting the stack (nats-server, Postgres, four services)"):
        return Stack(config, report=_report).start(cancel)


def _print_urls(stack: Stack) -> None:
    console.print(f"[bold]Stepwise is running[/bold] on {stack.gateway_url}")
    console.print(f"  web UI      {stack.gateway_url}/")
    console.print(f"  API docs    {stack.gateway_url}/docs")
    console.print(f"  NATS        {stack.nats_address}")
    if stack.nats_users_path is not None:
        console.print(f"  NATS users  {stack.nats_users_path} (one per service, and admin)")
    console.print(f"  Postgres    {stack.database_url}")
    console.print(f"  data, logs  {stack.home} ({stack.logs_dir})")


def _validate_url(url: str | None) -> str:
    if not url:
        raise _fail_usage(
            "missing --url: pass the URL the test case starts from, such as --url https://example.com/login"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail_usage(
            f"invalid --url {url!r}: expected an absolute http:// or https:// URL with a host"
        )
    return url


def _read_test_case(text: str | None, file: Path | None) -> str:
    if text is not None and file is not None:
        raise _fail_usage("pass the test case either as an argument or with --file, not both")
    if file is not None and str(file) == "-":
        try:
            text = sys.stdin.read()
        except (OSError, UnicodeDecodeError) as error:
            raise _fail_usage(
                f"failed to read the test case from standard input: {error}"
            ) from error
        if not text.strip():
            raise _fail_usage("the test case on standard input is empty")
        return text
    if file is not None:
        if file.is_dir():
            raise _fail_usage(
                f"the test case file {file} is a directory; pass the path of a text file"
            )
        # A pipe or /dev/stdin is not a regular file, but it can be read.
        if not file.exists():
            raise _fail_usage(f"test case file not found: {file}")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise _fail_usage(f"failed to read the test case file {file}: {error}") from error
        if not text.strip():
            raise _fail_usage(f"the test case file {file} is empty")
        return text
    if text is None:
        raise _fail_usage(
            'missing test case: pass it as an argument ("1. Open the page ...") or with --file FILE'
        )
    if not text.strip():
        raise _fail_usage("the test case is empty")
    return text


def _run_against(
    gateway_url: str,
    test_case: str,
    target_url: str,
    model: str | None,
    timeout: float,
    token: str | None = None,
    allow_partial: bool = False,
    secrets: dict[str, str] | None = None,
) -> RunOutcome:
    with GatewayClient(gateway_url, token=token or token_from_env()) as client:
        session_run = SessionRun(client, console, timeout, error_console, allow_partial)
        return session_run.run(test_case, target_url, model, secrets)


def _read_secrets(options: list[str], test_case: str) -> dict[str, str]:
    try:
        secrets, inline = resolve_secrets(options, test_case, os.environ)
    except SecretOptionError as error:
        raise _fail_usage(str(error)) from None
    for name in inline:
        error_console.print(
            f"[yellow]warning:[/yellow] --secret {name}=... puts the value on the command line, "
            f"where the process list and shell history show it; set {env_names(name)[0]} "
            f"and pass --secret {name} instead"
        )
    return secrets


@app.command()
def up(
    host: HostOption = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port the gateway listens on.", min=1, max=65535)
    ] = 8000,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log the supervisor's steps.")
    ] = False,
) -> None:
    """Run the whole stack in the foreground until Ctrl-C.

    Starts an embedded nats-server and Postgres with their data under
    $STEPWISE_HOME (default ./.stepwise) unless STEPWISE_NATS_URL and
    STEPWISE_DATABASE_URL are set, runs the migrations, then the four services.
    On the embedded nats-server each service connects as its own NATS user; the
    generated passwords are in $STEPWISE_HOME/nats-users.json (mode 0600).
    """
    _configure_logging(verbose)
    stop = threading.Event()
    with _stop_on_signals(stop):
        try:
            stack = _start_stack(StackConfig.from_env(host=host, port=port), cancel=stop)
        except StackError as error:
            error_console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(EXIT_FAILED) from None
        try:
            _print_urls(stack)
            console.print("Press Ctrl-C to stop.")
            stack.supervise(stop)
        except StackError as error:
            error_console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(EXIT_FAILED) from None
        finally:
            with error_console.status("stopping the stack"):
                stack.stop()
            console.print("Stack stopped.")


@app.command()
def run(
    test_case: Annotated[
        str | None, typer.Argument(help="The test case in plain language.", show_default=False)
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="URL the test case starts from.", show_default=False)
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="Read the test case from this file, or from standard input with -.",
            show_default=False,
        ),
    ] = None,
    gateway: Annotated[
        str | None,
        typer.Option(
            "--gateway",
            envvar="STEPWISE_GATEWAY_URL",
            help="Base URL of a running gateway. Default: the stack running on $STEPWISE_HOME, "
            "or a stack started for this run and stopped after it.",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    timeout: TimeoutOption = 1800.0,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="STEPWISE_API_TOKEN",
            help="API token for a gateway started with STEPWISE_API_TOKENS. "
            "Default: the first token of STEPWISE_API_TOKENS, if set.",
            show_default=False,
        ),
    ] = None,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Run the steps the planner understood even when it left parts of the test "
            "case out. Default: such a plan fails the run before any step runs.",
        ),
    ] = False,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            metavar="NAME[=VALUE]",
            help="Value of a {{NAME}} placeholder of the test case: NAME reads it from the "
            "environment variable STEPWISE_SECRET_NAME, NAME=VALUE takes it from the command "
            "line (visible in the process list). Repeatable. Placeholders without --secret "
            "are read from STEPWISE_SECRET_NAME too.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log the supervisor's steps.")
    ] = False,
) -> None:
    """Plan a test case, run it in Chromium and print each step live.

    Exits 0 when every step passed, 1 when the test failed, 2 on bad usage.
    """
    _configure_logging(verbose)
    target_url = _validate_url(url)
    text = _read_test_case(test_case, file)
    secrets = _read_secrets(secret or [], text)
    if gateway is not None:
        parts = urlsplit(gateway)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _fail_usage(
                f"invalid --gateway {gateway!r}: expected a URL such as http://127.0.0.1:8000"
            )
        with GatewayClient(gateway) as client:
            if not client.ready():
                error_console.print(
                    f"[red]error:[/red] no ready gateway at {escape(gateway)} (GET /readyz failed)"
                )
                raise typer.Exit(EXIT_FAILED)

    gateway_url = gateway or running_gateway(default_home())
    if gateway_url is not None:
        with _interrupt_on_signals():
            try:
                outcome = _run_against(
                    gateway_url, text, target_url, model, timeout, token, allow_partial, secrets
                )
            except _StopRequested as stopped:
                error_console.print(f"[yellow]{stopped} received, stopping[/yellow]")
                raise typer.Exit(130) from None
        raise typer.Exit(outcome.exit_code)

    # No stack runs: start one on a free port for this run and stop it afterwards.
    with _interrupt_on_signals():
        stack: Stack | None = None
        try:
            stack = _start_stack(StackConfig.from_env(port=0))
            outcome = _run_against(
                stack.gateway_url, text, target_url, model, timeout, token, allow_partial, secrets
            )
        except StackError as error:
            error_console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(EXIT_FAILED) from None
        except _StopRequested as stopped:
            error_console.print(f"[yellow]{stopped} received, stopping[/yellow]")
            raise typer.Exit(130) from None
        finally:
            if stack is not None:
                with error_console.status("stopping the stack"):
                    stack.stop()
    raise typer.Exit(outcome.exit_code)


@app.command("sample-site")
def sample_site(
    port: Annotated[
        int,
        typer.Option(
            help="Port on 127.0.0.1 to serve the sample shop on; 0 picks a free one.",
            min=0,
            max=65535,
        ),
    ] = 8765,
) -> None:
    """Serve the bundled sample shop on loopback until Ctrl-C, to run your own test cases on it."""
    try:
        site = serve_sample_site(port=port)
    except OSError as error:
        raise _fail_usage(
            f"cannot serve the sample shop on 127.0.0.1:{port}: {error.strerror or error}; "
            "pass --port with another port"
        ) from None
    console.print(f"Sample shop on {site.base_url} (user standard_user, password secret_sauce)")
    console.print("Press Ctrl-C to stop.")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        site.stop()


@app.command()
def demo(
    once: Annotated[
        bool,
        typer.Option("--once", help="Exit when the sample run ends (exit code 0 when it passed)."),
    ] = False,
    case: Annotated[
        list[str] | None,
        typer.Option(
            "--case",
            help="Bundled sample test case to run: checkout (passes) or failing. Repeatable.",
        ),
    ] = None,
    host: HostOption = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(
            help="Port the gateway listens on. Default: 8000, or a free port with --once.",
            min=1,
            max=65535,
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    timeout: TimeoutOption = 1800.0,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log the supervisor's steps.")
    ] = False,
) -> None:
    """Run the stack, serve the bundled sample shop and run the sample test case against it."""
    _configure_logging(verbose)
    names = case or ["checkout"]
    try:
        cases = [(name, sample_test_case(name)) for name in names]
    except FileNotFoundError as error:
        raise _fail_usage(str(error)) from None

    stop = threading.Event()
    with _stop_on_signals(stop), serve_sample_site() as site:
        stack: Stack | None = None
        gateway_url = running_gateway(default_home())
        try:
            if gateway_url is None:
                # With --once nobody opens the web UI, so any free port will do.
                chosen_port = port
                if chosen_port is None:
                    chosen_port = 0 if once else 8000
                config = StackConfig.from_env(host=host, port=chosen_port)
                # The executor opens the sample shop on loopback, besides any host the user allows.
                user_hosts = os.environ.get(ALLOWED_HOSTS_VARIABLE, "").strip()
                config.extra_env[ALLOWED_HOSTS_VARIABLE] = ",".join(
                    entry for entry in (user_hosts, site.host_port) if entry
                )
                stack = _start_stack(config, stop)
                gateway_url = stack.gateway_url
                _print_urls(stack)
            else:
                console.print(f"Using the stack already running on {gateway_url}")
            console.print(f"Sample shop on {site.base_url}")

            exit_code = EXIT_PASSED
            try:
                # A run may take minutes, so Ctrl-C during it interrupts it at once.
                with _interrupt_on_signals():
                    for name, text in cases:
                        console.rule(f"sample test case: {name}")
                        outcome = _run_against(gateway_url, text, site.base_url, model, timeout)
                        exit_code = max(exit_code, outcome.exit_code)
            except _StopRequested as stopped:
                error_console.print(f"[yellow]{stopped} received, stopping[/yellow]")
                stop.set()
            if stop.is_set():
                exit_code = 130
            elif not once and stack is not None:
                console.print(f"Open {gateway_url}/ to look at the sessions. Press Ctrl-C to stop.")
                stack.supervise(stop)
            elif not once:
                console.print("Done; the stack keeps running in its own terminal.")
        except StackError as error:
            error_console.print(f"[red]error:[/red] {escape(str(error))}")
            exit_code = EXIT_FAILED
        finally:
            if stack is not None:
                with error_console.status("stopping the stack"):
                    stack.stop()
    raise typer.Exit(exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
