"""Scenario 5: fan-out, many WebSocket clients on one session through one gateway process.

500 clients (50 with --short) connect to one `stepwise-gateway` process, split over
two client processes so the clients do not share one event loop. The session then
gets 100 events/s. Every client must receive every event within 30 s of the last
append, or the event counts as lost; latency runs from the start of the append to
each client receiving the event. Gateway memory per client
is the gateway's RSS with every client connected and streaming, minus its RSS
before the first client connected, divided by the number of clients. Gateway CPU
per 1,000 deliveries is the gateway's user + system CPU time from the first append
until every client reported, divided by the deliveries received. Unlike the
latency, it depends less on how busy other processes keep the machine. The
clients' CPU per 1,000 deliveries is measured the same way in the client
processes, to show how much of the 2 cores the measuring side takes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import psutil

from .context import Bench
from .servers import BenchError
from .stats import Results, Target
from .workload import action, new_session, paced

ROOT = Path(__file__).resolve().parent.parent
NAME = "5 fan-out"
RATE = 100
CLIENT_PROCESSES = 2
# Seconds after the last append that clients keep reading; an event not received by then is lost.
DRAIN_SECONDS = 30


def _sizes(bench: Bench) -> tuple[int, float]:
    """Clients, and seconds of events."""
    return (50, 2.0) if bench.short else (500, 10.0)


async def run_once(bench: Bench, results: Results) -> None:
    clients, seconds = _sizes(bench)
    count = int(RATE * seconds)
    database_url = bench.servers.fresh_database()
    nc, store = await bench.event_store("bench-executor")
    processes: list[asyncio.subprocess.Process] = []
    try:
        session_id = await new_session(store)
        last_seq = 1 + count
        with bench.servers.gateway(database_url) as gateway:
            gateway_process = psutil.Process(gateway.process.pid)
            rss_before = gateway_process.memory_info().rss
            for share in _split(clients, CLIENT_PROCESSES):
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "bench.fanout_clients",
                        gateway.ws_url(session_id),
                        str(share),
                        str(last_seq),
                        str(seconds + DRAIN_SECONDS),
                        stdout=asyncio.subprocess.PIPE,
                        limit=1 << 28,
                        cwd=ROOT,
                    )
                )
            for process in processes:
                assert process.stdout is not None
                line = await asyncio.wait_for(process.stdout.readline(), 120)
                if line.strip() != b"ready":
                    raise BenchError(f"a fan-out client process did not get ready: {line!r}")
            cpu_before = _cpu_seconds(gateway_process)
            async for i in paced(RATE, count):
                await store.append(session_id, action(i))
                if i == count // 2:
                    rss_streaming = gateway_process.memory_info().rss
            reports = []
            for process in processes:
                assert process.stdout is not None
                line = await asyncio.wait_for(
                    process.stdout.readline(), seconds + DRAIN_SECONDS + 120
                )
                reports.append(json.loads(line))
            cpu_seconds = _cpu_seconds(gateway_process) - cpu_before
    finally:
        await nc.close()
        for process in processes:
            if process.returncode is None:
                process.kill()
            await process.wait()
    latencies = [value for report in reports for value in report["latencies"]]
    missed = sum(sum(report["missed"]) for report in reports)
    errors = [error for report in reports for error in report["errors"]]
    disorder = sum(report["disorder"] for report in reports)
    client_cpu = sum(report["cpu_seconds"] for report in reports)
    results.add_latencies(NAME, f"{clients} clients latency", latencies)
    results.add(NAME, f"{clients} clients events lost", "events", missed)
    results.add(
        NAME, "gateway RSS per client", "KiB", (rss_streaming - rss_before) / clients / 1024
    )
    delivered = clients * count - missed
    if delivered > 0:
        results.add(
            NAME, "gateway CPU per 1,000 deliveries", "ms", cpu_seconds / delivered * 1000 * 1000
        )
        results.add(
            NAME, "clients' CPU per 1,000 deliveries", "ms", client_cpu / delivered * 1000 * 1000
        )
    if disorder:
        results.note(NAME, f"{disorder} events arrived out of order or twice")
    if errors:
        results.note(NAME, f"{len(errors)} clients ended early, first: {errors[0]}")


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def targets(results: Results) -> list[Target]:
    names = [name for scenario, name in results.figures if scenario == NAME]
    p99 = next((name for name in names if name.endswith("latency p99")), "missing")
    lost = next((name for name in names if name.endswith("events lost")), "missing")
    return [
        Target(
            "fan-out p99 latency",
            "< 250 ms",
            lambda: results.median(NAME, p99),
            lambda v: v < 250,
            " ms",
        ),
        Target(
            "fan-out events lost (worst run)",
            "0",
            lambda: results.figures[(NAME, lost)].high,
            lambda v: v == 0,
        ),
    ]
