"""The whole stack as `stepwise up` runs it: each service its own process, on embedded servers.

One stack serves every end-to-end test of the run. Its nats-server and Postgres
are its own (not the suite's shared ones), so the services' durable consumers
see no other test's commands.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stepwise.sample_site import SampleSite, sample_test_case, serve_sample_site
from stepwise.stack import Stack, StackConfig

from .sessions import SessionRecord, run_test_case

# Nothing in these tests may reach a real Gemini API: empty keys read as unset.
OFFLINE_ENV = {
    "GEMINI_API_KEY": "",
    "GOOGLE_API_KEY": "",
    "STEPWISE_DEFAULT_MODEL": "offline",
    "ANONYMIZED_TELEMETRY": "false",
    "BROWSER_USE_VERSION_CHECK": "false",
    # Every site these tests serve listens on 127.0.0.1.
    "STEPWISE_ALLOWED_HOSTS": "127.0.0.1",
}


# Tests name their own NATS connections with this prefix, so that a violation they cause
# on purpose is not taken for a service's.
TEST_CLIENT_PREFIX = "tests-"


@dataclass
class SampleRuns:
    checkout: SessionRecord
    failing: SessionRecord


@pytest.fixture(scope="session")
def e2e_site() -> Iterator[SampleSite]:
    with serve_sample_site() as site:
        yield site


@contextmanager
def stack_home() -> Iterator[Path]:
    """Create a data folder for a stack outside pytest's temporary folders.

    Postgres runs as an unprivileged user when the tests run as root, so it must
    be able to walk down to its data. Each pytest start resets
    /tmp/pytest-of-<user> to mode 0700, so a concurrent pytest run would lock
    that user out of a folder under it.
    """
    home = Path(tempfile.mkdtemp(prefix="stepwise-e2e-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def home() -> Iterator[Path]:
    with stack_home() as path:
        yield path


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with stack_home() as home:
        yield from _run_stack(home)


def _run_stack(home: Path) -> Iterator[Stack]:
    config = StackConfig(
        home=home,
        port=0,
        restart=False,
        extra_env=dict(OFFLINE_ENV),
    )
    with Stack(config) as running:
        yield running
        # A service that died during the tests is a failure even if every test passed.
        dead = {
            name: service.process.returncode
            for name, service in running.services.items()
            if service.process is not None and service.process.poll() is not None
        }
        assert not dead, f"services exited during the tests (name: exit code): {dead}"
        # Each service runs as its own NATS user: a subject its rights lack shows up here.
        violations = service_violations(running)
        assert not violations, "NATS permission violations by the services:\n" + "\n".join(
            violations
        )


def service_violations(stack: Stack) -> list[str]:
    """Return the permission violations in the nats-server log, leaving out test clients."""
    if stack.nats is None:
        return []
    log = stack.nats.log_path.read_text(errors="replace")
    return [
        line
        for line in log.splitlines()
        if "Violation" in line and f":{TEST_CLIENT_PREFIX}" not in line
    ]


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
async def sample_runs(stack: Stack, e2e_site: SampleSite) -> SampleRuns:
    """Both bundled sample cases, run to their end once for the tests that inspect them."""
    checkout = await run_test_case(
        stack.gateway_url, sample_test_case("checkout"), e2e_site.base_url
    )
    failing = await run_test_case(stack.gateway_url, sample_test_case("failing"), e2e_site.base_url)
    return SampleRuns(checkout=checkout, failing=failing)
