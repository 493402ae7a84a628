"""The offline plan model: splitting test cases into steps in the executor's phrase forms."""

from __future__ import annotations

from pathlib import Path

import pytest
from stepwise_libs.phrases import PHRASE_FORMS, format_step, parse_step
from stepwise_planner.errors import PlanFailedError
from stepwise_planner.models import OfflinePlanModel, PlanDraft, PlanRequest

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "stepwise" / "samples"


async def plan(text: str, existing: list[str] | None = None) -> tuple[PlanDraft, list[str]]:
    messages: list[str] = []

    async def progress(message: str, attempt: int | None) -> None:
        messages.append(message)

    request = PlanRequest(text, "http://127.0.0.1:9/", existing_steps=existing)
    return await OfflinePlanModel().generate(request, progress), messages


async def test_numbered_lines_become_steps() -> None:
    draft, messages = await plan(
        '1. Open the login page\n2) type "standard_user" into the "Username" field\n'
        "3. Click “Login”\n4. Check that the page shows 'Products'"
    )

    assert draft.steps == [
        "Open the login page",
        'Type "standard_user" into "Username"',
        'Click "Login"',
        'Check that the page shows "Products"',
    ]
    assert draft.unparsed == []
    assert "1. Open the login page" in draft.plan_text
    assert '4. Check that the page shows "Products"' in draft.plan_text
    assert messages and "offline" in messages[0]


async def test_bullets_and_continued_lines() -> None:
    draft, _ = await plan(
        '- Fill "Username" with "standard_user"\n* Select "Canada" from the "Country"\n'
        "  dropdown\n• Press Enter"
    )

    assert draft.steps == [
        'Type "standard_user" into "Username"',
        'Select "Canada" in "Country"',
        "Press Enter",
    ]


async def test_then_sentences_are_split() -> None:
    draft, _ = await plan(
        'Go to https://shop.example/login, then type "ada" into "Username" and then '
        'click "Login". Wait for "Products" up to 5 seconds; verify "Backpack" is visible.'
    )

    assert draft.steps == [
        "Open https://shop.example/login",
        'Type "ada" into "Username"',
        'Click "Login"',
        'Wait for "Products" up to 5 seconds',
        'Check that the page shows "Backpack"',
    ]


async def test_unparsed_parts_are_reported() -> None:
    draft, _ = await plan(
        '1. Open the login page\n2. Log in as the admin somehow\n3. Click "Cart"\n'
        "4. Make the page beautiful"
    )

    assert draft.steps == ["Open the login page", 'Click "Cart"']
    assert draft.unparsed == ["Log in as the admin somehow", "Make the page beautiful"]
    assert "Not understood, so left out of the plan (2):" in draft.plan_text
    assert "- Log in as the admin somehow" in draft.plan_text
    assert 'Click "Login"' in draft.plan_text  # the forms it understands are listed


async def test_nothing_understood_fails_with_forms() -> None:
    with pytest.raises(PlanFailedError) as failure:
        await plan("Buy something nice.\nMake sure everyone is happy.")

    assert failure.value.category == "no_steps"
    assert "'Buy something nice'" in failure.value.message
    for form in PHRASE_FORMS:
        assert form in failure.value.message


async def test_empty_test_case_fails() -> None:
    with pytest.raises(PlanFailedError) as failure:
        await plan("  \n\n ")

    assert failure.value.category == "no_steps"
    assert "empty" in failure.value.message


async def test_continuation_numbers_after_existing() -> None:
    draft, _ = await plan('Click "Checkout" then click "Continue"', existing=["a", "b", "c"])

    assert draft.steps == ['Click "Checkout"', 'Click "Continue"']
    assert '4. Click "Checkout"' in draft.plan_text
    assert '5. Click "Continue"' in draft.plan_text
    assert draft.plan_text.startswith("Offline continuation plan: 2 steps.")


async def test_bundled_samples_parse_fully() -> None:
    for name in ("checkout.txt", "failing.txt"):
        text = (SAMPLES / name).read_text()

        draft, _ = await plan(text)

        assert draft.unparsed == [], name
        assert len(draft.steps) == len([line for line in text.splitlines() if line.strip()]), name


@pytest.mark.parametrize(
    "text",
    [
        'fill the "Username" field with "bob"',
        "Type “say \"hi\"” into 'Message'",
        "press enter",
        'Wait for "x" for up to 5 s',
        'wait until "Done" appears',
        'click on the "Login" button',
        'verify "Products" is visible',
        "Go to https://x.example/z",
        "Open the login page",
        'ensure the page no longer shows "Error"',
        'choose "Canada" from the "Country" dropdown',
        'Check that the cart badge shows "1"',
    ],
)
def test_format_step_round_trips(text: str) -> None:
    intent = parse_step(text)
    assert intent is not None

    formatted = format_step(intent, text)

    assert parse_step(formatted) == intent


def test_phrase_forms_all_parse() -> None:
    for form in PHRASE_FORMS:
        main, _, alternative = form.partition("  (or: ")
        assert parse_step(main) is not None, main
        if alternative:
            assert parse_step(alternative.rstrip(")")) is not None, alternative
