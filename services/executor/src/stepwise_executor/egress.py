"""The executor's egress guard: no page may load from a private, loopback or cloud-metadata
address, or from a URL whose scheme is not http or https.

A session's browser could otherwise be pointed, by its target URL, a link, a redirect or a
model's navigation, at services that only the executor's network can reach (a cloud
metadata endpoint, a database admin page on 10.x). Every document request (main frame and
subframes, each redirect hop included) is paused through CDP `Fetch.requestPaused` at the
browser target, its host is resolved and classified here, and a blocked request is failed
with `Fetch.failRequest` before it leaves the browser. Hosts listed in
`STEPWISE_ALLOWED_HOSTS` skip the check.

Only http and https pages may open, and about:blank, which browser-use opens its tabs on.
Chromium lets an automation client open file:, chrome:, view-source:, data: and other URLs
that a web page itself may not open, and such a page could put a local file into a
screenshot. So the guard rejects a model's navigation to another scheme before it starts,
fails a paused request of another scheme (Chromium pauses file: requests), and navigates
any page that still shows another scheme to about:blank.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stepwise_libs.settings import SettingsError

logger = logging.getLogger(__name__)

ALLOWED_HOSTS_VARIABLE = "STEPWISE_ALLOWED_HOSTS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Names that cloud providers resolve to their instance metadata service. They are blocked
# by name, before any DNS lookup: GCP (metadata.google.internal, metadata.goog, metadata)
# and AWS EC2 (instance-data, instance-data.ec2.internal).
METADATA_HOSTNAMES = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
# Instance metadata addresses: AWS, GCP, Azure and OCI (169.254.169.254), AWS ECS task
# metadata (169.254.170.2), AWS over IPv6 (fd00:ec2::254), Alibaba Cloud (100.100.100.200).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(text)
    for text in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
ALLOWED_SCHEMES = frozenset({"http", "https"})
FORBIDDEN_SCHEME = "forbidden scheme"
# The page Chromium shows after a failed or blocked request, with only Chromium's error text.
ERROR_PAGE_URL = "chrome-error://chromewebdata/"
# Seconds one DNS lookup of the guard may take.
RESOLVE_TIMEOUT = 10.0
# Seconds a page of a forbidden scheme may take to show about:blank, and between checks.
BLANK_PAGE_TIMEOUT = 10.0
BLANK_PAGE_POLL_INTERVAL = 0.05

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_BRACKETED = re.compile(r"\[([^\]]+)\](?::([0-9]+))?")
_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*):", re.IGNORECASE)
# Chromium removes these from the ends of a URL (C0 controls and space), and tabs and line
# breaks from anywhere in it, before it reads the scheme.
_URL_EDGE_CHARACTERS = "".join(chr(code) for code in range(0x21))
_URL_REMOVED_CHARACTERS = str.maketrans("", "", "\t\n\r")
_EXPECTED_HOSTS = (
    "comma-separated entries `host` or `host:port`, each host an IP address or a hostname "
    "(an IPv6 address with a port in brackets, as `[::1]:8080`)"
)


# --- classification ------------------------------------------------------------------


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address carried inside an IPv6 one (mapped, NAT64 or 6to4), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def address_category(address: IPAddress) -> str | None:
    """Return why a browser must not connect to `address` ("loopback", "private", ...), or None.

    An IPv6 address that carries an IPv4 one (`::ffff:127.0.0.1`, `64:ff9b::a00:1`,
    `2002:a00:1::`) is judged by the IPv4 address, which is where the packets end up.
    """
    inner = embedded_ipv4(address)
    if inner is not None:
        address = inner
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    checks = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        # Shared address space (100.64.0.0/10) and the like: neither private nor public.
        ("non-global", not address.is_global),
    )
    for category, matched in checks:
        if matched:
            return category
    return None


def is_metadata_hostname(host: str) -> bool:
    return host.lower().rstrip(".") in METADATA_HOSTNAMES


def parse_address(host: str) -> IPAddress | None:
    """Return `host` as an IP address when it is an IP literal (brackets and zone id allowed)."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def url_scheme(url: str) -> str:
    """Return the lowercased scheme of `url` as Chromium reads it, or "" for a URL without one."""
    cleaned = url.translate(_URL_REMOVED_CHARACTERS).strip(_URL_EDGE_CHARACTERS)
    match = _SCHEME.match(cleaned)
    return match.group(1).lower() if match else ""


def is_forbidden_scheme(url: str) -> bool:
    """Tell whether the browser must not open `url`: anything but http, https and about:blank."""
    scheme = url_scheme(url)
    if scheme in ALLOWED_SCHEMES:
        return False
    if scheme == "about":
        cleaned = url.translate(_URL_REMOVED_CHARACTERS).strip(_URL_EDGE_CHARACTERS)
        page = re.split(r"[?#]", cleaned[len("about:") :], maxsplit=1)[0]
        return page.lower() != "blank"
    return True


# --- allowed hosts -------------------------------------------------------------------


@dataclass(frozen=True)
class AllowedHost:
    """One entry of `STEPWISE_ALLOWED_HOSTS`: a host, on any port when `port` is None."""

    host: str
    port: int | None = None

    def matches(self, host: str, port: int | None) -> bool:
        return self.host == host and (self.port is None or self.port == port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and self.port is not None else self.host
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True)
class AllowedHosts:
    """The hosts the guard lets through without a check of their addresses."""

    entries: tuple[AllowedHost, ...] = ()

    def allows(self, host: str, port: int | None) -> bool:
        canonical = canonical_host(host)
        return any(entry.matches(canonical, port) for entry in self.entries)

    def __str__(self) -> str:
        return ",".join(str(entry) for entry in self.entries)


def canonical_host(host: str) -> str:
    """Return `host` lowercased, without brackets or a trailing dot; an IP literal compressed."""
    address = parse_address(host)
    if address is not None:
        return address.compressed
    return host.lower().rstrip(".")


def parse_allowed_hosts(value: str, variable: str = ALLOWED_HOSTS_VARIABLE) -> AllowedHosts:
    """Parse comma-separated `host` or `host:port` entries; raise SettingsError naming the value."""
    if not value.strip():
        return AllowedHosts()
    entries = []
    for raw in value.split(","):
        entry = raw.strip()
        try:
            entries.append(_parse_entry(entry))
        except ValueError as error:
            raise SettingsError(variable, value, f"{_EXPECTED_HOSTS}; {error}") from None
    return AllowedHosts(tuple(entries))


def _parse_entry(entry: str) -> AllowedHost:
    if not entry:
        raise ValueError("an entry is empty")
    if "://" in entry:
        raise ValueError(f"{entry!r} is a URL: give only its host or host:port")
    bracketed = _BRACKETED.fullmatch(entry)
    if bracketed is not None:
        address = parse_address(bracketed.group(1))
        if not isinstance(address, ipaddress.IPv6Address):
            raise ValueError(f"{entry!r} has brackets around something other than an IPv6 address")
        return AllowedHost(address.compressed, _parse_port(entry, bracketed.group(2)))
    if entry.count(":") >= 2:
        address = parse_address(entry)
        if address is None:
            raise ValueError(f"{entry!r} is not an IPv6 address")
        return AllowedHost(address.compressed)
    host, colon, port_text = entry.partition(":")
    port = _parse_port(entry, port_text) if colon else None
    address = parse_address(host)
    if address is not None:
        return AllowedHost(address.compressed, port)
    name = host.lower().rstrip(".")
    if len(name) > 253 or not _HOSTNAME.fullmatch(name):
        raise ValueError(f"{entry!r} is neither an IP address nor a hostname")
    return AllowedHost(name, port)


def _parse_port(entry: str, text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r} has no port between 1 and 65535 after its last ':'")
    return int(text)


# --- checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockedRequest:
    """A URL the guard blocked, with the address that made it block the URL."""

    url: str
    host: str
    port: int | None
    # The IP address the host is or resolved to; None for a blocked metadata hostname.
    address: str | None
    category: str
    # Why the guard could not check the URL, when it blocked the URL for that reason.
    error: str | None = None

    @property
    def allow_entry(self) -> str:
        return str(AllowedHost(canonical_host(self.host), self.port))

    @property
    def message(self) -> str:
        if self.category == FORBIDDEN_SCHEME:
            scheme = url_scheme(self.url)
            why = f"its scheme {scheme}: is not allowed" if scheme else "it has no scheme"
            return (
                f"navigation to {self.url} was blocked: {why}. Only http and https URLs are "
                "allowed (and about:blank)"
            )
        if self.error is not None:
            why = f"the guard could not check its host {self.host}: {self.error}"
        elif self.address is None:
            why = f"its host {self.host} is a {self.category} hostname"
        elif canonical_host(self.host) == self.address:
            why = f"its host {self.host} is a {self.category} address"
        else:
            why = f"its host {self.host} resolved to {self.address}, a {self.category} address"
        return (
            f"navigation to {self.url} was blocked: {why}. To allow it, add "
            f"{self.allow_entry} to {ALLOWED_HOSTS_VARIABLE} on the executor "
            "(comma-separated host or host:port entries)"
        )


def url_host_port(url: str) -> tuple[str, int | None] | None:
    """Return the host and port a URL connects to, or None for a URL without a network host."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return None
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = DEFAULT_PORTS.get(parts.scheme.lower())
    return host, port


async def resolve(host: str, port: int | None) -> list[IPAddress]:
    """Return every address the system resolver gives for `host`; an IP literal as it is."""
    literal = parse_address(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=RESOLVE_TIMEOUT
    )
    addresses: list[IPAddress] = []
    for info in infos:
        address = parse_address(str(info[4][0]))
        if address is not None and address not in addresses:
            addresses.append(address)
    return addresses


def check_scheme(url: str) -> BlockedRequest | None:
    """Return why the browser must not open `url` for its scheme, or None when it may."""
    if is_forbidden_scheme(url):
        return BlockedRequest(url, "", None, None, FORBIDDEN_SCHEME)
    return None


async def check_url(url: str, allowed: AllowedHosts) -> BlockedRequest | None:
    """Return why the browser must not load `url`, or None when it may."""
    blocked = check_scheme(url)
    if blocked is not None:
        return blocked
    target = url_host_port(url)
    if target is None:
        # about:blank, the one URL of another scheme that passes, opens no connection.
        return None
    host, port = target
    if allowed.allows(host, port):
        return None
    if is_metadata_hostname(host):
        return BlockedRequest(url, host, port, None, "cloud metadata")
    try:
        addresses = await resolve(host, port)
    except (OSError, TimeoutError) as error:
        # A host that does not resolve here is left to Chromium, which then fails to load it
        # with its own error. NOTE: Chromium resolves the host again when it connects, so a
        # DNS server that answers differently the second time (DNS rebinding) can still
        # lead the browser to a blocked address. An attached browser (STEPWISE_BROWSER_CDP_URL)
        # resolves names on its own machine, which may return other addresses. So the check
        # is reliable for IP literals and stable names only.
        logger.info("egress check could not resolve %s: %s", host, error, extra={"url": url})
        return None
    for address in addresses:
        category = address_category(address)
        if category is not None:
            return BlockedRequest(url, host, port, address.compressed, category)
    return None


async def _open_blank_page(cdp_session: Any) -> None:
    """Navigate a page to about:blank and wait until its main frame has committed it.

    Page.navigate returns before a navigation that changes the renderer process (from a
    chrome: page, for one) commits, and a screenshot taken then still shows the old page.
    """
    client = cdp_session.cdp_client
    await client.send.Page.navigate(
        params={"url": "about:blank"}, session_id=cdp_session.session_id
    )
    for _ in range(int(BLANK_PAGE_TIMEOUT / BLANK_PAGE_POLL_INTERVAL)):
        tree = await client.send.Page.getFrameTree(session_id=cdp_session.session_id)
        if tree["frameTree"]["frame"].get("url") == "about:blank":
            return
        await asyncio.sleep(BLANK_PAGE_POLL_INTERVAL)
    raise TimeoutError(f"the page did not show about:blank within {BLANK_PAGE_TIMEOUT:g} seconds")


# --- the guard of one browser -----------------------------------------------------------


@dataclass
class EgressGuard:
    """Checks every document request of one session's browser; records what it blocked."""

    allowed: AllowedHosts
    session_id: str = ""
    blocked_requests: list[BlockedRequest] = field(default_factory=list)
    # Called with each blocked request, as it happens (the runner stops the step's agent with it).
    on_blocked: Callable[[BlockedRequest], None] | None = None
    # The browser context of this session in an attached (shared) browser.
    context_id: str | None = None
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def check_url(self, url: str) -> BlockedRequest | None:
        return await check_url(url, self.allowed)

    def guard_navigate_action(self, tools: Any) -> Any:
        """Make the `navigate` action of browser-use `tools` reject a URL of a forbidden scheme.

        The action (browser-use 0.13.14) opens its URL through CDP, which may open file: or
        chrome: pages that a page itself may not, and Chromium pauses no request for most of
        them. The offline model's "Go to" steps and Gemini's navigations both use the action.
        """
        from browser_use.agent.views import ActionResult

        actions = tools.registry.registry.actions
        action = actions["navigate"]
        navigate = action.function

        async def guarded_navigate(*, params: Any, **context: Any) -> Any:
            blocked = check_scheme(params.url)
            if blocked is None:
                return await navigate(params=params, **context)
            self.record(blocked)
            return ActionResult(error=blocked.message)

        actions["navigate"] = action.model_copy(update={"function": guarded_navigate})
        return tools

    async def leave_forbidden_pages(self, browser_session: Any) -> list[BlockedRequest]:
        """Record each page of a forbidden scheme and navigate it to about:blank.

        This catches what the checks before a navigation miss, such as a page that a script
        opened. Call it before a screenshot, so no screenshot shows such a page.
        """
        client = browser_session.cdp_client
        targets = (await client.send.Target.getTargets())["targetInfos"]
        found: list[BlockedRequest] = []
        for target in targets:
            if target.get("type") != "page":
                continue
            if self.context_id is not None and target.get("browserContextId") != self.context_id:
                continue
            cdp_session = await browser_session.get_or_create_cdp_session(
                target_id=target["targetId"], focus=False
            )
            tree = await cdp_session.cdp_client.send.Page.getFrameTree(
                session_id=cdp_session.session_id
            )
            # The target's URL can lag behind the main frame's committed one, and is empty
            # while a page opens. NOTE: a navigation that commits after this check is
            # caught by the next one only.
            urls = [tree["frameTree"]["frame"].get("url", ""), target.get("url", "")]
            forbidden = [
                url for url in urls if url not in ("", ERROR_PAGE_URL) and is_forbidden_scheme(url)
            ]
            if not forbidden:
                continue
            blocked = BlockedRequest(forbidden[0], "", None, None, FORBIDDEN_SCHEME)
            found.append(blocked)
            self.record(blocked)
            await _open_blank_page(cdp_session)
        return found

    async def attach(self, browser_session: Any, context_id: str | None = None) -> None:
        """Pause every document request of the browser (all its pages and frames) for a check.

        `browser_session` is a started browser-use BrowserSession; the interception runs on
        its root CDP connection, so it also covers tabs and frames that open later.
        `context_id` is the session's browser context in an attached browser.
        """
        # Imported here, not at module level: browser.py sets browser-use's telemetry
        # variables before the first import of browser_use, and settings.py imports this
        # module earlier.
        from browser_use.browser.events import BrowserReconnectedEvent

        self.context_id = context_id
        await self._intercept(browser_session.cdp_client)

        async def on_reconnected(event: BrowserReconnectedEvent) -> None:
            # browser-use 0.13.14 replaces its root CDP client when it reconnects, and the
            # interception of the old connection ended with it. Between the drop and this
            # call, a page that navigates by itself is not checked.
            logger.info("re-enabling the egress guard after a reconnect")
            await self._intercept(browser_session.cdp_client)

        browser_session.event_bus.on(BrowserReconnectedEvent, on_reconnected)

    async def _intercept(self, client: Any) -> None:
        def on_request_paused(event: Any, session_id: str | None = None) -> None:
            task = asyncio.create_task(self._decide(client, event, session_id))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        client.register.Fetch.requestPaused(on_request_paused)
        await client.send.Fetch.enable(
            params={
                "patterns": [
                    {"urlPattern": "*", "resourceType": "Document", "requestStage": "Request"}
                ]
            }
        )
        # NOTE: only documents are checked. Images, scripts and fetch() calls of an allowed
        # page can still reach a blocked address, though the page cannot read a
        # cross-origin response.

    async def _decide(self, client: Any, event: Any, session_id: str | None) -> None:
        request_id = event["requestId"]
        url = event["request"]["url"]
        try:
            blocked = await self.check_url(url)
        except Exception as error:
            # Fail closed: a request the guard could not judge does not leave.
            logger.exception("egress check failed", extra={"session_id": self.session_id})
            target = url_host_port(url) or ("", None)
            blocked = BlockedRequest(url, target[0], target[1], None, "unchecked", str(error))
        if blocked is not None and await self._owns_frame(client, event.get("frameId")):
            # Recorded before the request fails, so the step that caused it finds the record.
            self.record(blocked)
        try:
            if blocked is None:
                await client.send.Fetch.continueRequest(
                    params={"requestId": request_id}, session_id=session_id
                )
                return
            await client.send.Fetch.failRequest(
                params={"requestId": request_id, "errorReason": "BlockedByClient"},
                session_id=session_id,
            )
        except Exception as error:
            # The page or the browser went away while the request was paused.
            logger.debug("continuing or failing a paused request failed: %s", error)

    async def _owns_frame(self, client: Any, frame_id: str | None) -> bool:
        """Tell whether a paused request comes from this session's pages.

        A launched browser serves one session only. An attached browser is shared, and its
        interception receives the requests of every session's browser context.
        """
        if self.context_id is None or frame_id is None:
            return True
        try:
            targets = (await client.send.Target.getTargets())["targetInfos"]
        except Exception as error:
            logger.debug("listing the browser's targets failed: %s", error)
            return True
        for target in targets:
            if target.get("targetId") == frame_id:
                return target.get("browserContextId") == self.context_id
        # NOTE: a subframe's id is no target id, so a blocked subframe of another
        # session's page in a shared browser is recorded here as well.
        return True

    def record(self, blocked: BlockedRequest) -> None:
        self.blocked_requests.append(blocked)
        logger.warning(
            "blocked a navigation: %s",
            blocked.message,
            extra={"session_id": self.session_id, "url": blocked.url},
        )
        if self.on_blocked is not None:
            self.on_blocked(blocked)
