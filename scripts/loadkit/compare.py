"""Side-by-side figures: probers on the same configuration, alertd's no-op runs against raw."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from loadkit.raw import RawResult
from loadkit.results import RunResult


@dataclass(frozen=True)
class ProberComparison:
    """``first`` against ``second`` on one (workers, concurrency) pair."""

    workers: int
    concurrency: int
    first: str
    second: str
    alerts_per_s_ratio: float  # first / second
    first_cpu_ms_per_alert: float
    second_cpu_ms_per_alert: float

    def line(self) -> str:
        return (f"{self.workers} x {self.concurrency}: {self.first} vs {self.second}: "
                f"{_num(self.alerts_per_s_ratio)}x alerts/s, CPU ms/alert "
                f"{_num(self.first_cpu_ms_per_alert, 2)} vs "
                f"{_num(self.second_cpu_ms_per_alert, 2)}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line()}


def prober_comparisons(runs: list[RunResult], probers: list[str]) -> list[ProberComparison]:
    """The first of ``probers`` against each other one, wherever both ran the same pair."""
    real = [r for r in runs if r.adapters == "real"]
    found = []
    pairs = sorted({(r.workers, r.concurrency) for r in real})
    for first in probers[:1]:
        for second in probers[1:]:
            for w, c in pairs:
                a = _the_run(real, w, c, first)
                b = _the_run(real, w, c, second)
                if a is None or b is None:
                    continue
                ratio = a.alerts_per_s / b.alerts_per_s if b.alerts_per_s else math.nan
                found.append(ProberComparison(w, c, first, second, ratio,
                                              a.cpu_ms_per_alert, b.cpu_ms_per_alert))
    return found


def _the_run(runs: list[RunResult], workers: int, concurrency: int,
             prober: str) -> RunResult | None:
    return next((r for r in runs if (r.workers, r.concurrency, r.prober)
                 == (workers, concurrency, prober)), None)


@dataclass(frozen=True)
class Overhead:
    """A no-op run's CPU per message against the raw consumer's."""

    workers: int
    concurrency: int
    alertd_ms_per_message: float
    master_ms_per_message: float
    raw_ms_per_message: float
    raw_prefetch: int
    overhead_pct: float  # (alertd / raw - 1) x 100

    def line(self) -> str:
        return (f"{self.workers} x {self.concurrency}: framework overhead: alertd "
                f"{_num(self.alertd_ms_per_message, 3)} ms/msg vs raw "
                f"{_num(self.raw_ms_per_message, 3)} ms/msg = {self.overhead_pct:+.0f}%")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line()}


def raw_for(run: RunResult, raws: list[RawResult]) -> RawResult | None:
    """The raw run with the run's prefetch (its concurrency), else the first one."""
    same = [r for r in raws if r.prefetch == run.concurrency]
    return same[0] if same else (raws[0] if raws else None)


def framework_overhead(runs: list[RunResult], raws: list[RawResult]) -> list[Overhead]:
    found = []
    for run in runs:
        raw = raw_for(run, raws)
        if run.adapters != "noop" or raw is None or not raw.cpu_ms_per_message:
            continue
        found.append(Overhead(
            run.workers, run.concurrency, run.cpu_ms_per_alert, run.master_ms_per_alert,
            raw.cpu_ms_per_message, raw.prefetch,
            100 * (run.cpu_ms_per_alert / raw.cpu_ms_per_message - 1)))
    return found


def fill_cpu_x_raw(runs: list[RunResult], raws: list[RawResult]) -> None:
    for run in runs:
        raw = raw_for(run, raws)
        if raw is not None and raw.cpu_ms_per_message:
            run.cpu_x_raw = run.cpu_ms_per_alert / raw.cpu_ms_per_message


def _num(value: float, digits: int = 1) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
