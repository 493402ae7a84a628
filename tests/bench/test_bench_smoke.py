"""The benchmark runner keeps working: its shortest run prints a table of numbers.

No assertion here is about time; the bench reports times, it does not judge them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"-?[\d,]+(?:\.\d+)?"


def short_run(
    scenario: str, output: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one scenario of the bench once, in short mode and without Redis."""
    return subprocess.run(
        [sys.executable, "-m", "bench", "--short", "--only", scenario, "--runs", "1",
         "--no-redis", "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )  # fmt: skip


def test_short_run_writes_results_table(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    run = short_run("2", output)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for figure in (
        "stepwise append, 1 session",
        "stepwise append, 1 session, pipelined",
        "stepwise append, 100 sessions",
        "raw pipelined js.publish",
    ):
        row = re.search(
            rf"^\| 2 append \| {re.escape(figure)} \| ev/s "
            rf"\| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| 1 \|$",
            run.stdout,
            re.MULTILINE,
        )
        assert row is not None, f"no row with numbers for {figure!r} in:\n{run.stdout[-3000:]}"
        assert float(row.group(2).replace(",", "")) > 0
    verdict = re.search(
        r"^\| append \(100 sessions\) vs raw pipelined publish \| >= 0\.5x \| "
        rf"{NUMBER}x \| (met|MISSED) \|$",
        run.stdout,
        re.MULTILINE,
    )
    assert verdict is not None, run.stdout[-3000:]
    written = output.read_text()
    assert "## Machine" in written and "nproc" in written and "load avg" in written
    assert "| 2 append | stepwise append, 1 session |" in written


def test_unknown_scenario_is_refused_by_name(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "9", "--output", str(tmp_path / "r.md")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode != 0
    assert "unknown scenario '9'" in run.stderr


def test_failed_scenario_exits_with_one(tmp_path: Path) -> None:
    # Without a Chromium binary, the executor of scenario 6 exits at start.
    env = {**os.environ, "STEPWISE_CHROMIUM": str(tmp_path / "no-chromium")}
    run = short_run("6", tmp_path / "RESULTS.md", env)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "1 scenario(s) failed, first: 6 controls: run 1 failed" in run.stderr
    # The table is still printed and written, with the failure as a note.
    assert "6 controls: not measured: run 1 failed" in run.stdout
    assert "not measured: run 1 failed" in (tmp_path / "RESULTS.md").read_text()
