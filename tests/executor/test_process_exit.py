"""Tests of the browser sweep's wait for killed processes, on real processes."""

from __future__ import annotations

import subprocess
import sys

import psutil
from stepwise_executor.browser import _wait_for_exit

# A parent that starts a child, prints its pid and never reaps it, so a killed child
# stays a zombie (as a killed Chromium's renderers do until init reaps them).
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
sys.stdin.read()
"""


def test_wait_counts_zombie_as_exited() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        child.kill()
        survivors = _wait_for_exit([child], timeout=30)
        assert survivors == []
        # The zombie's pid still exists, so psutil.wait_procs alone would time out.
        assert child.status() == psutil.STATUS_ZOMBIE
        _, alive = psutil.wait_procs([child], timeout=0.5)
        assert alive == [child]
    finally:
        parent.kill()
        parent.wait()


def test_wait_returns_running_process() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        survivors = _wait_for_exit([psutil.Process(process.pid)], timeout=0.3)
        assert [survivor.pid for survivor in survivors] == [process.pid]
    finally:
        process.kill()
        process.wait()
