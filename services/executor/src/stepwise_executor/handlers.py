"""Handlers of `stepwise.cmd.executor.*` commands, and session ownership across executor replicas.

A command is acknowledged as soon as it is accepted (or rejected with `command_rejected`),
never when the work ends, so a paused session keeps no unacknowledged message.

Ownership: the executor holding a session's browser keeps the key `<session_id>` in the
leases bucket set to its id, renewed by a heartbeat. A replica that receives a command
for a session owned by another live executor forwards it on core NATS to the owner's
inbox and acknowledges the JetStream message once the owner replied that it accepted it.
Every replica watches the leases bucket; when a lease stops being renewed, one survivor
(the one whose `create` of the key wins) appends `session_interrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from stepwise_libs import commands as cmd
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.commands import InvalidCommand, decode_command
from stepwise_libs.fold import (
    CANCELLED,
    COMPLETED,
    FAILED,
    INTERRUPTED,
    PAUSED,
    PLAN_READY,
    RUNNING,
    STOPPED,
    TIMED_OUT,
    SessionState,
    fold,
)
from stepwise_libs.jetstream import LEASE_TTL_SECONDS, EventStore, connect

from .browser import SessionBrowser
from .models import is_gemini, is_offline
from .session import (
    CANCEL_FLAG,
    EXECUTION,
    PAUSE_FLAG,
    RUN_TILL_END,
    STOP_ALL_FLAG,
    LiveSession,
    clear_control_flag,
    set_control_flag,
)
from .settings import ExecutorSettings

logger = logging.getLogger(__name__)

EXECUTION_MODES = (EXECUTION, RUN_TILL_END)
HEARTBEAT_SECONDS = 2.0
FORWARD_TIMEOUT_SECONDS = 15.0
ACCEPTED = b"accepted"
# Statuses in which a session may still hold a browser that an owner's death would strand.
LIVE_STATUSES = frozenset({RUNNING, PAUSED})
# Statuses of a run that ended with a result, which cancel and stop must keep.
FINISHED_STATUSES = frozenset({COMPLETED, FAILED, TIMED_OUT})
# Statuses in which an act instruction may run: the browser is free and the run is not over.
ACT_STATUSES = frozenset({PAUSED, PLAN_READY, STOPPED, INTERRUPTED})
# Reason of the `browser_closed` that cancel or stop records on a finished session. It is not
# `stop_all`, so the session keeps its completed, failed or timed_out status.
FINISHED_CLOSE_REASON = "closed after the run ended"

Ack = Callable[[], Awaitable[None]]


class ExecutorService:
    """Accepts executor commands and runs each session's work as an asyncio task."""

    def __init__(
        self, nc: NATS, js: JetStreamContext, store: EventStore, settings: ExecutorSettings
    ) -> None:
        self.nc = nc
        self.js = js
        self.store = store
        self.settings = settings
        self.executor_id = settings.executor_id
        self.sessions: dict[str, LiveSession] = {}
        self.accepted: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._leases: KeyValue | None = None
        # session -> (owner id, monotonic time its lease was last written), from the leases watch.
        self._lease_seen: dict[str, tuple[str, float]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._inbox = None
        # Set by the SIGTERM handler before the shutdown cancels anything. A step that fails
        # from then on is not recorded as failed, because its browser may have got the signal.
        self.stopping = False

    async def start(self) -> None:
        self._leases = await self.js.key_value(subjects.LEASES_BUCKET)
        self._inbox = await self.nc.subscribe(
            subjects.executor_inbox_subject(self.executor_id), cb=self._on_forwarded
        )
        self._background = [
            asyncio.create_task(self._heartbeat(), name="lease-heartbeat"),
            asyncio.create_task(self._watch_leases(), name="lease-watch"),
            asyncio.create_task(self._check_expired_leases(), name="lease-expiry"),
            asyncio.create_task(self._watch_control(), name="control-watch"),
        ]

    async def _watch_control(self) -> None:
        """Apply pause and stop-all flags written to the control bucket to the sessions this executor owns."""
        while True:
            try:
                control = await self.js.key_value(subjects.CONTROL_BUCKET)
                watcher = await control.watchall()
                async for entry in watcher:
                    if entry is None or entry.operation in (KV_DEL, KV_PURGE):
                        continue
                    live = self.sessions.get(entry.key)
                    if (
                        live is not None
                        and live.busy
                        and entry.value in (PAUSE_FLAG, STOP_ALL_FLAG)
                    ):
                        live.request_pause(entry.value, None)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("watching control flags failed: %s", error)
                await asyncio.sleep(1.0)

    # --- entry points -----------------------------------------------------------------

    async def handle(self, command: cmd.Command, body: cmd.CommandBody, message: Msg) -> None:
        """Handle a command from the JetStream consumer, forwarding it if another executor owns the session."""
        if self.stopping:
            # Another executor, or this one after its restart, takes the command.
            await message.nak(delay=2.0)
            return
        owner = await self._owner(command.session_id)
        if owner is not None and owner != self.executor_id:
            if await self._forward(owner, command, message.data):
                await message.ack()
            else:
                # The owner is gone or busy; its lease expires soon and the command comes back.
                await message.nak(delay=2.0)
            return
        await self.process(command, body, message.ack)

    async def _on_forwarded(self, message: Msg) -> None:
        try:
            command, body = decode_command(message.data)
        except InvalidCommand as error:
            logger.warning("invalid forwarded command: %s", error.reason)
            await message.respond(b"invalid: " + error.reason.encode())
            return

        async def accept() -> None:
            await message.respond(ACCEPTED)

        try:
            await self.process(command, body, accept)
        except Exception:
            logger.exception(
                "forwarded command failed",
                extra={"session_id": command.session_id, "command_id": command.command_id},
            )
            with contextlib.suppress(Exception):
                await message.respond(b"failed")

    async def _forward(self, owner: str, command: cmd.Command, raw: bytes) -> bool:
        extra = {"session_id": command.session_id, "command_id": command.command_id, "owner": owner}
        try:
            reply = await self.nc.request(
                subjects.executor_inbox_subject(owner), raw, timeout=FORWARD_TIMEOUT_SECONDS
            )
        except (NoRespondersError, NatsTimeoutError) as error:
            logger.warning(
                "forwarding to the session's owner failed: %s", type(error).__name__, extra=extra
            )
            return False
        if reply.data != ACCEPTED:
            logger.warning(
                "the session's owner did not accept the command: %r", reply.data, extra=extra
            )
            return False
        logger.info("command forwarded to the session's owner", extra=extra)
        return True

    # --- processing -------------------------------------------------------------------

    async def process(self, command: cmd.Command, body: cmd.CommandBody, ack: Ack) -> None:
        extra = {
            "session_id": command.session_id,
            "command_id": command.command_id,
            "command_type": command.type,
        }
        live = self.sessions.get(command.session_id)
        if (
            isinstance(body, cmd.CancelTask)
            and live is not None
            and command.command_id not in self.accepted
        ):
            # Cancel is immediate: the task and the browser end before the command's bookkeeping.
            if live.task is not None:
                live.task.cancel()
            # Only SIGKILL here: the full sweep runs in a thread when the cancel is handled.
            live.browser.kill_launched_tree()
        lock = self._locks.setdefault(command.session_id, asyncio.Lock())
        async with lock:
            if command.command_id in self.accepted:
                logger.info("duplicate command ignored", extra=extra)
                await ack()
                return
            events = await self.store.read(command.session_id)
            if any(event.command_id == command.command_id for event in events):
                # A redelivered command whose work already started: its events are in the stream.
                logger.info("redelivered command already handled", extra=extra)
                self.accepted.add(command.command_id)
                await ack()
                return
            state = fold(command.session_id, events)
            reason = self._rejection(command, body, state)
            if reason is not None:
                code, text = reason
                await self.store.append(
                    command.session_id,
                    ev.CommandRejected(command_type=command.type, reason=text, code=code),
                    command_id=command.command_id,
                )
                logger.info("command rejected: %s", text, extra=extra)
                self.accepted.add(command.command_id)
                await ack()
                return
            self.accepted.add(command.command_id)
            await self._take_lease(command.session_id)
            await ack()
            logger.info("command accepted", extra=extra)
            await self._start(command, body, state)

    def _rejection(
        self, command: cmd.Command, body: cmd.CommandBody, state: SessionState
    ) -> tuple[str, str] | None:
        if state.last_seq == 0:
            return "not_found", f"session {command.session_id} has no events"
        live = self.sessions.get(command.session_id)
        busy = live is not None and live.busy
        if isinstance(body, (cmd.CancelTask, cmd.StopAll)) and state.status in FINISHED_STATUSES:
            # Only a browser this executor still has open is left to close. The result stays.
            if live is not None:
                return None
            return (
                "invalid_state",
                f"the run already ended as {state.status} and no browser is open; "
                f"{command.type} does not change a finished run's result",
            )
        if isinstance(body, cmd.CancelTask):
            return (
                ("invalid_state", "session is already cancelled")
                if state.status == CANCELLED
                else None
            )
        if state.status == CANCELLED:
            return "invalid_state", f"session is cancelled; {command.type} is not possible"
        if isinstance(body, (cmd.ExecutePlan, cmd.RunTillEnd)):
            if isinstance(body, cmd.ExecutePlan) and body.mode not in EXECUTION_MODES:
                return (
                    "invalid_command",
                    f"unknown execution mode {body.mode!r}; use one of {', '.join(EXECUTION_MODES)}",
                )
            if not state.plan_ready:
                return (
                    "invalid_state",
                    f"session is {state.status} and has no ready plan to execute",
                )
            if state.status == RUNNING or busy:
                return "invalid_state", "session is already running"
            if state.blocked_step is not None:
                return "invalid_state", f"step {state.blocked_step} failed; retry or skip it first"
            if state.next_step is None:
                return "invalid_state", "every step of the plan has already passed or been skipped"
            return self._model_problem(state)
        if isinstance(body, cmd.PauseExecution):
            if (
                state.status != RUNNING
                or not busy
                or (live is not None and live.task_id in self._act_tasks(state))
            ):
                return (
                    "invalid_state",
                    f"session is {state.status}, not running a plan; nothing to pause",
                )
            return None
        if isinstance(body, cmd.ContinueExecution):
            if state.status not in (PAUSED, "stopped", "interrupted") or busy:
                return (
                    "invalid_state",
                    f"session is {state.status}; only a paused, stopped or interrupted session can continue",
                )
            if state.blocked_step is not None:
                return (
                    "invalid_state",
                    f"run till end is paused at failed step {state.blocked_step}; retry or skip it",
                )
            if state.next_step is None:
                return "invalid_state", "every step of the plan has already passed or been skipped"
            return self._model_problem(state)
        if isinstance(body, (cmd.RetryStep, cmd.SkipStep)):
            if state.blocked_step is None or busy:
                return (
                    "invalid_state",
                    f"session is {state.status} and no run till end is paused at a failed step",
                )
            return self._model_problem(state)
        if isinstance(body, cmd.Act):
            if state.status == RUNNING or busy:
                return "invalid_state", "session is running; pause it before act mode"
            if state.status not in ACT_STATUSES:
                return (
                    "invalid_state",
                    f"session is {state.status}; act runs only on a paused, plan_ready, stopped "
                    "or interrupted session",
                )
            if not body.task.strip():
                return "invalid_command", "act instruction is empty; write one instruction"
            return self._model_problem(state)
        if isinstance(body, cmd.StopAll):
            if state.status == "stopped" and not state.browser_open and not busy:
                return "invalid_state", "session is already stopped"
            return None
        return "invalid_command", f"command {command.type} is not an executor command"

    @staticmethod
    def _act_tasks(state: SessionState) -> set[str]:
        return {task.task_id for task in state.tasks.values() if task.task_type == "act_mode"}

    def _model_problem(self, state: SessionState) -> tuple[str, str] | None:
        if not (is_offline(state.llm_model) or is_gemini(state.llm_model)):
            return (
                "unsupported_model",
                f"model {state.llm_model!r} is not supported; use 'offline' or a gemini-* model",
            )
        if is_gemini(state.llm_model) and not self.settings.gemini_api_key:
            return (
                "model_unavailable",
                f"model {state.llm_model!r} needs GEMINI_API_KEY or GOOGLE_API_KEY on the executor",
            )
        return None

    def _live(self, state: SessionState) -> LiveSession:
        live = self.sessions.get(state.session_id)
        if live is None:
            live = LiveSession(
                self.js,
                self.store,
                self.settings,
                state,
                on_browser_closed=self._browser_closed,
                stopping=lambda: self.stopping,
            )
            self.sessions[state.session_id] = live
        elif not live.busy:
            live.replace_state(state)
        return live

    async def _start(
        self, command: cmd.Command, body: cmd.CommandBody, state: SessionState
    ) -> None:
        cid = command.command_id
        if isinstance(body, cmd.ExecutePlan):
            self._live(state).start_execution(body.task_id, cid, body.mode)
        elif isinstance(body, cmd.RunTillEnd):
            self._live(state).start_execution(body.task_id, cid, RUN_TILL_END)
        elif isinstance(body, cmd.ContinueExecution):
            live = self._live(state)
            current = state.current_task
            live.mode = (
                RUN_TILL_END
                if current is not None and current.task_type == RUN_TILL_END
                else EXECUTION
            )
            live.resume(body.task_id, cid)
        elif isinstance(body, cmd.RetryStep):
            live = self._live(state)
            live.mode = RUN_TILL_END
            live.resume(body.task_id, cid)
        elif isinstance(body, cmd.SkipStep):
            live = self._live(state)
            live.mode = RUN_TILL_END
            live.resume(body.task_id, cid, skip_step=state.blocked_step)
        elif isinstance(body, cmd.Act):
            self._live(state).start_act(body.task_id, cid, body.task, body.previous_context)
        elif isinstance(body, (cmd.StopAll, cmd.CancelTask)) and state.status in FINISHED_STATUSES:
            await self._close_finished(state, cid)
        elif isinstance(body, cmd.PauseExecution):
            # The in-memory request comes first, so the event carries this command's id.
            # The flag in the control bucket also reaches the owner's watch.
            self.sessions[state.session_id].request_pause(PAUSE_FLAG, cid)
            await set_control_flag(self.js, state.session_id, PAUSE_FLAG)
        elif isinstance(body, cmd.StopAll):
            live = self.sessions.get(state.session_id)
            if live is not None and live.busy:
                live.request_pause(STOP_ALL_FLAG, cid)
                await set_control_flag(self.js, state.session_id, STOP_ALL_FLAG)
            else:
                await self._live(state).stop_all(cid)
        elif isinstance(body, cmd.CancelTask):
            await set_control_flag(self.js, state.session_id, CANCEL_FLAG)
            await self._live(state).cancel(cid)

    async def _close_finished(self, state: SessionState, command_id: str) -> None:
        """Close the browser still open on a finished session without changing its status."""
        live = self.sessions[state.session_id]
        task = live.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=2)
        # The gateway put a cancel flag into the control bucket, and a finished run needs none.
        await clear_control_flag(self.js, state.session_id)
        await live.close_browser(FINISHED_CLOSE_REASON, command_id, force_event=True)
        logger.info(
            "closed the browser of a finished session; its status stays %s",
            state.status,
            extra={"session_id": state.session_id, "command_id": command_id},
        )

    async def _browser_closed(self, live: LiveSession) -> None:
        if self.sessions.get(live.session_id) is live:
            del self.sessions[live.session_id]
        await self._release_lease(live.session_id)

    # --- leases -----------------------------------------------------------------------

    async def _owner(self, session_id: str) -> str | None:
        assert self._leases is not None
        try:
            entry = await self._leases.get(session_id)
        except Exception:
            return None
        value = (entry.value or b"").decode() if entry is not None else ""
        return value or None

    async def _take_lease(self, session_id: str) -> None:
        assert self._leases is not None
        await self._leases.put(session_id, self.executor_id.encode())

    async def _release_lease(self, session_id: str) -> None:
        assert self._leases is not None
        if await self._owner(session_id) == self.executor_id:
            with contextlib.suppress(Exception):
                await self._leases.delete(session_id)

    async def _heartbeat(self) -> None:
        """Renew the leases of owned sessions from a thread with its own event loop and connection.

        In tests with three executors on a loaded two-core machine, a lease renewed on the
        main event loop lapsed while browser-use started Chromium, and the session was
        wrongly marked interrupted. A thread keeps the renewal independent of that loop.
        """
        stop = threading.Event()
        thread = threading.Thread(
            target=self._heartbeat_thread, args=(stop,), name="lease-heartbeat", daemon=True
        )
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            stop.set()

    def owned_sessions(self) -> list[str]:
        return [
            sid for sid, live in list(self.sessions.items()) if live.busy or live.browser.is_open
        ]

    def _heartbeat_thread(self, stop: threading.Event) -> None:
        async def beat() -> None:
            client = await connect(self.settings.nats_url, f"executor-{self.executor_id}-heartbeat")
            try:
                leases = await client.jetstream().key_value(subjects.LEASES_BUCKET)
                while not stop.is_set():
                    for session_id in self.owned_sessions():
                        try:
                            await leases.put(session_id, self.executor_id.encode())
                        except Exception as error:
                            logger.warning(
                                "lease renewal failed: %s", error, extra={"session_id": session_id}
                            )
                    await asyncio.sleep(HEARTBEAT_SECONDS)
            finally:
                await client.close()

        asyncio.run(beat())

    async def _watch_leases(self) -> None:
        assert self._leases is not None
        while True:
            try:
                watcher = await self._leases.watchall()
                async for entry in watcher:
                    if entry is None:
                        continue
                    if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                        self._lease_seen.pop(entry.key, None)
                    else:
                        self._lease_seen[entry.key] = (entry.value.decode(), time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("watching leases failed: %s", error)
                await asyncio.sleep(1.0)

    async def _check_expired_leases(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session_id, (owner, seen_at) in list(self._lease_seen.items()):
                if owner == self.executor_id or now - seen_at < LEASE_TTL_SECONDS + 1:
                    continue
                try:
                    await self._claim_interrupted(session_id, owner)
                except Exception as error:
                    logger.warning(
                        "marking an interrupted session failed: %s",
                        error,
                        extra={"session_id": session_id},
                    )

    async def _claim_interrupted(self, session_id: str, owner: str) -> None:
        """Append `session_interrupted` for a session whose owner stopped renewing its lease, once."""
        assert self._leases is not None
        claim = f"interrupted-by-{self.executor_id}".encode()
        try:
            await self._leases.create(session_id, claim)
        except Exception:
            current = await self._owner(session_id)
            if current != owner:
                self._lease_seen.pop(session_id, None)
            return
        self._lease_seen.pop(session_id, None)
        # Kill the dead owner's Chromium if it ran on this machine: it is found by the
        # session folder on its command line, which replicas sharing STEPWISE_HOME agree on.
        orphan = SessionBrowser(session_id, self.settings.chromium, self.settings.browsers_dir, "")
        killed = await asyncio.to_thread(orphan.kill_processes)
        if killed:
            logger.info(
                "killed Chromium left by a dead executor",
                extra={"session_id": session_id, "pids": killed},
            )
        try:
            state = fold(session_id, await self.store.read(session_id))
            reason = f"executor {owner} stopped renewing its lease on the session's browser"
            recorded = await self._record_lost_browser(state, owner, reason)
            if recorded is not None:
                logger.warning(
                    "%s: its executor is gone",
                    recorded,
                    extra={"session_id": session_id, "owner": owner},
                )
        finally:
            with contextlib.suppress(Exception):
                await self._leases.delete(session_id)

    async def _record_lost_browser(
        self, state: SessionState, owner: str, reason: str, interrupted: bool = False
    ) -> str | None:
        """Append what the loss of a session's browser means; return the event type appended.

        A session that was running or paused (or had accepted work, `interrupted`) gets
        `session_interrupted`, so that a continue resumes it on another executor. A
        session whose run had already ended only had its browser left open, so it gets
        `browser_closed` and keeps its status: a completed run stays completed.
        """
        if state.status in LIVE_STATUSES or interrupted:
            await self.store.append(
                state.session_id,
                ev.SessionInterrupted(
                    reason=reason,
                    executor_id=owner,
                    last_completed_step=state.last_completed_step,
                ),
            )
            return "session_interrupted"
        if state.browser_open:
            await self.store.append(state.session_id, ev.BrowserClosed(reason=reason))
            return "browser_closed"
        return None

    def begin_shutdown(self) -> None:
        """Mark the executor as stopping; called from the signal handler, so it only sets a flag."""
        self.stopping = True

    async def shutdown(self) -> None:
        self.stopping = True
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._inbox is not None:
            with contextlib.suppress(Exception):
                await self._inbox.unsubscribe()
        for live in list(self.sessions.values()):
            await live.shutdown()
            with contextlib.suppress(Exception):
                state = fold(live.session_id, await self.store.read(live.session_id))
                # A command accepted (and so acknowledged) just before the stop may have
                # had no event yet: without session_interrupted its session would wait
                # for ever, with no executor to continue it.
                unrecorded = live.task_id is not None and state.current_task_id != live.task_id
                await self._record_lost_browser(
                    state, self.executor_id, f"executor {self.executor_id} shut down", unrecorded
                )
            await self._release_lease(live.session_id)
        self.sessions.clear()
