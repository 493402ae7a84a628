"""The browser sweep's wait for killed processes, on real processes."""

from __future__ import annotations

import subprocess
import sys

import psutil
from stepwise_executor.browser import _wait_for_exit

# The parent starts a child, prints its pid and never reaps it, like a Chromium whose
# renderers outlive it until the init process gets round to them.
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
sys.stdin.read()
"""


def test_a_killed_zombie_counts_as_gone() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        child.kill()
        # Until the kill lands the child still runs, so the wait has something to wait for.
        survivors = _wait_for_exit([child], timeout=30)
        assert survivors == []
        # Still there: nobody reaped it, so waiting for the pid alone would have timed out.
        assert child.status() == psutil.STATUS_ZOMBIE
        _, alive = psutil.wait_procs([child], timeout=0.5)
        assert alive == [child]
    finally:
        parent.kill()
        parent.wait()


def test_a_running_process_is_reported() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        survivors = _wait_for_exit([psutil.Process(process.pid)], timeout=0.3)
        assert [survivor.pid for survivor in survivors] == [process.pid]
    finally:
        process.kill()
        process.wait()
