"""The master's totals: children's cumulative stats folded into monotonic counters.

A child reports counters cumulative since it started. The master adds the
delta between two reports of the same pid to its own totals, so a child that
dies or is recycled takes nothing with it: totals never go backwards.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from alertd.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from alertd.handle import ChildHandle


class Aggregate:
    def __init__(self) -> None:
        self.counters: Counter[tuple[str, ...]] = Counter()
        self.hist_counts: dict[str, list[int]] = {}
        self.hist_sums: dict[str, float] = {}
        self.restarts = 0
        # The same restarts by child slot (index). A slot the fleet no longer
        # has (TTOU, autoscale down, a HUP with fewer workers) is dropped by
        # slot_gone, so a slot added later starts from 0; ``restarts`` keeps all.
        self.slot_restarts: Counter[int] = Counter()
        self.hung = 0
        self.scaling: Counter[str] = Counter()  # autoscale decisions: "up", "down"
        self.cpu_s = 0.0
        self.last_success_ts = 0.0
        self._last: dict[int, dict[str, Any]] = {}
        # Point-in-time values per live child (e.g. the outbox backlog).
        self.gauges: dict[int, dict[str, float]] = {}
        self._summary_base: Counter[tuple[str, ...]] = Counter()

    def add(self, pid: int, beat: dict[str, Any]) -> None:
        last = self._last.setdefault(pid, {"counters": {}, "hist": {}, "cpu": 0.0})
        seen: dict[tuple[str, ...], int] = last["counters"]
        for row in beat.get("counters", []):
            key, value = tuple(str(k) for k in row[:-1]), int(row[-1])
            delta = value - seen.get(key, 0)
            if delta > 0:
                # Only what is new since this pid's previous report: a beat
                # that omits a counter must not make the next one count it twice.
                seen[key] = value
                self.counters[key] += delta
                if key[:2] == ("alerts", "done"):
                    self.last_success_ts = time.time()
        for name, hist in beat.get("histograms", {}).items():
            before = last["hist"].get(name, {"counts": [0] * len(hist["counts"]), "sum": 0.0})
            totals = self.hist_counts.setdefault(name, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, (now, then) in enumerate(zip(hist["counts"], before["counts"], strict=False)):
                totals[i] += max(0, now - then)
            self.hist_sums[name] = self.hist_sums.get(name, 0.0) + max(
                0.0, hist["sum"] - before["sum"])
            last["hist"][name] = hist
        if "gauges" in beat:
            self.gauges[pid] = {str(k): float(v) for k, v in beat["gauges"].items()}
        if "cpu_s" in beat:
            # Its own, its reaped children's (ffprobe) and its live ones' (PyAV
            # helpers): a helper that exits moves from the last to the second.
            cpu = (float(beat["cpu_s"]) + float(beat.get("children_cpu_s", 0.0))
                   + float(beat.get("helpers_cpu_s", 0.0)))
            if cpu > last["cpu"]:
                self.cpu_s += cpu - last["cpu"]
                last["cpu"] = cpu

    def child_gone(self, pid: int) -> None:
        self._last.pop(pid, None)
        self.gauges.pop(pid, None)

    def gauge_max(self, name: str) -> float | None:
        """The largest value live children report for ``name``; None when none does."""
        values = [g[name] for g in self.gauges.values() if name in g]
        return max(values) if values else None

    def count_restart(self, index: int) -> None:
        """Child slot ``index`` lost its process to an unplanned exit (a crash, a
        hang kill) and gets a new one; planned exits (recycles, reloads, TTOU,
        stops) are not restarts."""
        self.restarts += 1
        self.slot_restarts[index] += 1

    def slot_gone(self, index: int) -> None:
        self.slot_restarts.pop(index, None)

    def count_hung(self) -> None:
        self.hung += 1

    def count_scaling(self, direction: str) -> None:
        self.scaling[direction] += 1

    def processed(self) -> tuple[int, int]:
        done = sum(v for k, v in self.counters.items() if k[:2] == ("alerts", "done"))
        failed = sum(v for k, v in self.counters.items() if k[:2] == ("alerts", "failed"))
        return done, failed

    def status_line(self, children: Iterable[ChildHandle]) -> str:
        kids = list(children)
        consuming = sum(1 for c in kids if c.state == "consuming")
        busy = sum(len(c.last_report.get("slots", [])) for c in kids)
        done, failed = self.processed()
        return (f"{consuming}/{len(kids)} children consuming, {busy} alerts in flight, "
                f"{done} done, {failed} failed, {self.restarts} restarts")

    def summary(self, children: Iterable[ChildHandle], window_s: float) -> str:
        done, failed = self.processed()
        base_done = sum(v for k, v in self._summary_base.items() if k[:2] == ("alerts", "done"))
        base_failed = sum(v for k, v in self._summary_base.items()
                          if k[:2] == ("alerts", "failed"))
        self._summary_base = Counter(self.counters)
        rate = (done + failed - base_done - base_failed) / window_s
        return f"throughput {rate:.2f} alerts/s; " + self.status_line(children)
