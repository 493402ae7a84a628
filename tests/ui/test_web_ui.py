"""The web UI in a real Chromium against the real stack.

Covered: the form, live plan and steps, the controls, a reload, a gateway restart, replay.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from stepwise.sample_site import SampleSite, sample_test_case
from stepwise.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

# Seconds to wait for a whole sample run, and for one step or control to take effect.
RUN_TIMEOUT_MS = 240_000
STEP_TIMEOUT_MS = 60_000
CHECKOUT_STEPS = 16


def create_session(api: httpx.Client, site: SampleSite, name: str = "checkout") -> str:
    response = api.post(
        "/api/sessions",
        json={
            "test_case": sample_test_case(name),
            "target_url": site.base_url,
            "llm_model": "offline",
        },
    )
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


def stream_events(api: httpx.Client, session_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/api/sessions/{session_id}/events", params={"since": 0, "limit": 10_000})
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def wait_status(page: Page, *statuses: str, timeout: float = STEP_TIMEOUT_MS) -> None:
    pattern = re.compile("^(" + "|".join(statuses) + ")$")
    expect(page.locator("#app")).to_have_attribute("data-status", pattern, timeout=timeout)


def step(page: Page, number: int):  # type: ignore[no-untyped-def]
    return page.locator(f'#steps > li[data-step="{number}"]')


def control(page: Page, label: str):  # type: ignore[no-untyped-def]
    return page.get_by_role("group", name="Run controls").get_by_role(
        "button", name=label, exact=True
    )


def assert_log_matches_stream(
    page: Page, api: httpx.Client, session_id: str
) -> list[dict[str, Any]]:
    """Check that the page's log holds each event of the stream once, in stream order."""
    stored = stream_events(api, session_id)[-1]["seq"]
    page.wait_for_function(
        f"Number(document.getElementById('app').dataset.lastSeq) >= {stored}",
        timeout=STEP_TIMEOUT_MS,
    )
    # Read the log and the page's last seq in one go, since later events may still arrive,
    # then the stream, which by then holds at least what the page shows.
    snapshot = page.evaluate(
        """() => ({
            shown: [...document.querySelectorAll('#event-log > li')]
                .map(i => [Number(i.dataset.seq), i.dataset.type]),
            lastSeq: document.getElementById('app').dataset.lastSeq,
        })"""
    )
    shown = snapshot["shown"]
    events = stream_events(api, session_id)
    assert [seq for seq, _ in shown] == list(range(1, len(shown) + 1))
    assert [kind for _, kind in shown] == [event["type"] for event in events[: len(shown)]]
    # The log takes each event as it arrives, and the last seq is shown at the next frame.
    assert int(snapshot["lastSeq"]) <= len(shown)
    return events


def test_form_creates_a_session_and_shows_plan_and_steps_live(
    page: Page, api: httpx.Client, e2e_site: SampleSite, artifacts: Path
) -> None:
    page.goto("/")
    expect(page.get_by_role("heading", name="New session")).to_be_visible()
    expect(page.get_by_label("Model")).to_have_value("offline")
    page.get_by_label("Test case").fill(sample_test_case("checkout"))
    page.get_by_label("Target URL").fill(e2e_site.base_url)
    page.screenshot(path=artifacts / "01-new-session-form.png", full_page=True)
    page.get_by_role("button", name="Create session").click()

    page.wait_for_url(re.compile(r"/sessions/[0-9a-f-]{36}$"))
    session_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#steps > li")).to_have_count(CHECKOUT_STEPS, timeout=STEP_TIMEOUT_MS)
    expect(step(page, 4)).to_contain_text('Click "Login"')
    wait_status(page, "plan_ready")
    expect(page.locator("#connection")).to_have_text("Live")
    expect(control(page, "Start")).to_be_enabled()
    for label in ("Pause", "Continue", "Retry step", "Skip step", "Stop"):
        expect(control(page, label)).to_be_disabled()
    page.screenshot(path=artifacts / "02-plan-ready.png", full_page=True)

    control(page, "Start").click()
    expect(step(page, 1)).to_have_attribute(
        "data-status", re.compile("running|passed"), timeout=STEP_TIMEOUT_MS
    )
    expect(control(page, "Start")).to_be_disabled()
    expect(step(page, 5)).to_have_attribute("data-status", "passed", timeout=RUN_TIMEOUT_MS)
    page.screenshot(path=artifacts / "03-running.png", full_page=True)
    wait_status(page, "completed", timeout=RUN_TIMEOUT_MS)

    for number in range(1, CHECKOUT_STEPS + 1):
        expect(step(page, number)).to_have_attribute("data-status", "passed")
    expect(page.locator("#session-counts")).to_contain_text(f"{CHECKOUT_STEPS} passed · 0 failed")
    # Finished steps fold away except the latest; a click opens one.
    expect(step(page, 4).locator(".action-list li").first).to_be_hidden()
    step(page, 4).locator("summary").click()
    expect(step(page, 4).locator(".action-list li").first).to_be_visible()
    expect(step(page, 4).locator(".thinking")).to_be_visible()
    expect(step(page, 16).locator(".thinking")).to_be_visible()
    assert_log_matches_stream(page, api, session_id)
    page.screenshot(path=artifacts / "04-completed.png", full_page=True)

    # A screenshot opens large in a dialog.
    thumbnail = step(page, 16).locator("button.thumb").first
    thumbnail.click()
    dialog = page.get_by_role("dialog", name="Screenshot")
    expect(dialog).to_be_visible()
    assert dialog.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
    page.screenshot(path=artifacts / "05-screenshot-enlarged.png")
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()

    # The list shows the session, newest first, with its counts.
    page.get_by_role("link", name="← All sessions").click()
    row = page.locator(f'#session-rows tr[data-session-id="{session_id}"]')
    expect(row).to_have_attribute("data-status", "completed", timeout=STEP_TIMEOUT_MS)
    expect(row.locator("td.passed-count")).to_have_text(str(CHECKOUT_STEPS))
    expect(row.locator("td.failed-count")).to_have_text("0")
    expect(page.locator("#session-rows tr").first).to_have_attribute("data-session-id", session_id)
    page.screenshot(path=artifacts / "06-session-list.png", full_page=True)


def test_form_shows_the_gateway_error_for_a_bad_url(page: Page) -> None:
    page.goto("/")
    page.get_by_label("Test case").fill('1. Click "Login"')
    page.get_by_label("Target URL").fill("ftp://example.com/")
    page.get_by_role("button", name="Create session").click()

    expect(page.locator("#form-error")).to_contain_text("target_url")
    expect(page.get_by_label("Target URL")).to_have_attribute("aria-invalid", "true")
    assert page.url.endswith("/")


def test_pause_act_continue_and_cancel_from_the_controls(
    page: Page, api: httpx.Client, e2e_site: SampleSite, artifacts: Path
) -> None:
    session_id = create_session(api, e2e_site)
    page.goto(f"/sessions/{session_id}")
    wait_status(page, "plan_ready")

    # Pause while step 1 runs: step 1 finishes, step 2 does not start.
    control(page, "Start").click()
    expect(step(page, 1)).to_have_attribute("data-status", re.compile("running|passed"))
    control(page, "Pause").click()
    wait_status(page, "paused")
    expect(page.locator("#command-notice")).to_contain_text("Pause queued")
    paused_after = int(
        page.locator("#event-log > li[data-type=execution_paused] .summary")
        .inner_text()
        .split()[-1]
    )
    expect(step(page, paused_after)).to_have_attribute("data-status", "passed")
    expect(step(page, paused_after + 1)).to_have_attribute("data-status", "pending")
    expect(control(page, "Continue")).to_be_enabled()
    expect(control(page, "Run till end")).to_be_enabled()
    expect(control(page, "Pause")).to_be_disabled()
    expect(control(page, "Start")).to_be_disabled()

    # A stale view that still offers Start gets the gateway's reason back.
    control(page, "Start").evaluate("button => { button.disabled = false; }")
    control(page, "Start").click()
    expect(page.locator("#command-notice")).to_contain_text("Start rejected: the session is paused")
    expect(page.locator("#event-log > li[data-type=command_rejected]")).to_have_count(1)

    # Act in the live browser while paused.
    instruction = (
        'Type "ada" into "Username"' if paused_after < 4 else 'Click "Add Bike Light to cart"'
    )
    page.get_by_label("Act in the live browser").fill(instruction)
    page.get_by_role("button", name="Act", exact=True).click()
    act = page.locator("#acts > li").first
    expect(act).to_contain_text(instruction)
    expect(act).to_have_attribute("data-status", "completed", timeout=STEP_TIMEOUT_MS)
    expect(act.locator("button.thumb")).to_have_count(1)
    page.screenshot(path=artifacts / "07-paused-after-act.png", full_page=True)

    # Continue runs the next steps; Cancel stops everything and every control goes off.
    control(page, "Continue").click()
    expect(step(page, paused_after + 1)).to_have_attribute(
        "data-status", re.compile("running|passed")
    )
    wait_status(page, "running")
    control(page, "Cancel").click()
    wait_status(page, "cancelled")
    for label in (
        "Start",
        "Pause",
        "Continue",
        "Run till end",
        "Retry step",
        "Skip step",
        "Stop",
        "Cancel",
    ):
        expect(control(page, label)).to_be_disabled()
    expect(page.get_by_role("button", name="Act", exact=True)).to_be_disabled()
    expect(page.locator("#event-log > li[data-type=execution_cancelled]")).to_have_count(1)
    assert_log_matches_stream(page, api, session_id)
    page.screenshot(path=artifacts / "08-cancelled.png", full_page=True)


def test_reload_mid_run_shows_the_complete_view(
    page: Page, api: httpx.Client, e2e_site: SampleSite
) -> None:
    session_id = create_session(api, e2e_site)
    page.goto(f"/sessions/{session_id}")
    wait_status(page, "plan_ready")
    control(page, "Run till end").click()
    expect(step(page, 3)).to_have_attribute(
        "data-status", re.compile("running|passed"), timeout=STEP_TIMEOUT_MS
    )

    page.reload()
    expect(page.locator("#steps > li")).to_have_count(CHECKOUT_STEPS)
    wait_status(page, "completed", timeout=RUN_TIMEOUT_MS)

    events = assert_log_matches_stream(page, api, session_id)
    detail = api.get(
        f"/api/sessions/{session_id}", params={"wait_for_seq": events[-1]["seq"]}
    ).json()
    shown = page.locator("#steps > li").evaluate_all("items => items.map(i => i.dataset.status)")
    assert shown == [item["status"] for item in detail["steps"]]
    assert page.evaluate("window.stepwise.feed.stats.gapsFilled") == 0


def test_page_catches_up_after_the_gateway_restarts(
    page: Page, api: httpx.Client, stack: Stack, e2e_site: SampleSite, artifacts: Path
) -> None:
    session_id = create_session(api, e2e_site)
    page.goto(f"/sessions/{session_id}")
    wait_status(page, "plan_ready")
    control(page, "Run till end").click()
    expect(step(page, 2)).to_have_attribute(
        "data-status", re.compile("running|passed"), timeout=STEP_TIMEOUT_MS
    )

    # The executor keeps appending events while the gateway, and so the socket, is gone.
    stack.stop_service("gateway")
    expect(page.locator("#connection")).to_contain_text("reconnecting", ignore_case=True)
    page.screenshot(path=artifacts / "09-reconnecting.png", full_page=True)
    seen_while_down = int(page.locator("#app").get_attribute("data-last-seq") or 0)
    stack.start_service("gateway")

    expect(page.locator("#connection")).to_have_text("Live", timeout=STEP_TIMEOUT_MS)
    wait_status(page, "completed", timeout=RUN_TIMEOUT_MS)
    events = assert_log_matches_stream(page, api, session_id)
    assert events[-1]["seq"] > seen_while_down
    assert page.evaluate("window.stepwise.feed.stats.reconnects") >= 1
    for number in range(1, CHECKOUT_STEPS + 1):
        expect(step(page, number)).to_have_attribute("data-status", "passed")


def test_replay_rebuilds_an_earlier_view_and_live_returns_to_the_tail(
    page: Page, api: httpx.Client, e2e_site: SampleSite, artifacts: Path
) -> None:
    session_id = create_session(api, e2e_site)
    page.goto(f"/sessions/{session_id}")
    wait_status(page, "plan_ready")
    control(page, "Run till end").click()
    wait_status(page, "completed", timeout=RUN_TIMEOUT_MS)
    # The executor closes the browser after the run: that is the session's last event.
    expect(page.locator("#event-log > li[data-type=browser_closed]")).to_have_count(
        1, timeout=STEP_TIMEOUT_MS
    )
    events = assert_log_matches_stream(page, api, session_id)
    plan_ready_seq = next(e["seq"] for e in events if e["type"] == "plan_completed")
    step3_done_seq = next(
        e["seq"] for e in events if e["type"] == "step_completed" and e["data"]["step_number"] == 3
    )

    # A shared link with ?at= opens the replay at that event.
    page.goto(f"/sessions/{session_id}?at={plan_ready_seq}")
    expect(page.locator("#app")).to_have_attribute("data-view-seq", str(plan_ready_seq))
    wait_status(page, "plan_ready")
    expect(page.locator('#steps > li[data-status="pending"]')).to_have_count(CHECKOUT_STEPS)
    expect(page.get_by_label("Show the session as of event")).to_have_value(str(plan_ready_seq))
    expect(control(page, "Start")).to_be_disabled()

    # Moving the slider folds the events up to the new position.
    page.get_by_label("Show the session as of event").fill(str(step3_done_seq))
    expect(page.locator("#app")).to_have_attribute("data-view-seq", str(step3_done_seq))
    assert page.locator("#steps > li").evaluate_all(
        "items => items.map(i => i.dataset.status)"
    ) == (["passed"] * 3 + ["pending"] * (CHECKOUT_STEPS - 3))
    assert re.search(rf"\?at={step3_done_seq}$", page.url)
    total = events[-1]["seq"]
    expect(page.locator("#app")).to_have_attribute("data-last-seq", str(total))
    expect(page.locator("#event-log > li.future")).to_have_count(total - step3_done_seq)
    page.screenshot(path=artifacts / "10-replay.png", full_page=True)

    page.get_by_role("button", name="Live").click()
    wait_status(page, "completed")
    expect(page.locator("#app")).to_have_attribute("data-view-seq", str(total))
    expect(page.locator("#event-log > li.future")).to_have_count(0)
    assert "at=" not in page.url


def test_run_till_end_blocks_on_a_failed_step_then_retry_and_skip(
    page: Page, api: httpx.Client, e2e_site: SampleSite, artifacts: Path
) -> None:
    session_id = create_session(api, e2e_site, "failing")
    page.goto(f"/sessions/{session_id}")
    wait_status(page, "plan_ready")
    failing_step = page.locator("#steps > li").count()
    control(page, "Run till end").click()

    # The failed check blocks the run: only retry, skip, act, stop and cancel fit.
    wait_status(page, "paused", timeout=RUN_TIMEOUT_MS)
    blocked = step(page, failing_step)
    expect(blocked).to_have_class(re.compile("step-blocked"))
    expect(blocked.locator(".step-error")).to_contain_text("Free shipping on every order")
    expect(control(page, "Retry step")).to_be_enabled()
    expect(control(page, "Skip step")).to_be_enabled()
    expect(control(page, "Continue")).to_be_disabled()
    expect(control(page, "Run till end")).to_be_disabled()
    page.screenshot(path=artifacts / "11-blocked-on-failed-step.png", full_page=True)

    # Retry runs the step again, which fails again and blocks again.
    control(page, "Retry step").click()
    expect(blocked.locator(".step-meta")).to_contain_text("attempt 2", timeout=STEP_TIMEOUT_MS)
    wait_status(page, "paused")
    expect(control(page, "Skip step")).to_be_enabled()

    control(page, "Skip step").click()
    expect(blocked).to_have_attribute("data-status", "skipped", timeout=STEP_TIMEOUT_MS)
    wait_status(page, "completed", "failed")
    expect(page.locator("#event-log > li[data-type=run_till_end_completed]")).to_have_count(1)
    expect(control(page, "Retry step")).to_be_disabled()
    assert_log_matches_stream(page, api, session_id)


def test_continue_plan_appends_steps_and_continue_runs_them(
    page: Page, api: httpx.Client, e2e_site: SampleSite
) -> None:
    session_id = create_session(api, e2e_site, "failing")
    page.goto(f"/sessions/{session_id}")
    wait_status(page, "plan_ready")
    planned = page.locator("#steps > li").count()

    page.get_by_label("Continue the plan").fill('1. Click "Login"')
    page.get_by_role("button", name="Continue plan").click()
    expect(page.locator("#steps > li")).to_have_count(planned + 1, timeout=STEP_TIMEOUT_MS)
    expect(step(page, planned + 1)).to_contain_text('Click "Login"')
    expect(page.locator("#event-log > li[data-type=plan_started]")).to_have_count(2)
    wait_status(page, "plan_ready")
    expect(control(page, "Start")).to_be_enabled()


def test_assets_are_served_by_the_gateway_only(api: httpx.Client) -> None:
    home = api.get("/")
    assert home.status_code == 200
    assert home.headers["content-type"].startswith("text/html")
    # An unknown session still gets the page, which reports it, with status 404.
    unknown = api.get("/sessions/not-yet-a-session")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"].startswith("text/html")

    # Every module and stylesheet the pages load comes from the gateway, with no external URL.
    static = Path(__file__).resolve().parents[2] / "services/gateway/src/stepwise_gateway/static"
    names = sorted(path.name for path in static.iterdir())
    for name in names:
        response = api.get(f"/ui/{name}")
        assert response.status_code == 200, name
        assert not re.search(
            r"(?:src|href|from|import|url)\s*\(?[=:]?\s*['\"]?https?://", response.text
        ), name
    imported = set()
    for name in names:
        imported |= set(re.findall(r"from \"\./([\w.-]+)\"", (static / name).read_text()))
    assert imported <= set(names)
    assert api.get("/ui/app.js").headers["content-type"].startswith("text/javascript")

    missing = api.get("/ui/..%2Fapp.py")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] in ("asset_not_found", "not_found")
    assert api.get("/ui/config.json").json()["models"][0] == "offline"


def test_narrow_screen_stacks_the_columns(
    page: Page, api: httpx.Client, e2e_site: SampleSite, artifacts: Path
) -> None:
    session_id = create_session(api, e2e_site, "failing")
    page.set_viewport_size({"width": 400, "height": 860})
    page.goto(f"/sessions/{session_id}")
    wait_status(page, "plan_ready")

    main = page.locator(".session-main").bounding_box()
    side = page.locator(".session-side").bounding_box()
    assert main is not None
    assert side is not None
    assert side["y"] >= main["y"] + main["height"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    page.screenshot(path=artifacts / "12-narrow-session.png", full_page=True)

    page.goto("/")
    expect(page.get_by_role("heading", name="Sessions")).to_be_visible()
    page.screenshot(path=artifacts / "13-narrow-home.png", full_page=True)


def test_unknown_session_page_disables_controls(page: Page) -> None:
    page.goto("/sessions/00000000-0000-4000-8000-000000000000")

    expect(
        page.get_by_text("No session with id 00000000-0000-4000-8000-000000000000")
    ).to_be_visible()
    for label in ("Start", "Pause", "Continue", "Run till end", "Stop", "Cancel"):
        expect(control(page, label)).to_be_disabled()
