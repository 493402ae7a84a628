"""Settings of the planner, read once from the environment in `main()`."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepwise_libs.settings import CommonSettings, env_float, env_int, env_str, gemini_api_key


@dataclass(frozen=True)
class RetrySettings:
    """Retry policy of model calls, on transient errors and on invalid output."""

    # Delay before retry n is base * 2**(n-1) plus up to `base` of jitter, capped at max_delay.
    base_seconds: float = 1.0
    max_delay_seconds: float = 60.0
    max_retries: int = 3
    # Invalid (non-JSON or schema-violating) model outputs tolerated before the plan fails.
    invalid_output_budget: int = 2
    # Limit of one model call, in seconds.
    call_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class PlannerSettings:
    common: CommonSettings = field(default_factory=CommonSettings)
    gemini_api_key: str | None = field(default_factory=gemini_api_key, repr=False)
    # Another base URL for google-genai, e.g. a fake Gemini server on loopback in tests.
    gemini_base_url: str | None = field(
        default_factory=lambda: env_str("STEPWISE_GEMINI_BASE_URL", "") or None
    )
    # Plans generated at the same time by this process.
    concurrency: int = field(default_factory=lambda: env_int("STEPWISE_PLANNER_CONCURRENCY", 4, 1))
    retry: RetrySettings = field(
        default_factory=lambda: RetrySettings(
            base_seconds=env_float("STEPWISE_RETRY_BASE_SECONDS", 1.0),
            max_delay_seconds=env_float("STEPWISE_RETRY_MAX_SECONDS", 60.0),
            max_retries=env_int("STEPWISE_MODEL_MAX_RETRIES", 3),
            invalid_output_budget=env_int("STEPWISE_INVALID_OUTPUT_BUDGET", 2),
            call_timeout_seconds=env_float("STEPWISE_MODEL_TIMEOUT", 60.0, 0.1),
        )
    )
    # Seconds JetStream waits for an ack (or an in-progress mark) before it redelivers a
    # command. It also bounds how soon another planner resumes a dead planner's plan.
    ack_wait_seconds: float = field(
        default_factory=lambda: env_float("STEPWISE_PLANNER_ACK_WAIT_SECONDS", 30.0, 1.0)
    )
    # Seconds a stopping planner waits for plans in progress before it abandons them to
    # redelivery.
    shutdown_grace_seconds: float = field(
        default_factory=lambda: env_float("STEPWISE_SHUTDOWN_GRACE_SECONDS", 10.0)
    )
