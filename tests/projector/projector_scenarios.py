"""Realistic event sequences for projector tests, appended with the real EventStore.

Each scenario writes what planner and executor would write for one kind of
session: a clean run, pause and act, run till end with a skipped step, a cancel,
an interrupted owner, a failed plan.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from stepwise_libs import events as ev
from stepwise_libs.jetstream import EventStore
from stepwise_libs.subjects import screenshot_object_name

Scenario = Callable[[EventStore, str], Awaitable[None]]


def _ids() -> str:
    return str(uuid.uuid4())


async def _create_and_plan(store: EventStore, session_id: str, steps: list[str]) -> str:
    command_id = _ids()
    await store.append(
        session_id,
        ev.SessionCreated(
            test_case="\n".join(steps),
            target_url="http://127.0.0.1:8765/login",
            llm_model="offline",
            title=steps[0],
        ),
        command_id=command_id,
    )
    plan_id = _ids()
    await store.append(
        session_id,
        ev.PlanStarted(plan_id=plan_id, model="offline", prompt="\n".join(steps)),
        command_id=command_id,
    )
    await store.append(
        session_id, ev.PlanProgress(plan_id=plan_id, message="splitting the test case")
    )
    await store.append(
        session_id,
        ev.PlanCompleted(
            plan_id=plan_id,
            plan_text="\n".join(f"{n}. {text}" for n, text in enumerate(steps, start=1)),
            steps=[ev.PlanStep(number=n, description=text) for n, text in enumerate(steps, 1)],
            unparsed=["and make it fast"],
        ),
        command_id=command_id,
    )
    return plan_id


async def _pass_step(store: EventStore, session_id: str, task_id: str, number: int) -> None:
    await store.append(
        session_id,
        ev.StepStarted(task_id=task_id, step_number=number, description=f"step {number}"),
    )
    click = ev.ActionRecord(name="click", params={"index": number}, result="clicked")
    await store.append(
        session_id, ev.ActionExecuted(task_id=task_id, step_number=number, action=click)
    )
    await store.append(
        session_id,
        ev.StepCompleted(
            task_id=task_id,
            step_number=number,
            thinking=f"the page shows the button for step {number}",
            actions=[click],
            results=[f"step {number} done"],
            screenshots=[
                screenshot_object_name(session_id, number, 1),
                screenshot_object_name(session_id, number, 2),
            ],
            duration_ms=100 + number,
        ),
    )


async def completed_run(store: EventStore, session_id: str) -> None:
    await _create_and_plan(store, session_id, ["open the login page", "log in", "check the cart"])
    task_id = _ids()
    await store.append(session_id, ev.ExecutionStarted(task_id=task_id, from_step=1, total_steps=3))
    for number in (1, 2, 3):
        await _pass_step(store, session_id, task_id, number)
    await store.append(
        session_id,
        ev.ExecutionCompleted(
            task_id=task_id, passed=3, failed=0, skipped=0, total=3, success=True
        ),
    )
    await store.append(session_id, ev.BrowserClosed(reason="execution finished"))


async def paused_with_act(store: EventStore, session_id: str) -> None:
    await _create_and_plan(store, session_id, ["open the form", "type the name", "submit"])
    task_id = _ids()
    await store.append(session_id, ev.ExecutionStarted(task_id=task_id, from_step=1, total_steps=3))
    await _pass_step(store, session_id, task_id, 1)
    await store.append(session_id, ev.ExecutionPaused(task_id=task_id, after_step=1))

    # Act mode on the paused session, then continue into a failing step.
    act_id = _ids()
    await store.append(
        session_id, ev.ActModeStarted(task_id=act_id, instruction="close the cookie banner")
    )
    close = ev.ActionRecord(name="click", params={"text": "Accept"}, result="banner closed")
    await store.append(
        session_id, ev.ActionExecuted(task_id=act_id, step_number=None, action=close)
    )
    await store.append(
        session_id,
        ev.ActModeCompleted(
            task_id=act_id,
            thinking="a banner covers the form",
            actions=[close],
            result="the banner is gone",
            screenshot=screenshot_object_name(session_id, f"act-{act_id}", 1),
        ),
    )
    await store.append(session_id, ev.ExecutionResumed(task_id=task_id, from_step=2))
    await store.append(
        session_id, ev.StepStarted(task_id=task_id, step_number=2, description="type the name")
    )
    await store.append(
        session_id,
        ev.StepFailed(
            task_id=task_id,
            step_number=2,
            error='no field labelled "Name" on the page',
            category="element_not_found",
            screenshots=[screenshot_object_name(session_id, 2, 1)],
            duration_ms=250,
        ),
    )
    await store.append(
        session_id, ev.ExecutionFailed(task_id=task_id, error="step 2 failed", failed_step=2)
    )
    await store.append(
        session_id,
        ev.CommandRejected(command_type="continue", reason="the session is not paused"),
    )


async def run_till_end_with_skip(store: EventStore, session_id: str) -> None:
    await _create_and_plan(
        store, session_id, ["open the shop", "add the backpack", "open the cart", "check badge"]
    )
    task_id = _ids()
    await store.append(
        session_id, ev.RunTillEndStarted(task_id=task_id, from_step=1, total_steps=4)
    )
    await _pass_step(store, session_id, task_id, 1)
    await store.append(
        session_id, ev.RunTillEndProgress(task_id=task_id, current_step=1, total_steps=4)
    )
    await store.append(
        session_id, ev.StepStarted(task_id=task_id, step_number=2, description="add the backpack")
    )
    await store.append(
        session_id,
        ev.StepFailed(task_id=task_id, step_number=2, error='no button "Add"', duration_ms=90),
    )
    await store.append(
        session_id, ev.RunTillEndPaused(task_id=task_id, step_number=2, error='no button "Add"')
    )
    await store.append(
        session_id, ev.StepSkipped(task_id=task_id, step_number=2, reason="skipped by the user")
    )
    await store.append(session_id, ev.ExecutionResumed(task_id=task_id, from_step=3))
    for number in (3, 4):
        await _pass_step(store, session_id, task_id, number)
        await store.append(
            session_id, ev.RunTillEndProgress(task_id=task_id, current_step=number, total_steps=4)
        )
    await store.append(
        session_id, ev.RunTillEndCompleted(task_id=task_id, success=True, skipped_steps=[2])
    )

    # A continuation plan appends one more step to the finished session.
    plan_id = _ids()
    await store.append(
        session_id,
        ev.PlanStarted(plan_id=plan_id, model="offline", kind="continuation", prompt="check out"),
    )
    await store.append(
        session_id,
        ev.PlanCompleted(
            plan_id=plan_id,
            plan_text="1. check out",
            steps=[ev.PlanStep(number=1, description="check out")],
            kind="continuation",
        ),
    )


async def cancelled_mid_step(store: EventStore, session_id: str) -> None:
    await _create_and_plan(store, session_id, ["open the list", "sort by price"])
    task_id = _ids()
    await store.append(session_id, ev.ExecutionStarted(task_id=task_id, from_step=1, total_steps=2))
    await store.append(
        session_id, ev.StepStarted(task_id=task_id, step_number=1, description="open the list")
    )
    typing = ev.ActionRecord(name="input_text", params={"text": "héllo ✓"}, result=None)
    await store.append(session_id, ev.ActionExecuted(task_id=task_id, step_number=1, action=typing))
    await store.append(session_id, ev.ExecutionCancelled(task_id=task_id))
    await store.append(session_id, ev.BrowserClosed(reason="cancelled"))


async def interrupted_then_resumed(store: EventStore, session_id: str) -> None:
    await _create_and_plan(store, session_id, ["open the page", "fill the form", "send it"])
    first = _ids()
    await store.append(session_id, ev.ExecutionStarted(task_id=first, from_step=1, total_steps=3))
    await _pass_step(store, session_id, first, 1)
    await store.append(
        session_id, ev.StepStarted(task_id=first, step_number=2, description="fill the form")
    )
    await store.append(
        session_id,
        ev.SessionInterrupted(
            reason="executor lease expired", executor_id="host-1", last_completed_step=1
        ),
    )
    second = _ids()
    await store.append(session_id, ev.ExecutionStarted(task_id=second, from_step=2, total_steps=3))
    for number in (2, 3):
        await _pass_step(store, session_id, second, number)
    await store.append(
        session_id,
        ev.ExecutionCompleted(task_id=second, passed=3, failed=0, skipped=0, total=3, success=True),
    )


async def plan_failed(store: EventStore, session_id: str) -> None:
    await store.append(
        session_id,
        ev.SessionCreated(
            test_case="do the thing", target_url="http://127.0.0.1:1/", llm_model="x"
        ),
    )
    plan_id = _ids()
    await store.append(session_id, ev.PlanStarted(plan_id=plan_id, model="x"))
    await store.append(
        session_id,
        ev.PlanProgress(plan_id=plan_id, message="model call failed, retry 1", attempt=1),
    )
    await store.append(
        session_id,
        ev.PlanFailed(plan_id=plan_id, error="HTTP 503 three times", category="transient"),
    )


SCENARIOS: list[Scenario] = [
    completed_run,
    paused_with_act,
    run_till_end_with_skip,
    cancelled_mid_step,
    interrupted_then_resumed,
    plan_failed,
]


async def append_sessions(store: EventStore, rounds: int = 1) -> dict[str, int]:
    """Append every scenario `rounds` times, each to a new session; return each last seq."""
    last_seqs: dict[str, int] = {}
    for _ in range(rounds):
        for scenario in SCENARIOS:
            session_id = _ids()
            await scenario(store, session_id)
            last_seqs[session_id] = (await store.last(session_id))[1]
    return last_seqs
