"""The egress guard's pure parts: address classes, metadata names, STEPWISE_ALLOWED_HOSTS.

Everything here is a pure function or resolves loopback names only: no test opens a
connection, and none resolves a name that would leave the machine.
"""

from __future__ import annotations

import ipaddress

import pytest
from stepwise_executor.egress import (
    AllowedHost,
    BlockedRequest,
    address_category,
    check_url,
    is_forbidden_scheme,
    is_metadata_hostname,
    parse_allowed_hosts,
    url_host_port,
    url_scheme,
)
from stepwise_libs.settings import SettingsError


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("169.254.169.254", "cloud metadata"),
        ("169.254.170.2", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("10.255.255.254", "private"),
        ("172.16.5.4", "private"),
        ("192.168.0.1", "private"),
        ("192.168.254.3", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "private"),
        ("100.64.0.1", "non-global"),
        # IPv4 addresses inside IPv6 ones are judged by the IPv4 address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:7f00:1", "loopback"),
        ("::ffff:10.1.2.3", "private"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),
        ("2002:c0a8:101::1", "private"),
    ],
)
def test_address_category_refuses_non_public(address: str, category: str) -> None:
    assert address_category(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_address_category_passes_public(address: str) -> None:
    assert address_category(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "host",
    [
        "metadata.google.internal",
        "METADATA.google.internal.",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
    ],
)
def test_metadata_hostnames_are_recognized(host: str) -> None:
    assert is_metadata_hostname(host)


@pytest.mark.parametrize("host", ["metadata.example.org", "google.internal", "example.com"])
def test_other_hostnames_are_not_metadata(host: str) -> None:
    assert not is_metadata_hostname(host)


async def test_metadata_hostname_refused_without_lookup() -> None:
    # Refused by name: check_url returns before any DNS lookup of the name.
    blocked = await check_url(
        "http://metadata.google.internal/computeMetadata/v1/", parse_allowed_hosts("")
    )
    assert blocked is not None
    assert blocked.address is None
    assert blocked.category == "cloud metadata"
    assert "metadata.google.internal is a cloud metadata hostname" in blocked.message
    assert "STEPWISE_ALLOWED_HOSTS" in blocked.message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8080/a", ("127.0.0.1", 8080)),
        ("https://Example.COM/", ("example.com", 443)),
        ("http://[::1]/", ("::1", 80)),
        ("http://[::ffff:127.0.0.1]:81/", ("::ffff:127.0.0.1", 81)),
        ("about:blank", None),
        ("data:text/html,hi", None),
        ("file:///etc/hostname", None),
    ],
)
def test_url_host_port(url: str, expected: tuple[str, int] | None) -> None:
    assert url_host_port(url) == expected


async def test_check_url_refuses_ip_literals() -> None:
    allowed = parse_allowed_hosts("")
    for url, address, category in [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "cloud metadata"),
        ("http://10.0.0.5:8080/", "10.0.0.5", "private"),
        ("http://192.168.1.1/", "192.168.1.1", "private"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254", "cloud metadata"),
        ("http://[fc00::5]/", "fc00::5", "private"),
        ("http://[::ffff:127.0.0.1]:9/", "::ffff:7f00:1", "loopback"),
    ]:
        blocked = await check_url(url, allowed)
        assert blocked is not None, url
        assert blocked.address == address
        assert blocked.category == category


async def test_check_url_resolves_localhost() -> None:
    blocked = await check_url("http://localhost:9/", parse_allowed_hosts("127.0.0.1:9"))
    assert blocked is not None
    assert blocked.category == "loopback"
    assert "its host localhost resolved to" in blocked.message
    assert "add localhost:9 to STEPWISE_ALLOWED_HOSTS" in blocked.message


async def test_check_url_passes_allowed_and_public() -> None:
    allowed = parse_allowed_hosts("127.0.0.1:8765,localhost,[::1]:81")
    assert await check_url("http://127.0.0.1:8765/cart", allowed) is None
    assert await check_url("http://localhost:1234/", allowed) is None
    assert await check_url("http://[::1]:81/", allowed) is None
    assert await check_url("http://[::1]:82/", allowed) is not None
    assert await check_url("http://127.0.0.1:8766/", allowed) is not None
    # A public IP literal is not resolved and not refused.
    assert await check_url("https://93.184.216.34/", allowed) is None


@pytest.mark.parametrize(
    "url",
    [
        "file:///root/.stepwise/nats-users.json",
        "FILE:///etc/passwd",
        "  file:///etc/passwd",
        "fi\tle:///etc/passwd",
        "\x00file:///etc/passwd",
        "chrome://version",
        "chrome://settings/passwords",
        "chrome-extension://abcdefghijklmnop/page.html",
        "chrome-untrusted://terminal/",
        "chrome-error://chromewebdata/",
        "devtools://devtools/bundled/inspector.html",
        "view-source:http://127.0.0.1/",
        "view-source:file:///etc/passwd",
        "data:text/html,<h1>hi</h1>",
        "javascript:alert(1)",
        "blob:http://other.example/0b4c1a2e",
        "filesystem:http://127.0.0.1/temporary/a",
        "ftp://127.0.0.1/",
        "ws://127.0.0.1/",
        "about:version",
        "about:srcdoc",
        "about:blankx",
        "example.com/path",
        "//example.com/",
        "",
    ],
)
def test_forbidden_scheme_rejected(url: str) -> None:
    assert is_forbidden_scheme(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8765/",
        "HTTPS://example.com/a?b#c",
        " https://example.com/",
        "about:blank",
        "ABOUT:BLANK",
        "about:blank#top",
        "about:blank?x=1",
    ],
)
def test_http_and_about_blank_allowed(url: str) -> None:
    assert not is_forbidden_scheme(url)


def test_url_scheme_as_chromium_reads_it() -> None:
    assert url_scheme("FiLe:///etc/passwd") == "file"
    assert url_scheme("\n view-\tsource:http://a/") == "view-source"
    assert url_scheme("chrome-extension://id/") == "chrome-extension"
    assert url_scheme("example.com/a") == ""
    assert url_scheme("1http://a/") == ""


async def test_check_url_rejects_file_before_hosts() -> None:
    # An allowed-hosts entry does not open other schemes.
    blocked = await check_url("file:///etc/passwd", parse_allowed_hosts("localhost"))
    assert blocked is not None
    assert blocked.category == "forbidden scheme"
    assert blocked.message == (
        "navigation to file:///etc/passwd was blocked: its scheme file: is not allowed. "
        "Only http and https URLs are allowed (and about:blank)"
    )
    assert await check_url("about:blank", parse_allowed_hosts("")) is None


async def test_check_url_names_missing_scheme() -> None:
    blocked = await check_url("example.com/a", parse_allowed_hosts(""))
    assert blocked is not None
    assert "navigation to example.com/a was blocked: it has no scheme" in blocked.message
    assert "STEPWISE_ALLOWED_HOSTS" not in blocked.message


def test_refusal_message_names_url_address_and_fix() -> None:
    blocked = BlockedRequest("http://db.internal:5432/", "db.internal", 5432, "10.1.2.3", "private")
    assert blocked.message == (
        "navigation to http://db.internal:5432/ was blocked: its host db.internal resolved to "
        "10.1.2.3, a private address. To allow it, add db.internal:5432 to "
        "STEPWISE_ALLOWED_HOSTS on the executor (comma-separated host or host:port entries)"
    )
    literal = BlockedRequest("http://[::1]:81/", "::1", 81, "::1", "loopback")
    assert "its host ::1 is a loopback address" in literal.message
    assert "add [::1]:81 to STEPWISE_ALLOWED_HOSTS" in literal.message


def test_parse_allowed_hosts_forms() -> None:
    parsed = parse_allowed_hosts(
        " 127.0.0.1:8765, localhost ,::1,[::1]:8080,Intranet.Example.,10.0.0.7,[fd00::1]"
    )
    assert parsed.entries == (
        AllowedHost("127.0.0.1", 8765),
        AllowedHost("localhost"),
        AllowedHost("::1"),
        AllowedHost("::1", 8080),
        AllowedHost("intranet.example"),
        AllowedHost("10.0.0.7"),
        AllowedHost("fd00::1"),
    )
    assert parsed.allows("intranet.example", 443)
    assert parsed.allows("[::1]", 8080)
    assert not parsed.allows("127.0.0.1", 8766)
    assert (
        str(parsed) == "127.0.0.1:8765,localhost,::1,[::1]:8080,intranet.example,10.0.0.7,fd00::1"
    )


def test_parse_allowed_hosts_empty_is_none() -> None:
    assert parse_allowed_hosts("").entries == ()
    assert parse_allowed_hosts("  ").entries == ()


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("127.0.0.1,", "an entry is empty"),
        ("http://127.0.0.1:8765", "'http://127.0.0.1:8765' is a URL: give only its host"),
        ("127.0.0.1:0", "has no port between 1 and 65535"),
        ("127.0.0.1:70000", "has no port between 1 and 65535"),
        ("localhost:http", "has no port between 1 and 65535"),
        ("*.example.com", "'*.example.com' is neither an IP address nor a hostname"),
        ("exa mple.com", "is neither an IP address nor a hostname"),
        ("[127.0.0.1]:80", "brackets around something other than an IPv6 address"),
        ("fe80::1::2", "'fe80::1::2' is not an IPv6 address"),
        ("example.com/path", "is neither an IP address nor a hostname"),
    ],
)
def test_parse_allowed_hosts_rejects_malformed(value: str, detail: str) -> None:
    with pytest.raises(SettingsError) as raised:
        parse_allowed_hosts(value)
    message = str(raised.value)
    assert message.startswith(f"invalid STEPWISE_ALLOWED_HOSTS={value!r}")
    assert detail in message


def test_executor_settings_read_allowed_hosts(make_settings) -> None:
    settings = make_settings(STEPWISE_ALLOWED_HOSTS="127.0.0.1:8765,localhost")
    assert str(settings.allowed_hosts) == "127.0.0.1:8765,localhost"
    with pytest.raises(SettingsError, match=r"STEPWISE_ALLOWED_HOSTS='127\.0\.0\.1:x'"):
        make_settings(STEPWISE_ALLOWED_HOSTS="127.0.0.1:x")
