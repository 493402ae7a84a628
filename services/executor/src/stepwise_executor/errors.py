"""Errors and failure categories of the executor."""

from __future__ import annotations

# Categories carried by `step_failed` and `act_mode_failed`.
CHECK_FAILED = "check_failed"
ELEMENT_NOT_FOUND = "element_not_found"
TIMEOUT = "timeout"
MODEL_ERROR = "model_error"
INVALID_MODEL_OUTPUT = "invalid_model_output"
BROWSER_ERROR = "browser_error"
# A step uses a `{{name}}` placeholder whose secret value the executor cannot find.
SECRET_MISSING = "secret_missing"
# The egress guard blocked a page because its host is private, loopback or cloud metadata.
NAVIGATION_BLOCKED = "navigation_blocked"


class ExecutorError(Exception):
    """Base of the executor's own errors."""


class ExecutorStopping(ExecutorError):
    """A step or act instruction failed while the executor shuts down.

    SIGTERM may reach the browser too, when a whole process group is signalled, so
    the failure is no test result. The session is recorded as interrupted instead,
    and a continue resumes it.
    """


class StepError(ExecutorError):
    """A step could not be run; carries the category reported in `step_failed`."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.message = message
        self.category = category


class ModelCallError(StepError):
    """The chat model failed after its retries, or kept returning output the agent cannot use."""


class BrowserStartError(StepError):
    def __init__(self, message: str) -> None:
        super().__init__(message, BROWSER_ERROR)


def categorize_failure(message: str) -> str:
    """Pick the category of a step the agent reported as unsuccessful, from its message."""
    lowered = message.casefold()
    if "was not found on the page" in lowered or "is still shown on the page" in lowered:
        return CHECK_FAILED
    if lowered.startswith("no ") and "matching" in lowered:
        return ELEMENT_NOT_FOUND
    if "not available" in lowered or ("element" in lowered and "not found" in lowered):
        return ELEMENT_NOT_FOUND
    if "timed out" in lowered or "timeout" in lowered:
        return TIMEOUT
    return CHECK_FAILED
