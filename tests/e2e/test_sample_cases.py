"""The bundled sample cases, run end to end through the four service processes."""

from __future__ import annotations

import httpx
import pytest

from .conftest import SampleRuns

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def test_checkout_case_passes(sample_runs: SampleRuns, gateway: httpx.AsyncClient) -> None:
    run = sample_runs.checkout

    # The stream: 16 steps, each completed, and a successful execution.
    completed = run.of_type("execution_completed")
    assert len(completed) == 1, [event["type"] for event in run.events]
    assert completed[0]["data"]["success"] is True
    assert completed[0]["data"]["passed"] == 16
    assert run.of_type("step_failed") == []
    assert [event["data"]["step_number"] for event in run.of_type("step_completed")] == list(
        range(1, 17)
    )

    # The read model, once the projector has caught up with the last event.
    response = await gateway.get(
        f"/api/sessions/{run.session_id}", params={"wait_for_seq": run.last_seq}
    )
    assert response.status_code == 200, response.text
    session = response.json()
    assert session["source"] == "read_model"
    assert session["status"] == "completed"
    steps = session["steps"]
    assert [step["number"] for step in steps] == list(range(1, 17))
    assert [step["status"] for step in steps] == ["passed"] * 16

    # Every step has at least one screenshot, and each loads as a PNG through the gateway.
    for step in steps:
        assert step["screenshots"], f"step {step['number']} has no screenshot"
        for screenshot in step["screenshots"]:
            image = await gateway.get(screenshot["url"])
            assert image.status_code == 200, f"{screenshot['url']}: {image.status_code}"
            assert image.headers["content-type"] == "image/png"
            assert image.content.startswith(PNG_SIGNATURE), screenshot["url"]
            assert len(image.content) > 1000, (
                f"{screenshot['url']} is only {len(image.content)} bytes"
            )


async def test_failing_case_names_missing_text(
    sample_runs: SampleRuns, gateway: httpx.AsyncClient
) -> None:
    run = sample_runs.failing

    failed = run.of_type("step_failed")
    assert len(failed) == 1, [event["type"] for event in run.events]
    assert failed[0]["data"]["step_number"] == 6
    assert "Free shipping on every order" in failed[0]["data"]["error"]
    assert [event["data"]["step_number"] for event in run.of_type("step_completed")] == [
        1,
        2,
        3,
        4,
        5,
    ]

    response = await gateway.get(
        f"/api/sessions/{run.session_id}", params={"wait_for_seq": run.last_seq}
    )
    assert response.status_code == 200, response.text
    session = response.json()
    assert session["status"] == "failed"
    statuses = {step["number"]: step["status"] for step in session["steps"]}
    assert statuses == {
        1: "passed",
        2: "passed",
        3: "passed",
        4: "passed",
        5: "passed",
        6: "failed",
    }
    assert "Free shipping on every order" in session["steps"][5]["error"]
