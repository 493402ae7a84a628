"""Handlers of `stepwise.cmd.executor.*` commands; each acknowledges its command as soon as it is accepted."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from stepwise_libs import commands as cmd
from stepwise_libs import events as ev
from stepwise_libs.fold import CANCELLED, RUNNING, SessionState, fold
from stepwise_libs.jetstream import EventStore

from .models import is_gemini, is_offline
from .session import LiveSession
from .settings import ExecutorSettings

logger = logging.getLogger(__name__)

EXECUTION_MODES = ("execution", "run_till_end")


class ExecutorService:
    """Accepts executor commands and runs each session's work as an asyncio task."""

    def __init__(self, js: JetStreamContext, store: EventStore, settings: ExecutorSettings) -> None:
        self.js = js
        self.store = store
        self.settings = settings
        self.sessions: dict[str, LiveSession] = {}
        self.accepted: set[str] = set()
        self._lock = asyncio.Lock()

    async def handle(self, command: cmd.Command, body: cmd.CommandBody, message: Msg) -> None:
        extra = {"session_id": command.session_id, "command_id": command.command_id, "command_type": command.type}
        async with self._lock:
            if command.command_id in self.accepted:
                logger.info("duplicate command ignored", extra=extra)
                await message.ack()
                return
            events = await self.store.read(command.session_id)
            if any(event.command_id == command.command_id for event in events):
                # A redelivered command whose work already started: its events are in the stream.
                logger.info("redelivered command already handled", extra=extra)
                self.accepted.add(command.command_id)
                await message.ack()
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
                await message.ack()
                return
            self.accepted.add(command.command_id)
            await message.ack()
            logger.info("command accepted", extra=extra)
            await self._start(command, body, state)

    def _rejection(self, command: cmd.Command, body: cmd.CommandBody, state: SessionState) -> tuple[str, str] | None:
        if state.last_seq == 0:
            return "not_found", f"session {command.session_id} has no events"
        live = self.sessions.get(command.session_id)
        if isinstance(body, cmd.ExecutePlan):
            if body.mode not in EXECUTION_MODES:
                return "invalid_command", f"unknown execution mode {body.mode!r}; use one of {', '.join(EXECUTION_MODES)}"
            if not state.plan_ready:
                return "invalid_state", f"session is {state.status} and has no ready plan to execute"
            if state.status == CANCELLED:
                return "invalid_state", "session is cancelled"
            if state.status == RUNNING or (live is not None and live.busy):
                return "invalid_state", "session is already running"
            if not (is_offline(state.llm_model) or is_gemini(state.llm_model)):
                return "unsupported_model", f"model {state.llm_model!r} is not supported; use 'offline' or a gemini-* model"
            if is_gemini(state.llm_model) and not self.settings.gemini_api_key:
                return "model_unavailable", f"model {state.llm_model!r} needs GEMINI_API_KEY or GOOGLE_API_KEY on the executor"
            if state.next_step is None:
                return "invalid_state", "every step of the plan has already passed or been skipped"
            return None
        if isinstance(body, cmd.CancelTask):
            if state.status == CANCELLED:
                return "invalid_state", "session is already cancelled"
            return None
        # NOTE: pause, continue, act, run-till-end controls, retry, skip and stop-all are not built yet.
        return "not_supported", f"command {command.type} is not supported by this executor yet"

    async def _start(self, command: cmd.Command, body: cmd.CommandBody, state: SessionState) -> None:
        live = self.sessions.get(command.session_id)
        if isinstance(body, cmd.ExecutePlan):
            if live is None or live.busy:
                live = self.sessions[command.session_id] = LiveSession(self.js, self.store, self.settings, state)
            else:
                live.state = live.runner.state = state
            live.start_execution(body.task_id, command.command_id, body.mode)
        elif isinstance(body, cmd.CancelTask):
            if live is None:
                live = LiveSession(self.js, self.store, self.settings, state)
            await live.cancel(command.command_id)
            self.sessions.pop(command.session_id, None)

    async def shutdown(self) -> None:
        for live in list(self.sessions.values()):
            await live.shutdown()
        self.sessions.clear()
