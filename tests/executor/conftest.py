"""Helpers of the executor tests: sessions with a plan appended straight to the event stream."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from stepwise_executor.settings import ExecutorSettings
from stepwise_libs import events as ev
from stepwise_libs.fold import SessionState, fold
from stepwise_libs.jetstream import EventStore
from stepwise_libs.phrases import split_test_case

from stepwise.sample_site import SampleSite, serve_sample_site


@pytest.fixture(scope="session")
def sample_site() -> Iterator[SampleSite]:
    site = serve_sample_site()
    yield site
    site.stop()


@pytest.fixture
def executor_home(tmp_path: Path) -> Path:
    home = tmp_path / "stepwise-home"
    home.mkdir()
    return home


@pytest.fixture
def make_settings(
    monkeypatch: pytest.MonkeyPatch, executor_home: Path
) -> Callable[..., ExecutorSettings]:
    """Build ExecutorSettings from the environment, with STEPWISE_HOME in the test's folder."""

    def build(**env: str) -> ExecutorSettings:
        monkeypatch.setenv("STEPWISE_HOME", str(executor_home))
        monkeypatch.setenv("STEPWISE_STEP_TIMEOUT", "60")
        # Every page these tests serve listens on 127.0.0.1.
        monkeypatch.setenv("STEPWISE_ALLOWED_HOSTS", "127.0.0.1")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return ExecutorSettings()

    return build


async def create_planned_session(
    store: EventStore, test_case: str, target_url: str, model: str = "offline"
) -> SessionState:
    """Append session_created, plan_started and plan_completed for `test_case`; return the folded state."""
    session_id = str(uuid.uuid4())
    plan_id = str(uuid.uuid4())
    steps = split_test_case(test_case)
    await store.append(
        session_id, ev.SessionCreated(test_case=test_case, target_url=target_url, llm_model=model)
    )
    await store.append(session_id, ev.PlanStarted(plan_id=plan_id, model=model))
    await store.append(
        session_id,
        ev.PlanCompleted(
            plan_id=plan_id,
            plan_text="\n".join(f"{n}. {s}" for n, s in enumerate(steps, 1)),
            steps=[ev.PlanStep(number=n, description=s) for n, s in enumerate(steps, 1)],
        ),
    )
    return fold(session_id, await store.read(session_id))
