"""The Gemini plan model: google-genai with a JSON response schema, retries and an output budget."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
from google import genai
from google.genai import errors, types
from stepwise_libs.phrases import PHRASE_FORMS, format_step, parse_step

from .errors import PlanFailedError
from .models import PlanDraft, PlanRequest, ProgressCallback, render_plan_text
from .settings import RetrySettings

try:  # google-genai sends requests with aiohttp when it is installed, else with httpx.
    from aiohttp import ClientError as AiohttpClientError
except ImportError:  # pragma: no cover - depends on the installed extras
    AiohttpClientError = OSError  # type: ignore[assignment, misc]

logger = logging.getLogger(__name__)

# HTTP statuses worth another try: request timeout, rate limit, server errors.
TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})

RESPONSE_SCHEMA = types.Schema(
    type=types.Type.OBJECT,
    properties={
        "steps": types.Schema(
            type=types.Type.ARRAY,
            description="The plan's steps in order, each one browser action or check.",
            items=types.Schema(
                type=types.Type.OBJECT,
                properties={
                    "description": types.Schema(
                        type=types.Type.STRING,
                        description="The step, in one of the listed phrase forms where possible.",
                    )
                },
                required=["description"],
            ),
        ),
        "unparsed": types.Schema(
            type=types.Type.ARRAY,
            description="Parts of the input that cannot become a browser step, verbatim.",
            items=types.Schema(type=types.Type.STRING),
        ),
    },
    required=["steps"],
)

_forms = "\n".join(f"- {form}" for form in PHRASE_FORMS)
SYSTEM_INSTRUCTION = f"""\
You turn a plain-language web test case into a plan of steps that a browser agent
runs one at a time in a real browser. Each step is one action or one check.
Write each step in one of these phrase forms where possible, with labels and values
in double quotes exactly as the test case gives them:
{_forms}
When no form fits, write the step as one short imperative sentence.
Keep every placeholder written as {{{{name}}}} exactly as the test case gives it: it stands
for a secret value that is filled in when the step runs.
Do not number the steps. Do not invent steps the test case does not ask for.
Put any part of the input that cannot become a browser step into "unparsed", verbatim.
The browser starts on a blank page: unless the test case says otherwise, the first step
opens the target URL."""

_LEADING_NUMBER = re.compile(r"^\s*(?:step\s*)?\d+\s*[.):-]\s*", re.I)


class _ModelStep(msgspec.Struct):
    description: str


class _ModelPlan(msgspec.Struct):
    steps: list[_ModelStep]
    unparsed: list[str] = []


class InvalidModelOutput(ValueError):
    """The model's output is not JSON of the plan schema."""


def build_prompt(request: PlanRequest) -> str:
    """Return the user prompt of a plan or continuation request."""
    if not request.is_continuation:
        return f"Target URL: {request.target_url}\n\nTest case:\n{request.text.strip()}\n"
    existing = "\n".join(
        f"{number}. {step}" for number, step in enumerate(request.existing_steps or [], start=1)
    )
    return (
        f"Target URL: {request.target_url}\n\n"
        "The session already has this plan; its browser is on the page the last step left:\n"
        f"{existing}\n\n"
        "Plan only the NEW steps that carry out the following task after those steps. "
        "Do not repeat existing steps, and do not open the target URL again unless the task "
        f"asks for it.\n\nTask:\n{request.text.strip()}\n"
    )


def parse_model_output(text: str | None) -> tuple[list[str], list[str]]:
    """Return (steps, unparsed) from the model's JSON text; raise `InvalidModelOutput`."""
    if not text or not text.strip():
        raise InvalidModelOutput("the response has no text")
    try:
        plan = msgspec.json.decode(text, type=_ModelPlan)
    except msgspec.DecodeError as error:
        snippet = text.strip()[:200]
        raise InvalidModelOutput(f"{error} in {snippet!r}") from None
    steps: list[str] = []
    for index, step in enumerate(plan.steps, start=1):
        description = _LEADING_NUMBER.sub("", step.description, count=1).strip()
        if not description:
            raise InvalidModelOutput(f"step {index} has an empty description")
        intent = parse_step(description)
        steps.append(format_step(intent, description) if intent else description)
    unparsed = [text.strip() for text in plan.unparsed if text.strip()]
    if not steps and not unparsed:
        raise InvalidModelOutput("the plan has no steps")
    return steps, unparsed


def describe_error(error: BaseException) -> str:
    """Return a one-line description of a failed model call."""
    if isinstance(error, errors.APIError):
        message = (error.message or "").strip()
        return f"HTTP {error.code} {error.status or ''}".strip() + (
            f": {message}" if message else ""
        )
    if isinstance(error, TimeoutError):
        return "the call timed out"
    return f"{type(error).__name__}: {error}".rstrip(": ")


def is_transient(error: BaseException) -> bool:
    """Return True for errors worth another try: rate limits, server errors, timeouts, I/O."""
    if isinstance(error, errors.APIError):
        return error.code in TRANSIENT_STATUS_CODES
    return isinstance(
        error, TimeoutError | httpx.TransportError | AiohttpClientError | ConnectionError | OSError
    )


def backoff_delay(retry: int, settings: RetrySettings) -> float:
    """Return the delay before retry `retry` (1-based): exponential, with jitter, capped."""
    delay = settings.base_seconds * 2 ** (retry - 1) + random.uniform(0, settings.base_seconds)
    return min(delay, settings.max_delay_seconds)


class GeminiPlanModel:
    """Plans with a Gemini model through google-genai's async client."""

    def __init__(self, name: str, api_key: str, base_url: str | None, retry: RetrySettings) -> None:
        self.name = name
        self._retry = retry
        http_options = types.HttpOptions(
            base_url=base_url, timeout=int(retry.call_timeout_seconds * 1000)
        )
        # One client per model for the life of the process: a client that is garbage
        # collected closes its HTTP session, even under a call in progress.
        self._client = genai.Client(api_key=api_key, http_options=http_options)

    async def aclose(self) -> None:
        await self._client.aio.aclose()

    async def generate(self, request: PlanRequest, progress: ProgressCallback) -> PlanDraft:
        config = types.GenerateContentConfig(
            system_instruction=SYSTEM_INSTRUCTION,
            response_mime_type="application/json",
            response_schema=RESPONSE_SCHEMA,
            temperature=0.0,
        )
        prompt = build_prompt(request)
        retries = 0
        invalid_outputs = 0
        attempt = 1
        await progress(f"Calling model {self.name}", attempt)
        while True:
            try:
                response = await asyncio.wait_for(
                    self._client.aio.models.generate_content(
                        model=self.name, contents=prompt, config=config
                    ),
                    timeout=self._retry.call_timeout_seconds,
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not is_transient(error):
                    raise PlanFailedError(
                        "model_error",
                        f"Model {self.name} rejected the request: {describe_error(error)}. "
                        "Check the model name and GEMINI_API_KEY.",
                    ) from error
                if retries >= self._retry.max_retries:
                    raise PlanFailedError(
                        "model_unavailable",
                        f"Model {self.name} is unavailable: {attempt} calls failed, the last "
                        f"with {describe_error(error)}. Try again later.",
                    ) from error
                retries += 1
                delay = backoff_delay(retries, self._retry)
                next_try = datetime.now(UTC) + timedelta(seconds=delay)
                logger.warning(
                    "model call failed, retrying: %s",
                    describe_error(error),
                    extra={
                        "model": self.name,
                        "attempt": attempt,
                        "delay_seconds": round(delay, 2),
                    },
                )
                await progress(
                    f"Model call {attempt} failed with {describe_error(error)}; retry "
                    f"{retries} of {self._retry.max_retries} in {delay:.1f} s, at "
                    f"{next_try.isoformat(timespec='seconds')}",
                    attempt + 1,
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue

            try:
                steps, unparsed = parse_model_output(response.text)
            except InvalidModelOutput as error:
                invalid_outputs += 1
                if invalid_outputs > self._retry.invalid_output_budget:
                    raise PlanFailedError(
                        "invalid_model_output",
                        f"Model {self.name} returned invalid output {invalid_outputs} times, "
                        f"the last: {error}",
                    ) from None
                logger.warning(
                    "model returned invalid output: %s",
                    error,
                    extra={"model": self.name, "attempt": attempt},
                )
                await progress(
                    f"Model output of call {attempt} is invalid ({error}); asking again "
                    f"({invalid_outputs} of {self._retry.invalid_output_budget} invalid "
                    "outputs allowed)",
                    attempt + 1,
                )
                attempt += 1
                continue
            break

        if not steps:
            raise PlanFailedError(
                "no_steps",
                f"Model {self.name} found no browser step in the input; it could not use: "
                + "; ".join(repr(text) for text in unparsed),
            )
        first_number = len(request.existing_steps or []) + 1
        kind = "continuation plan" if request.is_continuation else "plan"
        heading = f"{self.name} {kind}: {len(steps)} step{'s' if len(steps) != 1 else ''}."
        return PlanDraft(
            steps=steps,
            plan_text=render_plan_text(heading, steps, unparsed, first_number),
            unparsed=unparsed,
        )
