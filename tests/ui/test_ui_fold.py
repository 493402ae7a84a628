"""The web UI's fold (static/fold.js), run in Chromium on the same history as the Python fold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from playwright.sync_api import Browser, Page
from stepwise_libs.fold import fold
from support.run_history import SESSION, history

ROOT = Path(__file__).resolve().parents[2]
FOLD_JS = (ROOT / "services/gateway/src/stepwise_gateway/static/fold.js").read_text()

# Imports fold.js from a data URL and returns what the session page would show.
FOLD_IN_PAGE = """
async ([source, sessionId, events]) => {
  const module = await import("data:text/javascript," + encodeURIComponent(source));
  const state = module.fold(sessionId, events);
  const tasks = Object.fromEntries([...state.tasks.values()].map((t) => [t.taskId, t.status]));
  return { status: state.status, tasks, allowed: module.allowedControls(state) };
}
"""


@pytest.fixture
def blank(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    yield context.new_page()
    context.close()


@pytest.mark.parametrize("follow_up_task", ["run", "skip"])
def test_ui_fold_ends_run_tasks(blank: Page, follow_up_task: str) -> None:
    events = history(follow_up_task)
    expected = fold(SESSION, events)

    ui_state = blank.evaluate(FOLD_IN_PAGE, [FOLD_JS, SESSION, msgspec.to_builtins(events)])

    assert ui_state["status"] == expected.status
    assert ui_state["tasks"] == {task.task_id: task.status for task in expected.tasks.values()}
    # A completed run with its browser closed leaves nothing to cancel or stop.
    assert ui_state["allowed"]["cancel"] is False
    assert ui_state["allowed"]["stop"] is False
