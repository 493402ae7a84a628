"""A session history in which a run till end pauses, an act runs, and a follow-up ends the run."""

from __future__ import annotations

from stepwise_libs import events as ev

SESSION = "fold-tasks"


def history(follow_up_task: str) -> list[ev.Event]:
    """A run till end that stops at failed step 2, an act, then a skip under `follow_up_task`."""
    payloads: list[ev.Payload] = [
        ev.SessionCreated(test_case="t", target_url="http://127.0.0.1/", llm_model="offline"),
        ev.PlanCompleted(
            plan_id="plan",
            plan_text="",
            steps=[
                ev.PlanStep(number=number, description=f"step {number}") for number in (1, 2, 3)
            ],
        ),
        ev.RunTillEndStarted(task_id="run", from_step=1, total_steps=3),
        ev.StepCompleted(task_id="run", step_number=1),
        ev.StepFailed(task_id="run", step_number=2, error="not found"),
        ev.RunTillEndPaused(task_id="run", step_number=2, error="not found"),
        ev.ActModeStarted(task_id="act", instruction="look"),
        ev.ActModeCompleted(task_id="act", result="seen"),
        ev.StepSkipped(task_id=follow_up_task, step_number=2, reason="skipped by user"),
        ev.ExecutionResumed(task_id=follow_up_task, from_step=3),
        ev.StepCompleted(task_id=follow_up_task, step_number=3),
        ev.RunTillEndCompleted(task_id=follow_up_task, success=True, skipped_steps=[2]),
        ev.BrowserClosed(reason="completed"),
    ]
    return [ev.new_event(SESSION, seq, payload) for seq, payload in enumerate(payloads, 1)]
