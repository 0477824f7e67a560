"""A child's live statistics: cumulative counters, latency histograms and busy slots.

Everything here is cumulative since the child started, so the master can turn
successive snapshots into deltas and keep its own totals monotonic across
child restarts. Snapshots are plain dicts, ready for orjson over the pipe.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from alertd.domain import Stage

# Seconds. Wide on purpose: a probe is milliseconds, a slow download minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)

# Plain str names: snapshot keys go to orjson, which takes no str subclass as a key,
# and a dict lookup is cheaper than an enum's .value on the hot path.
_STAGE_NAMES = {stage: stage.value for stage in Stage}
_STAGES = frozenset(_STAGE_NAMES.values())


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}


@dataclass(slots=True)
class SlotState:
    """One busy slot: which alert, which stage, since when (monotonic)."""

    alert_id: str | None
    stage: str
    started: float
    stage_started: float


class ChildStats:
    """Counters are keyed by a name and label values, e.g. ("alerts", "failed", "not_a_video")."""

    def __init__(self) -> None:
        self.counters: Counter[tuple[str, ...]] = Counter()
        self.histograms: dict[str, Histogram] = {}
        self.slots: dict[int, SlotState] = {}
        # Point-in-time values (not cumulative), e.g. the outbox backlog.
        self.gauges: dict[str, float] = {}
        self._next_slot = 0
        self.started = time.monotonic()

    def count(self, *key: str, by: int = 1) -> None:
        self.counters[key] += by

    def observe(self, name: str, seconds: float) -> None:
        histogram = self.histograms.get(name)
        if histogram is None:
            histogram = self.histograms[name] = Histogram()
        histogram.observe(seconds)

    def open_slot(self) -> int:
        self._next_slot += 1
        now = time.monotonic()
        self.slots[self._next_slot] = SlotState(None, "received", now, now)
        return self._next_slot

    def enter_stage(self, slot: int, stage: Stage) -> None:
        """Move ``slot`` to ``stage``, timing the stage it leaves (four times per alert)."""
        state = self.slots.get(slot)
        if state is None:
            return
        now = time.monotonic()
        if state.stage in _STAGES:
            self.observe(state.stage, now - state.stage_started)
        state.stage = _STAGE_NAMES[stage]
        state.stage_started = now

    def close_slot(self, slot: int) -> None:
        state = self.slots.pop(slot, None)
        if state is None:
            return
        now = time.monotonic()
        if state.stage in _STAGES:
            self.observe(state.stage, now - state.stage_started)

    def in_flight_alert_ids(self) -> list[str]:
        return [s.alert_id for s in self.slots.values() if s.alert_id]

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "counters": [[*key, value] for key, value in self.counters.items()],
            "histograms": {name: h.snapshot() for name, h in self.histograms.items()},
            "gauges": dict(self.gauges),
            "slots": [
                {"alert_id": s.alert_id, "stage": s.stage,
                 "elapsed_s": round(now - s.started, 3)}
                for s in self.slots.values()
            ],
        }
