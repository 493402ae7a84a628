"""One headless Chromium per session, driven through browser-use's BrowserSession."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import psutil
from browser_use import BrowserProfile, BrowserSession

from .errors import BrowserStartError

logger = logging.getLogger(__name__)

# browser-use reads these at import time as well; set them before any agent starts.
os.environ.setdefault("ANONYMIZED_TELEMETRY", "false")
os.environ.setdefault("BROWSER_USE_VERSION_CHECK", "false")

BASE_ARGS = [
    "--no-sandbox",
    "--no-startup-window",
    "--disable-features=NetworkTimeServiceQuerying",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_ATTEMPTS = 3


class SessionBrowser:
    """The browser of one session, with its own folder under `$STEPWISE_HOME/executor/<session_id>`."""

    def __init__(self, session_id: str, chromium: str, browsers_dir: Path, target_url: str) -> None:
        self.session_id = session_id
        self.folder = browsers_dir / session_id
        self.chromium = chromium
        self.target_url = target_url
        self.session: BrowserSession | None = None
        self.pid: int | None = None

    async def start(self) -> BrowserSession:
        """Start Chromium, retrying a failed start because browser-use 0.13.14 can lose the race
        for the first page target on a loaded machine ("Target ... not found")."""
        if self.session is not None:
            return self.session
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return await self._start_once()
            except BrowserStartError as error:
                if attempt == START_ATTEMPTS:
                    raise
                logger.warning(
                    "browser start failed, retrying: %s",
                    error.message,
                    extra={"session_id": self.session_id, "attempt": attempt},
                )
        raise AssertionError("unreachable")

    async def _start_once(self) -> BrowserSession:
        self.folder.mkdir(parents=True, exist_ok=True)
        profile = BrowserProfile(
            executable_path=self.chromium,
            headless=True,
            # keep_alive keeps browser-use from closing the browser when an Agent run ends,
            # so every step of the session runs in the same page.
            keep_alive=True,
            enable_default_extensions=False,
            user_data_dir=str(self.folder / "profile"),
            downloads_path=str(self.folder / "downloads"),
            # The runner attaches the egress guard (egress.py), which checks every page request.
            args=list(BASE_ARGS),
            highlight_elements=False,
            dom_highlight_elements=False,
        )
        session = BrowserSession(browser_profile=profile)
        self.session = session
        try:
            await session.start()
        except Exception as error:
            await self.close()
            raise BrowserStartError(
                f"Chromium at {self.chromium} failed to start: {error}"
            ) from error
        watchdog = getattr(session, "_local_browser_watchdog", None)
        self.pid = getattr(watchdog, "browser_pid", None)
        logger.info("browser started", extra={"session_id": self.session_id, "pid": self.pid})
        return session

    @property
    def is_open(self) -> bool:
        return self.session is not None

    async def screenshot(self) -> bytes:
        assert self.session is not None
        return await self.session.take_screenshot(format="png")

    async def close(self, graceful: bool = True) -> None:
        """Close the browser, kill any Chromium process left of it and remove the session folder."""
        session, self.session = self.session, None
        if session is not None and graceful:
            try:
                await asyncio.wait_for(session.kill(), timeout=10)
            except (Exception, asyncio.CancelledError):
                logger.warning(
                    "browser-use kill failed", exc_info=True, extra={"session_id": self.session_id}
                )
        self.kill_processes()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.pid = None

    def kill_processes(self) -> list[int]:
        """Kill Chromium processes of this session: the launched one, its children, and any using the folder."""
        victims: dict[int, psutil.Process] = {}
        if self.pid is not None:
            try:
                root = psutil.Process(self.pid)
                victims[root.pid] = root
                for child in root.children(recursive=True):
                    victims[child.pid] = child
            except psutil.NoSuchProcess:
                pass
        # The known process tree dies first; the scan of every command line below is slower.
        _kill(victims.values())
        marker = str(self.folder)
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = process.info.get("cmdline") or []
            if process.pid not in victims and any(marker in part for part in cmdline):
                found[process.pid] = process
        _kill(found.values())
        victims.update(found)
        psutil.wait_procs(list(victims.values()), timeout=3)
        return list(victims)


def _kill(processes: Iterable[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def session_processes(folder: Path) -> list[int]:
    """Return the pids of processes whose command line names a session folder."""
    marker = str(folder)
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(marker in part for part in cmdline):
            found.append(process.pid)
    return found
