"""Side-by-side figures: probers on the same configuration, alertd's no-op runs against raw.

With ``--repeat`` each no-op run is paired with the raw run of the same
repeat and prefetch (run right after it, see ``matrix.schedule``): medians
per configuration, and the overhead of each pair for its range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from loadkit.raw import RawResult
from loadkit.results import RunResult
from loadkit.spread import Spread, overhead_pct


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
    """One no-op configuration's CPU per message against the raw runs paired with its runs.

    One run (no ``--repeat``): that run against its raw run. Several: the
    medians, the overhead median against median, and the overhead of each
    pair (no-op run i against raw run i) for its range.
    """

    workers: int
    concurrency: int
    raw_prefetch: int
    alertd: Spread  # the no-op runs' CPU ms per message
    master: Spread  # of it the master's
    raw: Spread  # the raw runs' CPU ms per message, one per no-op run
    pairs: Spread  # overhead % of each no-op run against its own raw run

    @property
    def overhead_pct(self) -> float:
        return overhead_pct(self.alertd.median, self.raw.median)

    def line(self) -> str:
        head = f"{self.workers} x {self.concurrency}: framework overhead: alertd "
        if max(self.alertd.n, self.raw.n) <= 1:
            return (f"{head}{_num(self.alertd.median, 3)} ms/msg vs raw "
                    f"{_num(self.raw.median, 3)} ms/msg = {self.overhead_pct:+.0f}%")
        runs = (f"{self.alertd.n} runs" if self.alertd.n == self.raw.n
                else f"{self.alertd.n} and {self.raw.n} runs")
        return (f"{head}{_num(self.alertd.median, 3)} ms/msg ({self.alertd.span('.3f')}) "
                f"vs raw {_num(self.raw.median, 3)} ms/msg ({self.raw.span('.3f')}), "
                f"medians of {runs} = {self.overhead_pct:+.0f}% (per pair "
                f"{self.pairs.span('+.0f', sep=' to ', unit='%')})")

    def as_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "concurrency": self.concurrency,
                "alertd_ms_per_message": self.alertd.median,
                "master_ms_per_message": self.master.median,
                "raw_ms_per_message": self.raw.median, "raw_prefetch": self.raw_prefetch,
                "overhead_pct": self.overhead_pct, "runs": self.alertd.n,
                "raw_runs": self.raw.n,
                "alertd_ms_per_message_range": [self.alertd.low, self.alertd.high],
                "raw_ms_per_message_range": [self.raw.low, self.raw.high],
                "pair_overhead_pcts": list(self.pairs.values), "line": self.line()}


def raw_for(run: RunResult, raws: list[RawResult]) -> RawResult | None:
    """The raw run paired with ``run``: the one of its repeat with its prefetch (its concurrency).

    Else that repeat's first (``--raw-prefetch``). Without ``--repeat`` every
    run is repeat 1, so this is the raw run of its prefetch, else the first.
    """
    mine = [r for r in raws if r.repeat == run.repeat] or raws
    same = [r for r in mine if r.prefetch == run.concurrency]
    return same[0] if same else (mine[0] if mine else None)


def framework_overhead(runs: list[RunResult], raws: list[RawResult]) -> list[Overhead]:
    """Per no-op configuration (in run order), its runs against their raw runs (raw_for)."""
    paired: dict[tuple[int, int], list[tuple[RunResult, RawResult]]] = {}
    for run in runs:
        raw = raw_for(run, raws)
        if run.adapters != "noop" or raw is None or not raw.cpu_ms_per_message:
            continue
        paired.setdefault((run.workers, run.concurrency), []).append((run, raw))
    return [Overhead(
        workers, concurrency, raw_prefetch=pairs[0][1].prefetch,
        alertd=Spread.of(run.cpu_ms_per_alert for run, _ in pairs),
        master=Spread.of(run.master_ms_per_alert for run, _ in pairs),
        raw=Spread.of(raw.cpu_ms_per_message for _, raw in pairs),
        pairs=Spread.of(overhead_pct(run.cpu_ms_per_alert, raw.cpu_ms_per_message)
                        for run, raw in pairs))
        for (workers, concurrency), pairs in paired.items()]


def noop_medians(runs: list[RunResult]) -> list[str]:
    """--repeat without raw runs: per no-op configuration, its CPU ms/msg's median and range."""
    found: dict[tuple[int, int], list[float]] = {}
    for run in runs:
        if run.adapters == "noop":
            found.setdefault((run.workers, run.concurrency), []).append(run.cpu_ms_per_alert)
    lines = []
    for (workers, concurrency), values in found.items():
        cpu = Spread.of(values)
        if len(values) > 1:
            lines.append(f"{workers} x {concurrency}: alertd {_num(cpu.median, 3)} ms/msg "
                         f"({cpu.span('.3f')}), median of {cpu.n} runs")
    return lines


def fill_cpu_x_raw(runs: list[RunResult], raws: list[RawResult]) -> None:
    for run in runs:
        raw = raw_for(run, raws)
        if raw is not None and raw.cpu_ms_per_message:
            run.cpu_x_raw = run.cpu_ms_per_alert / raw.cpu_ms_per_message


def _num(value: float, digits: int = 1) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"

