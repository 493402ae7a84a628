"""Stopping a process tree leaves nothing behind, even a grandchild in its own session."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from stepwise import processes

# A child that starts a grandchild in a new session, as a browser may do, then waits.
# It ignores SIGTERM so that only the SIGKILL after the timeout can stop it.
STUBBORN_PARENT = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
child = subprocess.Popen(sleeper, start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _wait_for_line(path: Path, seconds: float = 20.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return text.strip()
        time.sleep(0.05)
    raise AssertionError(f"no line in {path} after {seconds} s")


def test_stop_tree_kills_process_and_detached_grandchild(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    process = processes.spawn([sys.executable, "-c", STUBBORN_PARENT], dict(os.environ), log)
    grandchild = int(_wait_for_line(log))
    assert processes.alive(grandchild)
    assert grandchild in processes.descendants(process.pid)

    started = time.monotonic()
    code = processes.stop_tree(process, timeout=1.0)

    assert code is not None
    assert not processes.alive(process.pid)
    assert not processes.alive(grandchild)
    assert time.monotonic() - started < 15


def test_stop_tree_lets_process_exit_on_sigterm(tmp_path: Path) -> None:
    process = processes.spawn(
        [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ), tmp_path / "log"
    )

    code = processes.stop_tree(process, timeout=10.0)

    assert code == -15  # ended by SIGTERM, not by the SIGKILL fallback


def test_kill_stale_checks_command_line(tmp_path: Path) -> None:
    process = processes.spawn(
        [sys.executable, "-c", "import time; time.sleep(600)", "stepwise-planner"],
        dict(os.environ),
        tmp_path / "log",
    )
    try:
        # A reused pid running something else is left alone.
        assert processes.kill_stale(process.pid, ("nats-server",)) is False
        assert processes.alive(process.pid)

        assert processes.kill_stale(process.pid, ("stepwise-planner",)) is True
        process.wait(10)
        assert not processes.alive(process.pid)
    finally:
        processes.stop_tree(process, 1.0)


def test_alive_rejects_group_pids() -> None:
    assert processes.alive(0) is False
    assert processes.alive(-1) is False
    assert processes.alive(os.getpid()) is True
