"""Figures, summaries and targets: what every scenario hands back to the runner."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (fraction 0.99 for p99)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(latencies_ms, 0.50),
        "p99": percentile(latencies_ms, 0.99),
        "max": max(latencies_ms) if latencies_ms else math.nan,
    }


@dataclass
class Figure:
    """One measured quantity, with one value per repeated run."""

    scenario: str
    name: str
    unit: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        finite = [value for value in self.runs if not math.isnan(value)]
        return statistics.median(finite) if finite else math.nan

    @property
    def low(self) -> float:
        finite = [value for value in self.runs if not math.isnan(value)]
        return min(finite) if finite else math.nan

    @property
    def high(self) -> float:
        finite = [value for value in self.runs if not math.isnan(value)]
        return max(finite) if finite else math.nan


@dataclass
class Target:
    """A benchmark target, checked on the medians of one run of the bench."""

    name: str
    goal: str
    measured: Callable[[], float]  # evaluated when the table is printed
    met: Callable[[float], bool]
    unit: str = ""

    def evaluate(self) -> tuple[float, str]:
        try:
            value = self.measured()
        except (KeyError, ZeroDivisionError):
            return math.nan, "not measured"
        if math.isnan(value):
            return value, "not measured"
        return value, "met" if self.met(value) else "MISSED"


class Results:
    """All figures of one bench run, keyed by (scenario, name), plus notes and targets."""

    def __init__(self) -> None:
        self.figures: dict[tuple[str, str], Figure] = {}
        self.notes: list[str] = []
        self.targets: list[Target] = []
        # Scenarios whose run raised, with the error; `make bench` then exits with 1.
        self.failures: list[str] = []

    def add(self, scenario: str, name: str, unit: str, value: float) -> None:
        key = (scenario, name)
        if key not in self.figures:
            self.figures[key] = Figure(scenario, name, unit)
        self.figures[key].runs.append(value)

    def add_latencies(self, scenario: str, prefix: str, latencies_ms: Sequence[float]) -> None:
        for name, value in latency_summary(latencies_ms).items():
            self.add(scenario, f"{prefix} {name}", "ms", value)

    def median(self, scenario: str, name: str) -> float:
        return self.figures[(scenario, name)].median

    def note(self, scenario: str, text: str) -> None:
        self.notes.append(f"{scenario}: {text}")

    def not_measured(self, scenario: str, reason: str) -> None:
        self.note(scenario, f"not measured: {reason}")
