"""The plan models behind one interface: the deterministic offline model, and model selection.

A model turns a test case (or, for a continuation, a task prompt plus the
existing steps) into a `PlanDraft`. The Gemini model lives in `gemini.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stepwise_libs.phrases import PHRASE_FORMS, format_step, parse_step, split_test_case
from stepwise_libs.settings import DEFAULT_GEMINI_MODEL, OFFLINE_MODEL

from .errors import PlanFailedError

# Called with a progress message and the model-call attempt it is about, if any.
ProgressCallback = Callable[[str, int | None], Awaitable[None]]


@dataclass(frozen=True)
class PlanRequest:
    """Input of a plan: a test case, or for a continuation a task prompt after `existing_steps`."""

    text: str
    target_url: str
    existing_steps: Sequence[str] | None = None

    @property
    def is_continuation(self) -> bool:
        return self.existing_steps is not None


@dataclass(frozen=True)
class PlanDraft:
    """A generated plan: the step descriptions in order, a readable text, and what was left out."""

    steps: list[str]
    plan_text: str
    unparsed: list[str] = field(default_factory=list)


class PlanModel(Protocol):
    """A model that generates plans; `name` is what `plan_started` records."""

    name: str

    async def generate(self, request: PlanRequest, progress: ProgressCallback) -> PlanDraft: ...

    async def aclose(self) -> None: ...


def phrase_forms_help() -> str:
    """Return the phrase forms the offline model understands, one per line."""
    return "\n".join(f"  {form}" for form in PHRASE_FORMS)


def render_plan_text(
    heading: str, steps: Sequence[str], unparsed: Sequence[str], first_number: int = 1
) -> str:
    """Render a plan as readable text: a heading, the numbered steps, and the parts left out."""
    lines = [heading]
    lines.extend(f"{number}. {step}" for number, step in enumerate(steps, start=first_number))
    if unparsed:
        lines.append("")
        lines.append(f"Not understood, so left out of the plan ({len(unparsed)}):")
        lines.extend(f"- {text}" for text in unparsed)
    return "\n".join(lines)


class OfflinePlanModel:
    """A deterministic model: splits the test case and keeps the steps the phrase grammar reads.

    Numbered lines, bullets, and sentences or clauses joined by "then" each become
    one step, written in the canonical phrase form (`Type "x" into "Username"`).
    Parts the grammar cannot read are listed in `unparsed`, and the plan fails
    when no part is understood.
    """

    name = OFFLINE_MODEL

    async def generate(self, request: PlanRequest, progress: ProgressCallback) -> PlanDraft:
        what = "task prompt" if request.is_continuation else "test case"
        pieces = split_test_case(request.text)
        if not pieces:
            raise PlanFailedError(
                "no_steps",
                f"The {what} is empty. Write one step per line, for example:\n"
                + phrase_forms_help(),
            )
        await progress(
            f"Splitting the {what} into {len(pieces)} parts with the offline model", None
        )

        steps: list[str] = []
        unparsed: list[str] = []
        for piece in pieces:
            intent = parse_step(piece)
            if intent is None:
                unparsed.append(piece)
            else:
                steps.append(format_step(intent, piece))
        if not steps:
            listed = "; ".join(repr(piece) for piece in unparsed)
            raise PlanFailedError(
                "no_steps",
                f"The offline model understood no part of the {what}: {listed}. "
                "Write one step per line in one of these forms:\n"
                f"{phrase_forms_help()}\n"
                "or set GEMINI_API_KEY and choose a Gemini model for free-form test cases.",
            )

        first_number = len(request.existing_steps or []) + 1
        kind = "continuation plan" if request.is_continuation else "plan"
        heading = f"Offline {kind}: {len(steps)} step{'s' if len(steps) != 1 else ''}."
        text = render_plan_text(heading, steps, unparsed, first_number)
        if unparsed:
            text += "\nThe offline model understands these forms:\n" + phrase_forms_help()
        return PlanDraft(steps=steps, plan_text=text, unparsed=unparsed)

    async def aclose(self) -> None:
        return None


def model_name_for(llm_model: str, has_api_key: bool) -> str:
    """Return the model a command's `llm_model` resolves to; an empty value picks the default."""
    name = llm_model.strip()
    if not name:
        return DEFAULT_GEMINI_MODEL if has_api_key else OFFLINE_MODEL
    return name
