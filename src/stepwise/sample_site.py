"""The bundled sample shop, served on loopback for the demo and the tests.

The pages are static HTML with a little inline JavaScript and no external
resources; the shop keeps its state (user, cart, order) in localStorage.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SAMPLES_DIR = Path(str(resources.files("stepwise") / "samples"))
SITE_DIR = Path(str(resources.files("stepwise") / "sample_site"))


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serve files from the site folder and log requests at DEBUG instead of to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sample site: " + format, *args)

    def end_headers(self) -> None:
        # Every run starts from the files on disk, never from a browser cache.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@dataclass
class SampleSite:
    """A running sample site; `base_url` ends with a slash and opens the login page."""

    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/"

    @property
    def host_port(self) -> str:
        """Return `host:port` of the site, as an entry of STEPWISE_ALLOWED_HOSTS."""
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> SampleSite:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_sample_site(host: str = "127.0.0.1", port: int = 0) -> SampleSite:
    """Serve the sample shop on `host:port` (port 0 picks a free one) from a daemon thread."""
    if not (SITE_DIR / "index.html").is_file():
        raise FileNotFoundError(f"the sample site is missing from the package: {SITE_DIR}")
    handler = partial(_QuietHandler, directory=str(SITE_DIR))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="sample-site", daemon=True)
    thread.start()
    site = SampleSite(server, thread)
    logger.info("sample site serving on %s", site.base_url)
    return site


def sample_test_case(name: str) -> str:
    """Return the text of a bundled test case: `checkout` (passes) or `failing`."""
    path = SAMPLES_DIR / f"{name}.txt"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in SAMPLES_DIR.glob("*.txt")))
        raise FileNotFoundError(f"no sample test case named {name!r}; available: {available}")
    return path.read_text(encoding="utf-8")
