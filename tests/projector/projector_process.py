"""`stepwise-projector` run as a child process by the projector tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PROJECTOR = Path(sys.executable).parent / "stepwise-projector"


class ProjectorProcess:
    """`stepwise-projector` as a child process, its log in a file for assertions."""

    def __init__(self, nats_url: str, database_url: str, log_dir: Path, batch_size: int) -> None:
        self.env = {
            **os.environ,
            "STEPWISE_NATS_URL": nats_url,
            "STEPWISE_DATABASE_URL": database_url,
            "STEPWISE_LOG_LEVEL": "DEBUG",
            "STEPWISE_PROJECTOR_BATCH_SIZE": str(batch_size),
            "STEPWISE_PROJECTOR_FETCH_TIMEOUT": "0.2",
            "STEPWISE_PROJECTOR_MAX_BACKOFF": "1.0",
        }
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"projector-{self.starts}.log"

    def logs(self) -> str:
        return "".join(
            path.read_text(errors="replace")
            for path in sorted(self.log_dir.glob("projector-*.log"))
        )

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(PROJECTOR), "run"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """Stop with SIGTERM and return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise AssertionError(
                    f"the projector ignored SIGTERM for 20 s; log:\n{self.logs()}"
                ) from None
        return self.process.returncode

    def command(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a one-shot subcommand (migrate, rebuild) to completion."""
        return subprocess.run(
            [str(PROJECTOR), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
