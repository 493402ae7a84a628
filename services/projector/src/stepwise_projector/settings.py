"""Settings of the projector, read once from `STEPWISE_*` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepwise_libs.settings import CommonSettings, SettingsError, env_float, env_int, env_str

DATABASE_URL_PREFIX = "postgresql+asyncpg://"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _database_url() -> str:
    value = env_str("STEPWISE_DATABASE_URL", "")
    if not value:
        raise SettingsError(
            "STEPWISE_DATABASE_URL",
            value,
            f"a Postgres URL such as {DATABASE_URL_PREFIX}user@host/db",
        )
    if not value.startswith(DATABASE_URL_PREFIX):
        raise SettingsError(
            "STEPWISE_DATABASE_URL", value, f"a URL starting with {DATABASE_URL_PREFIX}"
        )
    return value


@dataclass(frozen=True)
class ProjectorSettings(CommonSettings):
    """Settings of the projector: its database, batch size, fetch timeout and backoff."""

    database_url: str = field(default_factory=_database_url)
    # Maximum number of events fetched, and written in one transaction.
    batch_size: int = field(
        default_factory=lambda: env_int("STEPWISE_PROJECTOR_BATCH_SIZE", 500, 1)
    )
    # Seconds one fetch waits for the first message before the loop checks for shutdown.
    fetch_timeout: float = field(
        default_factory=lambda: env_float("STEPWISE_PROJECTOR_FETCH_TIMEOUT", 1.0, 0.05)
    )
    # Maximum pause, in seconds, between two attempts to reach an unavailable Postgres.
    max_backoff: float = field(
        default_factory=lambda: env_float("STEPWISE_PROJECTOR_MAX_BACKOFF", 10.0, 0.1)
    )

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(
                "STEPWISE_LOG_LEVEL", self.log_level, f"one of {', '.join(LOG_LEVELS)}"
            )
