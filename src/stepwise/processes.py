"""Child processes of the stack: start each in its own process group, stop the whole tree.

Each service runs in a new session, so a Ctrl-C in the terminal reaches only
the supervisor, which then stops the services in order. Stopping sends SIGTERM
to the service's process, waits, then sends SIGKILL to its group and to every
descendant found in /proc (a browser may start its own session).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

# Resolved once here, because the child must not load libraries between fork and exec.
_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None  # not Linux: the supervisor's own shutdown still stops its children


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to the child when the thread that started it exits.

    This runs in the child between fork and exec. It covers a supervisor killed
    with SIGKILL, which has no chance to stop its children itself.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session with stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # only calls prctl, which takes no locks
        )


def _parent_pids() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces; the fields after it are fixed.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Return the pids of every live descendant of `pid`, children first."""
    if not Path("/proc").is_dir():
        return []
    parents = _parent_pids()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    pending = list(children.get(pid, []))
    while pending:
        current = pending.pop(0)
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def alive(pid: int) -> bool:
    """Return True when `pid` exists and is not a zombie."""
    if pid <= 0:
        return False  # 0 and negative pids name process groups, not one process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return state[state.rfind(")") + 2 :].split()[0] != "Z"


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_tree(
    process: subprocess.Popen[bytes], timeout: float, first_signal: int = signal.SIGTERM
) -> int | None:
    """Stop a process started by `spawn` and everything it started; return its exit code.

    Sends `first_signal` to the process alone, waits up to `timeout` seconds,
    then sends SIGKILL to its group and to any descendant still alive. The first
    signal spares the children, so the process stops them in its own order. The
    executor records its running sessions as interrupted and then closes their
    browsers, which would otherwise die at once and fail the running step.
    """
    tree = descendants(process.pid)
    if process.poll() is None:
        _signal_pid(process.pid, first_signal)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "process did not stop in %s s, killing it",
                timeout,
                extra={"pid": process.pid, "argv": _command_line(process)},
            )
    _signal_group(process.pid, signal.SIGKILL)
    for pid in tree + descendants(process.pid):
        if alive(pid):
            _signal_pid(pid, signal.SIGKILL)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        logger.error("process survived SIGKILL", extra={"pid": process.pid})
    _wait_gone(tree, 5)
    return process.returncode


def _command_line(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    if isinstance(args, list | tuple):
        return " ".join(str(arg) for arg in args)
    return str(args)


def _wait_gone(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def kill_stale(pid: int, expected: Sequence[str]) -> bool:
    """Kill a process left by a supervisor that died, if `pid` still runs one of `expected`.

    The check on the command line guards against a pid reused by an unrelated
    process. Returns True when a process was killed.
    """
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    if not any(word in cmdline for word in expected) or not alive(pid):
        return False
    tree = descendants(pid)
    _signal_group(pid, signal.SIGKILL)
    for target in [pid, *tree]:
        _signal_pid(target, signal.SIGKILL)
    _wait_gone([pid, *tree], 5)
    return True
