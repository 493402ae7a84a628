"""The browser of each session, driven through browser-use's BrowserSession.

By default each session launches its own headless Chromium. With STEPWISE_BROWSER_CDP_URL
set, each session instead attaches over CDP to a Chromium that runs elsewhere, and works in
a browser context of its own there. Closing the session disposes of that context and
leaves the browser running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
from browser_use import BrowserProfile, BrowserSession
from browser_use.browser.events import SwitchTabEvent
from cdp_use import CDPClient
from cdp_use.cdp.target.commands import CreateTargetParameters
from pydantic import PrivateAttr

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
# Chromium preferences of a new profile. With autofill on, Chromium stores the text a
# submitted form's fields held, such as a secret typed into a text field, in the
# profile's "Web Data" file while the browser runs.
PROFILE_PREFERENCES = {
    "autofill": {"enabled": False, "profile_enabled": False, "credit_card_enabled": False},
    "credentials_enable_service": False,
    "profile": {"password_manager_enabled": False},
}
# Seconds to reach a remote browser's DevTools endpoint, and for one of our own CDP calls on it.
ATTACH_TIMEOUT = 15.0
CDP_CALL_TIMEOUT = 5.0
# Seconds between two looks at killed processes that may have turned into zombies.
ZOMBIE_CHECK_SECONDS = 0.05


class RemoteBrowserUnreachable(BrowserStartError):
    """The DevTools endpoint of STEPWISE_BROWSER_CDP_URL could not be reached, so no retry."""


class ContextBrowserSession(BrowserSession):
    """A browser-use session whose new tabs open in one browser context of a shared browser.

    NOTE: browser-use 0.13.14 still attaches to every page of the browser. Its tab list
    shows other contexts' pages, and when the focused page closes or crashes it moves its
    focus to any other page, which can belong to another session.
    """

    _stepwise_context_id: str | None = PrivateAttr(default=None)

    async def _cdp_create_new_page(
        self, url: str = "about:blank", background: bool = False, new_window: bool = False
    ) -> str:
        if self._stepwise_context_id is None:
            return await super()._cdp_create_new_page(url, background, new_window)
        params = CreateTargetParameters(
            url=url, background=background, browserContextId=self._stepwise_context_id
        )
        if new_window:
            params["newWindow"] = True
        result = await self.cdp_client.send.Target.createTarget(params=params)
        return result["targetId"]


async def devtools_websocket_url(cdp_url: str) -> str:
    """Return the DevTools WebSocket URL: `cdp_url` itself, or the one its /json/version names."""
    parts = urlsplit(cdp_url)
    if parts.scheme in ("ws", "wss"):
        return cdp_url
    version_url = cdp_url.rstrip("/")
    if not version_url.endswith("/json/version"):
        version_url += "/json/version"
    try:
        # No proxy from the environment: the pool is reached directly, like any other target.
        async with httpx.AsyncClient(timeout=ATTACH_TIMEOUT, trust_env=False) as client:
            response = await client.get(version_url)
            response.raise_for_status()
            ws_url = response.json()["webSocketDebuggerUrl"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        detail = str(error) or type(error).__name__
        raise RemoteBrowserUnreachable(
            f"the remote browser at STEPWISE_BROWSER_CDP_URL={cdp_url} is unreachable:"
            f" GET {version_url} failed: {detail}"
        ) from error
    if not isinstance(ws_url, str) or not ws_url.startswith(("ws://", "wss://")):
        raise RemoteBrowserUnreachable(
            f"the remote browser at STEPWISE_BROWSER_CDP_URL={cdp_url} returned no DevTools"
            f" WebSocket URL from {version_url}: {ws_url!r}"
        )
    return ws_url


async def _connect(cdp_url: str, ws_url: str) -> CDPClient:
    """Open our own DevTools connection to the remote browser at `ws_url`."""
    client = CDPClient(ws_url)
    try:
        await asyncio.wait_for(client.start(), timeout=ATTACH_TIMEOUT)
    except Exception as error:
        with contextlib.suppress(Exception):
            await client.stop()
        detail = str(error) or type(error).__name__
        raise RemoteBrowserUnreachable(
            f"the remote browser at STEPWISE_BROWSER_CDP_URL={cdp_url} is unreachable:"
            f" connecting to {ws_url} failed: {detail}"
        ) from error
    return client


class SessionBrowser:
    """The browser of one session, with its own folder under `$STEPWISE_HOME/executor/<session_id>`.

    With `cdp_url`, the session attaches to that browser instead of launching one: it opens a
    browser context of its own there (its own cookies and storage, and the pages it opens), and
    closing disposes of that context only.
    """

    def __init__(
        self,
        session_id: str,
        chromium: str,
        browsers_dir: Path,
        target_url: str,
        cdp_url: str | None = None,
    ) -> None:
        self.session_id = session_id
        self.folder = browsers_dir / session_id
        self.chromium = chromium
        self.target_url = target_url
        self.cdp_url = cdp_url
        self.session: BrowserSession | None = None
        self.pid: int | None = None
        # Attached mode: our own CDP connection to the remote browser, and the context we made.
        self._client: CDPClient | None = None
        self.context_id: str | None = None

    @property
    def attached(self) -> bool:
        return self.cdp_url is not None

    async def start(self) -> BrowserSession:
        """Start Chromium, retrying a failed start because browser-use 0.13.14 can lose the race
        for the first page target on a loaded machine ("Target ... not found")."""
        if self.session is not None:
            return self.session
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                if self.cdp_url is not None:
                    return await self._attach_once(self.cdp_url)
                return await self._start_once()
            except BrowserStartError as error:
                if attempt == START_ATTEMPTS or isinstance(error, RemoteBrowserUnreachable):
                    raise
                logger.warning(
                    "browser start failed, retrying: %s",
                    error.message,
                    extra={"session_id": self.session_id, "attempt": attempt},
                )
        raise AssertionError("unreachable")

    async def _start_once(self) -> BrowserSession:
        self.folder.mkdir(parents=True, exist_ok=True)
        preferences = self.folder / "profile" / "Default" / "Preferences"
        if not preferences.exists():
            preferences.parent.mkdir(parents=True, exist_ok=True)
            preferences.write_text(json.dumps(PROFILE_PREFERENCES))
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

    async def _attach_once(self, cdp_url: str) -> BrowserSession:
        """Open a browser context with one blank page in the remote browser and drive that page."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ws_url = await devtools_websocket_url(cdp_url)
        self._client = await _connect(cdp_url, ws_url)
        page_id = await self._open_context(cdp_url)

        profile = BrowserProfile(
            cdp_url=ws_url,
            is_local=False,
            keep_alive=True,
            enable_default_extensions=False,
            # Downloads would land on the remote machine, in a folder that browser-use sets
            # for the whole browser. A session has no use for them.
            accept_downloads=False,
            auto_download_pdfs=False,
            highlight_elements=False,
            dom_highlight_elements=False,
        )
        session = ContextBrowserSession(browser_profile=profile)
        session._stepwise_context_id = self.context_id
        self.session = session
        try:
            await session.start()
            # browser-use focuses the first page of the browser, so move it to our page.
            switch = session.event_bus.dispatch(SwitchTabEvent(target_id=page_id))
            await switch
            await switch.event_result(raise_if_any=True, raise_if_none=False)
        except Exception as error:
            await self.close()
            raise BrowserStartError(
                f"attaching to the remote browser at STEPWISE_BROWSER_CDP_URL={cdp_url}"
                f" failed: {error}"
            ) from error
        logger.info(
            "attached to remote browser",
            extra={"session_id": self.session_id, "cdp_url": cdp_url, "context": self.context_id},
        )
        return session

    async def _open_context(self, cdp_url: str) -> str:
        """Create the session's browser context with a blank page in it; return the page's id."""
        assert self._client is not None
        try:
            # With disposeOnDetach, the browser drops the context and its pages as soon as
            # this connection closes, also when the executor dies.
            created = await asyncio.wait_for(
                self._client.send.Target.createBrowserContext(params={"disposeOnDetach": True}),
                timeout=CDP_CALL_TIMEOUT,
            )
            self.context_id = created["browserContextId"]
            page = await asyncio.wait_for(
                self._client.send.Target.createTarget(
                    params={"url": "about:blank", "browserContextId": self.context_id}
                ),
                timeout=CDP_CALL_TIMEOUT,
            )
        except Exception as error:
            await self.close()
            raise BrowserStartError(
                f"the remote browser at STEPWISE_BROWSER_CDP_URL={cdp_url} failed to open a"
                f" browser context for the session: {error or type(error).__name__}"
            ) from error
        return str(page["targetId"])

    async def halt(self) -> None:
        """Stop the browser from acting at once.

        Kills a launched Chromium, or closes the session's pages in an attached one."""
        if self.attached:
            session = self.session
            if session is not None and session.is_cdp_connected:
                # Cut browser-use's own connection first, because once its page closes it
                # would move its focus to another page of the shared browser. browser-use's
                # stop() sets the same flag to keep it from reconnecting.
                session._intentional_stop = True
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(session.cdp_client.stop(), timeout=CDP_CALL_TIMEOUT)
            await self._dispose_context()
        else:
            await asyncio.to_thread(self.kill_processes)

    async def _dispose_context(self) -> None:
        client, context_id = self._client, self.context_id
        self.context_id = None
        if client is None or context_id is None:
            return
        try:
            await asyncio.wait_for(
                client.send.Target.disposeBrowserContext(params={"browserContextId": context_id}),
                timeout=CDP_CALL_TIMEOUT,
            )
        except (Exception, asyncio.CancelledError):
            # Closing the connection below disposes of it as well (disposeOnDetach).
            logger.warning(
                "disposing of the browser context failed",
                exc_info=True,
                extra={"session_id": self.session_id, "context": context_id},
            )

    async def _detach(self, session: BrowserSession | None) -> None:
        """Stop browser-use, dispose of our context and close our connection.

        The remote browser itself keeps running: nothing here kills or closes it."""
        if session is not None:
            try:
                # stop() only disconnects, and the remote browser keeps running.
                await asyncio.wait_for(session.stop(), timeout=10)
            except (Exception, asyncio.CancelledError):
                logger.warning(
                    "browser-use stop failed", exc_info=True, extra={"session_id": self.session_id}
                )
        await self._dispose_context()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(client.stop(), timeout=CDP_CALL_TIMEOUT)

    @property
    def is_open(self) -> bool:
        return self.session is not None

    async def screenshot(self) -> bytes:
        assert self.session is not None
        return await self.session.take_screenshot(format="png")

    async def close(self, graceful: bool = True) -> None:
        """Close the browser, kill any Chromium process left of it and remove the session folder.

        An attached session closes its own browser context only, even when not `graceful`."""
        session, self.session = self.session, None
        if self.attached:
            await self._detach(session)
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        if session is not None and graceful:
            try:
                await asyncio.wait_for(session.kill(), timeout=10)
            except (Exception, asyncio.CancelledError):
                logger.warning(
                    "browser-use kill failed", exc_info=True, extra={"session_id": self.session_id}
                )
        # The scan and the wait for exits take a second or more; keep them off the event loop.
        await asyncio.to_thread(self.kill_processes)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.pid = None

    def kill_launched_tree(self) -> dict[int, psutil.Process]:
        """Send SIGKILL to the launched Chromium and its children without waiting for them.

        It reads only this process tree from /proc, so it is quick enough to call on the
        event loop when a cancel must stop the browser at once."""
        victims: dict[int, psutil.Process] = {}
        if self.attached or self.pid is None:
            return victims
        try:
            root = psutil.Process(self.pid)
            victims[root.pid] = root
            for child in root.children(recursive=True):
                victims[child.pid] = child
        except psutil.NoSuchProcess:
            pass
        _kill(victims.values())
        return victims

    def kill_processes(self) -> list[int]:
        """Kill this session's Chromium: the launched process, its children, any using the folder.

        An attached session launched nothing and kills nothing: the remote browser is not ours."""
        if self.attached:
            return []
        # The known process tree dies first; the scan of every command line below is slower.
        victims = self.kill_launched_tree()
        marker = str(self.folder)
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = process.info.get("cmdline") or []
            if process.pid not in victims and any(marker in part for part in cmdline):
                found[process.pid] = process
        _kill(found.values())
        victims.update(found)
        _wait_for_exit(victims.values(), timeout=3)
        return list(victims)


def _wait_for_exit(processes: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited or is a zombie, for at most `timeout` seconds.

    Returns the processes still running at the end.

    A killed Chromium's child processes belong to the init process once their parent
    is gone, and stay zombies until it reaps them, which in some containers takes a
    second or two. A zombie runs no code and uses no memory, so it counts as gone.
    `psutil.wait_procs` alone would wait for the reaping.
    """
    deadline = time.monotonic() + timeout
    remaining = list(processes)
    while remaining:
        remaining = [process for process in remaining if _running(process)]
        left = deadline - time.monotonic()
        if not remaining or left <= 0:
            return remaining
        # Returns as soon as all have exited; otherwise look again for new zombies.
        _, remaining = psutil.wait_procs(remaining, timeout=min(ZOMBIE_CHECK_SECONDS, left))
    return remaining


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
