"""Chat models for the agent: the offline model, or Gemini through browser-use's ChatGoogle with retries."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import httpx
from browser_use.llm.base import BaseChatModel
from browser_use.llm.exceptions import ModelProviderError
from browser_use.llm.google.chat import ChatGoogle
from browser_use.llm.messages import BaseMessage
from browser_use.llm.views import ChatInvokeCompletion
from google.genai import errors as genai_errors
from pydantic import BaseModel, ValidationError

from .errors import INVALID_MODEL_OUTPUT, MODEL_ERROR, ModelCallError
from .offline_model import OFFLINE_MODEL_NAME, OfflineChatModel

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

MAX_RETRIES = 3
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
# Extra model calls allowed, per agent step, when the model returns output the agent cannot parse.
INVALID_OUTPUT_BUDGET = 2
TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})

# Called before each retry with (attempt, delay in seconds, error text).
RetryCallback = Callable[[int, float, str], Awaitable[None]]


def is_offline(model: str) -> bool:
    return model == OFFLINE_MODEL_NAME


def is_gemini(model: str) -> bool:
    return model.startswith("gemini")


@dataclass
class ModelFailure:
    message: str
    category: str


def _is_invalid_output(error: ModelProviderError) -> bool:
    # ChatGoogle (browser-use 0.13.14) reports unparsable or schema-violating output as a
    # ModelProviderError with status 500 and one of these messages.
    return error.message.startswith(
        ("Failed to parse or validate response", "No response from model")
    )


def _status_code(error: ModelProviderError) -> int:
    # ChatGoogle (0.13.14) guesses the status of a google-genai error from its message and
    # falls back to 502, so the status google-genai parsed from the response wins.
    cause = error.__cause__
    if isinstance(cause, genai_errors.APIError) and cause.code:
        return int(cause.code)
    return error.status_code


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, ModelProviderError):
        return _status_code(error) in TRANSIENT_STATUS_CODES and not _is_invalid_output(error)
    return isinstance(
        error, (httpx.TimeoutException, httpx.TransportError, ConnectionError, TimeoutError)
    )


def retry_delay(attempt: int) -> float:
    """Return the pause before retry `attempt` (1-based): exponential with full jitter, at most 60 s."""
    ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


class RetryingChatModel(BaseChatModel):
    """Retries transient model errors with backoff and limits invalid output.

    ChatGoogle in browser-use 0.13.14 has its own silent retry loop (`max_retries`);
    the factory below sets it to 1 so that every retry happens here and is reported.
    """

    _verified_api_keys = True

    def __init__(self, inner: BaseChatModel, on_retry: RetryCallback | None = None) -> None:
        self.inner = inner
        self.model = inner.model
        self.on_retry = on_retry
        self.failure: ModelFailure | None = None

    @property
    def provider(self) -> str:
        return self.inner.provider

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def model_name(self) -> str:
        return self.inner.model

    @overload
    async def ainvoke(
        self, messages: list[BaseMessage], output_format: None = None, **kwargs: Any
    ) -> ChatInvokeCompletion[str]: ...

    @overload
    async def ainvoke(
        self, messages: list[BaseMessage], output_format: type[T], **kwargs: Any
    ) -> ChatInvokeCompletion[T]: ...

    async def ainvoke(
        self, messages: list[BaseMessage], output_format: type[T] | None = None, **kwargs: Any
    ) -> ChatInvokeCompletion[T] | ChatInvokeCompletion[str]:
        retries = 0
        invalid = 0
        while True:
            try:
                return await self.inner.ainvoke(messages, output_format, **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failure = error
            if isinstance(failure, ValidationError) or (
                isinstance(failure, ModelProviderError) and _is_invalid_output(failure)
            ):
                invalid += 1
                if invalid > INVALID_OUTPUT_BUDGET:
                    raise self._fail(
                        f"the model returned invalid output {invalid} times in a row: {_text(failure)}",
                        INVALID_MODEL_OUTPUT,
                    ) from failure
                logger.warning(
                    "model output invalid, asking again",
                    extra={"model": self.model, "attempt": invalid},
                )
                continue
            if not _is_transient(failure) or retries >= MAX_RETRIES:
                raise self._fail(_failure_text(failure, retries), MODEL_ERROR) from failure
            retries += 1
            delay = retry_delay(retries)
            logger.warning(
                "model call failed, retrying: %s",
                _text(failure),
                extra={"model": self.model, "attempt": retries, "delay_seconds": round(delay, 2)},
            )
            if self.on_retry is not None:
                await self.on_retry(retries, delay, _text(failure))
            await asyncio.sleep(delay)

    def _fail(self, message: str, category: str) -> ModelCallError:
        self.failure = ModelFailure(message, category)
        return ModelCallError(message, category)


def _text(error: BaseException) -> str:
    if isinstance(error, ModelProviderError):
        # The message of a wrapped google-genai error starts with the real HTTP status.
        return error.message[:500]
    return f"{type(error).__name__}: {error}"[:500]


def _failure_text(error: BaseException, retries: int) -> str:
    suffix = f" after {retries} retries" if retries else ""
    return f"the model call failed{suffix}: {_text(error)}"


def gemini_model(
    model: str, api_key: str, base_url: str | None, on_retry: RetryCallback | None
) -> RetryingChatModel:
    http_options: dict[str, Any] = {"timeout": 120_000}
    if base_url:
        http_options["base_url"] = base_url
    inner = ChatGoogle(model=model, api_key=api_key, http_options=http_options, max_retries=1)
    return RetryingChatModel(inner, on_retry)


def offline_model(target_url: str) -> OfflineChatModel:
    return OfflineChatModel(target_url)
