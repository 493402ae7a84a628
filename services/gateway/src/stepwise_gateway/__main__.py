"""Entry point of `stepwise-gateway`: read the settings and serve the app with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn
from stepwise_libs.logs import configure_logging
from stepwise_libs.settings import SettingsError

from .app import create_app
from .settings import GatewaySettings

logger = logging.getLogger(__name__)


def main() -> None:
    try:
        settings = GatewaySettings()
    except SettingsError as error:
        configure_logging("gateway")
        logger.error("%s", error)
        sys.exit(2)
    configure_logging("gateway", settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_ping_interval=settings.ws_ping_interval or None,
        ws_ping_timeout=settings.ws_ping_timeout or None,
    )


if __name__ == "__main__":
    main()
