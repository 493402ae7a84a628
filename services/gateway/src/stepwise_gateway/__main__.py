"""Entry point of `stepwise-gateway`: read the settings and serve the app with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn
from stepwise_libs.logs import configure_logging
from stepwise_libs.settings import SettingsError

from .app import create_app
from .auth import TOKENS_VARIABLE, TokenRedactor, is_loopback
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
    # Libraries log raw handshakes at DEBUG; the filter keeps credentials out of them.
    for handler in logging.getLogger().handlers:
        handler.addFilter(TokenRedactor(settings.api_tokens))
    if settings.api_tokens:
        logger.info(
            "API tokens required",
            extra={"clients": ",".join(token.name for token in settings.api_tokens)},
        )
    elif not is_loopback(settings.host):
        logger.error(
            "refusing to listen on %s without API tokens: anyone who can reach it could run "
            "browsers through it. Set %s to one or more comma-separated tokens (or name:token "
            "pairs), e.g. %s=ci:$(openssl rand -hex 32), or listen on 127.0.0.1",
            settings.host,
            TOKENS_VARIABLE,
            TOKENS_VARIABLE,
        )
        sys.exit(2)
    else:
        logger.warning(
            "no API tokens set (%s): serving without auth, on the loopback address %s only",
            TOKENS_VARIABLE,
            settings.host,
        )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_ping_interval=settings.ws_ping_interval or None,
        ws_ping_timeout=settings.ws_ping_timeout or None,
        ws_per_message_deflate=settings.ws_compression,
    )


if __name__ == "__main__":
    main()
