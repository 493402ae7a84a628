"""A login page on loopback that checks a username and password the test chose at random.

The form posts to `/login`, so the values travel in the request body, never in
the URL. The server records every login attempt, so a test can prove that the
browser received exactly the secret values. It responds with a page that shows
"Welcome" or "Wrong username or password" and never echoes a value.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

LOGIN_PAGE = b"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Login</title></head>
<body>
  <h1>Members area</h1>
  <form method="post" action="/login">
    <label for="username">Username</label>
    <input type="text" id="username" name="username" placeholder="Username">
    <label for="password">Password</label>
    <input type="password" id="password" name="password" placeholder="Password">
    <button type="submit" id="login-button">Login</button>
  </form>
</body>
</html>
"""
WELCOME_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Welcome</title></head>
<body><h1>Welcome</h1><p>You are logged in.</p></body></html>
"""
REJECTED_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Login failed</title></head>
<body><h1>Wrong username or password</h1><a href="/login">Try again</a></body></html>
"""


def random_secret() -> str:
    """Return a value that appears nowhere else: a prefix and 16 random hex digits."""
    return "sw-" + secrets.token_hex(8)


@dataclass
class LoginSite:
    """A running login site; `url` opens the login form."""

    username: str
    password: str
    attempts: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "LoginSite is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/login"

    def start(self) -> LoginSite:
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] == "/login":
                    self._send(200, LOGIN_PAGE)
                else:
                    self._send(404, b"not found")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode("utf-8"))
                username = form.get("username", [""])[0]
                password = form.get("password", [""])[0]
                site.attempts.append((username, password))
                if (username, password) == (site.username, site.password):
                    self._send(200, WELCOME_PAGE)
                else:
                    self._send(401, REJECTED_PAGE)

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="login-site", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoginSite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def login_test_case() -> str:
    """Return a test case that logs in with the `{{user}}` and `{{password}}` secrets."""
    return (
        "1. Open the login page\n"
        '2. Type "{{user}}" into "Username"\n'
        '3. Type "{{password}}" into "Password"\n'
        '4. Click "Login"\n'
        '5. Check that the page shows "You are logged in"\n'
    )
