"""Tests of the task a follow-up control joins, and of how the fold ends a run's tasks."""

from __future__ import annotations

import pytest
from stepwise_gateway import controls
from stepwise_libs.fold import COMPLETED, SessionState, fold, open_run
from support.run_history import SESSION, history


def test_open_run_survives_an_act() -> None:
    state = fold(SESSION, history("run")[:8])

    run = open_run(state)

    assert state.current_task_id == "act"
    assert run is not None
    assert run.task_id == "run"


def test_follow_up_in_same_task_ends_it() -> None:
    state = fold(SESSION, history("run"))

    assert state.status == COMPLETED
    assert state.tasks["run"].status == "completed"
    assert open_run(state) is None


def test_follow_up_with_new_task_ends_both() -> None:
    # As the gateway did before it chose the open run for a follow-up sent after an act.
    state: SessionState = fold(SESSION, history("skip"))

    assert state.status == COMPLETED
    assert state.current_task_id == "skip"
    assert state.current_task is not None
    assert state.current_task.task_type == "run_till_end"
    assert state.tasks["skip"].status == "completed"
    assert state.tasks["run"].status == "completed"
    assert state.tasks["act"].status == "completed"
    assert open_run(state) is None


@pytest.mark.parametrize(
    ("control", "expected"),
    [("skip_step", "run"), ("retry_step", "run"), ("continue", "run"), ("act", "command")],
)
def test_gateway_gives_follow_up_the_open_run(control: str, expected: str) -> None:
    state = fold(SESSION, history("run")[:8])

    task_id = controls._task_id(controls.CONTROLS[control], state, "command")

    assert task_id == expected
