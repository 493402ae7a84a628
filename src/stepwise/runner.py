"""Submit a test case through the gateway and print its plan and steps live.

The runner reads the session's events from its WebSocket, resuming after the
last seq it printed when the socket drops, so no step is printed twice or
skipped. It starts the execution once `plan_completed` arrives.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from stepwise.gateway_client import ConnectionClosed, GatewayClient, GatewayError

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Maximum reconnects to the session WebSocket in a row before the runner gives up.
MAX_RECONNECTS = 10


@dataclass
class RunOutcome:
    """The end of a run: exit code, session id and a one-line summary."""

    exit_code: int
    session_id: str | None
    summary: str
    # True when the run had not ended when the client's --timeout passed.
    timed_out: bool = False


def _short(value: Any, limit: int = 90) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _format_action(action: dict[str, Any]) -> str:
    params = action.get("params") or {}
    line = f"{action.get('name', '?')}"
    if params:
        line += f" {_short(params, 70)}"
    if action.get("error"):
        line += f" [red]→ {escape(_short(action['error']))}[/red]"
    elif action.get("result"):
        line += f" [dim]→ {escape(_short(action['result']))}[/dim]"
    return line


class SessionRun:
    """Follow one session's events, print them, and decide the exit code."""

    def __init__(
        self,
        client: GatewayClient,
        console: Console,
        timeout: float,
        error_console: Console | None = None,
        allow_partial: bool = False,
    ) -> None:
        self.client = client
        # Whether a plan that left parts of the test case out may still run.
        self.allow_partial = allow_partial
        self.console = console
        self.error_console = error_console or Console(stderr=True, soft_wrap=True)
        self.timeout = timeout
        self.session_id = ""
        self.last_seq = 0
        self.total_steps = 0
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.task: TaskID | None = None

    # --- the whole run ---------------------------------------------------------------

    def run(
        self,
        test_case: str,
        target_url: str,
        model: str | None,
        secrets: dict[str, str] | None = None,
    ) -> RunOutcome:
        """Create the session, follow it to its end, and return the outcome."""
        try:
            created = self.client.create_session(test_case, target_url, model, secrets)
        except GatewayError as error:
            self.error_console.print(f"[red]error:[/red] {escape(str(error))}")
            code = EXIT_USAGE if error.bad_input else EXIT_FAILED
            return RunOutcome(code, None, str(error))
        self.session_id = str(created["session_id"])
        self.console.print(
            f"Session [bold]{self.session_id}[/bold] (model {created.get('llm_model', '?')})"
        )
        self.console.print(f"Live view: {self.client.session_page_url(self.session_id)}")

        with self.progress:
            self.task = self.progress.add_task("generating the plan", total=None)
            try:
                outcome = self._follow()
            except BaseException:
                # Ctrl-C or SIGTERM: the run must not go on without anyone watching it.
                self._cancel("the run was interrupted")
                raise
        if outcome.timed_out:
            self._cancel(outcome.summary)
        self.console.print(
            f"[bold {'green' if outcome.exit_code == EXIT_PASSED else 'red'}]"
            f"{escape(outcome.summary)}[/]"
        )
        return outcome

    def _follow(self) -> RunOutcome:
        deadline = time.monotonic() + self.timeout
        reconnects = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return RunOutcome(
                    EXIT_FAILED,
                    self.session_id,
                    f"timed out after {self.timeout:.0f} s waiting for the run to end",
                    timed_out=True,
                )
            try:
                for event in self.client.events(self.session_id, self.last_seq, remaining):
                    reconnects = 0
                    seq = int(event["seq"])
                    if seq <= self.last_seq:
                        continue  # already printed before a reconnect
                    self.last_seq = seq
                    outcome = self._on_event(event)
                    if outcome is not None:
                        return outcome
                    if time.monotonic() > deadline:
                        break
            except TimeoutError:
                continue  # the deadline check above ends the run
            except (ConnectionClosed, OSError) as error:
                reconnects += 1
                if reconnects > MAX_RECONNECTS:
                    return self._end(EXIT_FAILED, f"lost the session WebSocket: {error}")
                self._print(
                    f"[yellow]WebSocket closed ({escape(str(error))}); "
                    f"resuming after event {self.last_seq}[/]"
                )
                time.sleep(min(5.0, 0.5 * reconnects))
            except GatewayError as error:
                return self._end(EXIT_FAILED, str(error))

    def _end(self, code: int, summary: str) -> RunOutcome:
        return RunOutcome(code, self.session_id, summary)

    def _cancel(self, reason: str) -> None:
        """Cancel the session on the gateway, saying why, unless its run has ended."""
        try:
            self.client.cancel(self.session_id)
        except GatewayError as error:
            if error.status == 409:
                return  # the run ended meanwhile, and its result is kept
            self.error_console.print(
                f"[red]error:[/red] {escape(reason)}, and cancelling session "
                f"{self.session_id} failed: {escape(str(error))}; cancel it with "
                f"POST /api/sessions/{self.session_id}/task/cancel"
            )
            return
        self.error_console.print(
            f"[yellow]{escape(reason)}: cancelled session {self.session_id}[/yellow]"
        )

    # --- events ----------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> RunOutcome | None:
        kind = str(event.get("type"))
        data = event.get("data") or {}
        handler = getattr(self, f"_on_{kind}", None)
        if handler is None:
            return None
        result: RunOutcome | None = handler(data)
        return result

    def _print(self, text: RenderableType) -> None:
        self.progress.console.print(text)

    def _describe(self, description: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=description)

    def _on_plan_started(self, data: dict[str, Any]) -> None:
        self._describe(f"generating the plan with {data.get('model', 'the model')}")

    def _on_plan_progress(self, data: dict[str, Any]) -> None:
        self._print(f"[dim]planner: {escape(str(data.get('message', '')))}[/dim]")

    def _on_plan_completed(self, data: dict[str, Any]) -> RunOutcome | None:
        steps = data.get("steps") or []
        table = Table(title="Plan", show_header=True, header_style="bold", expand=False)
        table.add_column("#", justify="right")
        table.add_column("Step")
        for step in steps:
            table.add_row(str(step.get("number")), escape(str(step.get("description", ""))))
        self._print("")
        self._print(table)
        unparsed = data.get("unparsed") or []
        if unparsed:
            self._print("[yellow]Not understood, left out of the plan:[/yellow]")
            for part in unparsed:
                self._print(f"[yellow]  - {escape(str(part))}[/yellow]")
        if data.get("kind", "initial") != "initial":
            return None
        if not steps:
            return self._end(
                EXIT_FAILED, "the plan has no steps: nothing in the test case was understood"
            )
        if unparsed and not self.allow_partial:
            # A run that passed without these parts would report a test that never ran whole.
            return self._end(
                EXIT_FAILED,
                f"the planner did not understand {len(unparsed)} part(s) of the test case, "
                "so nothing ran: reword them in the forms listed in the README, "
                "or pass --allow-partial to run the steps it understood",
            )

        self.total_steps = len(steps)
        try:
            queued = self.client.start(self.session_id)
        except GatewayError as error:
            return self._end(EXIT_FAILED, str(error))
        self._print(f"Execution queued (task {queued.get('task_id')})")
        if self.task is not None:
            self.progress.update(
                self.task,
                total=self.total_steps,
                completed=0,
                description="waiting for the executor",
            )
        return None

    def _on_plan_failed(self, data: dict[str, Any]) -> RunOutcome:
        return self._end(
            EXIT_FAILED, f"plan generation failed: {data.get('error', 'no reason given')}"
        )

    def _on_execution_started(self, data: dict[str, Any]) -> None:
        total = int(data.get("total_steps") or self.total_steps)
        self.total_steps = total
        if self.task is not None:
            self.progress.update(
                self.task, total=total, completed=max(0, int(data.get("from_step", 1)) - 1)
            )

    def _on_step_started(self, data: dict[str, Any]) -> None:
        number = data.get("step_number")
        description = escape(str(data.get("description", "")))
        attempt = int(data.get("attempt") or 1)
        retry = f" (attempt {attempt})" if attempt > 1 else ""
        self._print(f"[bold]▶ Step {number}[/bold]{retry}: {description}")
        self._describe(f"step {number}: {_short(data.get('description', ''), 40)}")

    def _on_action_executed(self, data: dict[str, Any]) -> None:
        action = data.get("action") or {}
        self._print(f"    · {_format_action(action)}")

    def _advance(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def _on_step_completed(self, data: dict[str, Any]) -> None:
        seconds = int(data.get("duration_ms") or 0) / 1000
        shots = len(data.get("screenshots") or [])
        self._print(
            f"[green]✓ Step {data.get('step_number')} passed[/green] "
            f"[dim]({seconds:.1f} s, {shots} screenshot{'s' if shots != 1 else ''})[/dim]"
        )
        self._advance()

    def _on_step_failed(self, data: dict[str, Any]) -> None:
        category = data.get("category") or "error"
        self._print(
            f"[red]✗ Step {data.get('step_number')} failed[/red] "
            f"[dim]({escape(str(category))})[/dim]: {escape(str(data.get('error', '')))}"
        )
        self._advance()

    def _on_step_skipped(self, data: dict[str, Any]) -> None:
        reason = data.get("reason") or "skipped"
        self._print(
            f"[yellow]- Step {data.get('step_number')} skipped[/yellow]: {escape(str(reason))}"
        )
        self._advance()

    def _on_execution_paused(self, data: dict[str, Any]) -> None:
        self._print(
            f"[yellow]Paused after step {data.get('after_step')}; continue it from "
            f"{self.client.session_page_url(self.session_id)}[/yellow]"
        )

    def _on_execution_resumed(self, data: dict[str, Any]) -> None:
        self._print(f"Resumed from step {data.get('from_step')}")

    def _on_execution_completed(self, data: dict[str, Any]) -> RunOutcome:
        counts = (
            f"{data.get('passed', 0)} passed, {data.get('failed', 0)} failed, "
            f"{data.get('skipped', 0)} skipped of {data.get('total', self.total_steps)} steps"
        )
        if data.get("success"):
            return self._end(EXIT_PASSED, f"Test passed: {counts}")
        return self._end(EXIT_FAILED, f"Test failed: {counts}")

    def _on_execution_failed(self, data: dict[str, Any]) -> RunOutcome:
        step = data.get("failed_step")
        where = f" at step {step}" if step else ""
        return self._end(EXIT_FAILED, f"Test failed{where}: {data.get('error', 'no reason given')}")

    def _on_execution_cancelled(self, data: dict[str, Any]) -> RunOutcome:
        return self._end(EXIT_FAILED, f"Execution cancelled: {data.get('reason', '')}")

    def _on_session_interrupted(self, data: dict[str, Any]) -> RunOutcome:
        return self._end(
            EXIT_FAILED,
            f"Session interrupted after step {data.get('last_completed_step', 0)}: "
            f"{data.get('reason', '')}; continue it from "
            f"{self.client.session_page_url(self.session_id)}",
        )

    def _on_command_rejected(self, data: dict[str, Any]) -> RunOutcome | None:
        command = data.get("command_type", "?")
        reason = data.get("reason", "")
        self._print(f"[red]{escape(str(command))} rejected: {escape(str(reason))}[/red]")
        if command in ("generate_plan", "execute_plan"):
            return self._end(EXIT_FAILED, f"{command} was rejected: {reason}")
        return None
