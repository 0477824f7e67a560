"""The recommendation: the smallest configuration within 5% of the best at an acceptable p99."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from loadkit.results import RunResult

TOLERANCE = 0.05
CPU_SATURATED = 0.85  # share of the machine's cores busy; of one core for a child's loop
SLOTS_SATURATED = 0.8  # share of slots busy on average (Little's law)
OTHER_DISTURBS = 0.25  # cores used by processes that are not part of the test


@dataclass
class Recommendation:
    pick: RunResult | None = None
    best: RunResult | None = None
    max_p99_ms: float = math.nan
    p99_rule: str = ""
    candidates: list[RunResult] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)


def label(r: RunResult, *, prober: bool = False) -> str:
    """"2 x 8"; with ``prober`` (several probers measured) "2 x 8 pyav"."""
    base = f"{r.workers} x {r.concurrency}"
    return f"{base} {r.prober}" if prober or r.adapters == "noop" else base


def several_probers(runs: list[RunResult]) -> bool:
    return len({r.prober for r in runs if r.adapters == "real"}) > 1


def recommend(runs: list[RunResult], *, max_p99_ms: float | None = None,
              cpus: int | None = None) -> Recommendation:
    """Fewest children first (each costs memory and database connections), then fewest slots.

    Only runs with real adapters count: a no-op run measures the framework, not a
    configuration one could deploy.
    """
    real = [r for r in runs if r.adapters == "real"]
    if not real:
        return Recommendation(reasoning=["Only no-op adapter runs: they measure alertd's "
                                         "framework overhead, not a configuration to deploy; "
                                         "no recommendation."])
    usable = [r for r in real if r.ok and math.isfinite(r.alerts_per_s)]
    if not usable:
        return Recommendation(reasoning=["No run completed consistently: nothing to recommend."])
    best = max(usable, key=lambda r: r.alerts_per_s)
    if max_p99_ms is None:
        limit, rule = 2 * best.latency_p99_ms, "at most 2 x the p99 of the fastest configuration"
    else:
        limit, rule = max_p99_ms, "at most --max-p99"
    eligible = [r for r in usable if r.latency_p99_ms <= limit]
    if not eligible:
        return Recommendation(best=best, max_p99_ms=limit, p99_rule=rule, reasoning=[
            f"No configuration has p99 <= {limit:.0f} ms; raise --max-p99 or add capacity."])
    top = max(eligible, key=lambda r: r.alerts_per_s)
    candidates = [r for r in eligible if r.alerts_per_s >= (1 - TOLERANCE) * top.alerts_per_s]
    pick = min(candidates, key=lambda r: (r.workers, r.slots, -r.alerts_per_s))
    rec = Recommendation(pick=pick, best=best, max_p99_ms=limit, p99_rule=rule,
                         candidates=candidates)
    rec.reasoning = _reasoning(rec, usable, cpus or os.cpu_count() or 1)
    return rec


def _reasoning(rec: Recommendation, runs: list[RunResult], cpus: int) -> list[str]:
    pick, best = rec.pick, rec.best
    many = several_probers(runs)

    def name(r: RunResult) -> str:
        return label(r, prober=many)

    assert pick is not None and best is not None
    seconds = pick.alert_duration_mean_ms / 1000
    lines = [
        f"Fastest: {name(best)} at {best.alerts_per_s:.1f} alerts/s, p99 "
        f"{best.latency_p99_ms:.0f} ms. Acceptable p99: {rec.p99_rule} = "
        f"{rec.max_p99_ms:.0f} ms.",
        "Within 5% of the fastest acceptable one: " + ", ".join(
            f"{name(r)} ({r.alerts_per_s:.1f}/s, p99 {r.latency_p99_ms:.0f} ms)"
            for r in sorted(rec.candidates, key=lambda r: (r.workers, r.slots))) + ".",
        f"Smallest of them: **{name(pick)}** ({pick.workers} {_children(pick.workers)} x "
        f"{pick.concurrency} "
        f"slots = {pick.slots} slots): fewest children first, then fewest slots.",
        f"Little's law: {pick.alerts_per_s:.1f} alerts/s x {seconds:.3f} s per alert "
        f"(alertd_alert_duration_seconds, take -> commit) = {pick.busy_slots:.1f} slots busy "
        f"on average of {pick.slots} ({pick.slot_utilisation:.0%}). Slots needed for a "
        f"target rate R = R x {seconds:.3f} s, plus headroom for bursts.",
    ]
    busy = pick.cores_machine / cpus
    more_slots = [r for r in runs if r.workers == pick.workers and r.slots > pick.slots
                  and r.prober == pick.prober]
    split = (f"alertd {pick.cores_alertd:.2f}, RabbitMQ {pick.cores_broker:.2f}, PostgreSQL "
             f"{pick.cores_database:.2f}, load generator {pick.cores_loadgen:.2f}, other "
             f"processes {pick.cores_other:.2f}")
    if busy >= CPU_SATURATED:
        gained = ", ".join(f"{name(r)}: {r.alerts_per_s:.1f}/s, p99 {r.latency_p99_ms:.0f} ms"
                           for r in more_slots)
        lines.append(
            f"The machine was CPU-saturated: {pick.cores_machine:.2f} of {cpus} cores busy "
            f"({split})."
            + (f" More slots did not go faster, they only queue inside alertd ({gained})."
               if gained else "")
            + " For more throughput add replicas (pods, machines), or children up to the "
            "cores of a bigger machine; not slots.")
    elif pick.busiest_child_cores >= CPU_SATURATED:
        lines.append(
            f"A child's event loop is CPU-bound: the busiest child used "
            f"{pick.busiest_child_cores:.2f} of a core ({pick.cores_machine:.2f} of {cpus} "
            f"cores busy: {split}). More slots per child cannot help; add children "
            f"(--workers) while cores are free, then replicas.")
    elif pick.slot_utilisation >= SLOTS_SATURATED:
        lines.append(
            f"Slot-bound, not CPU-bound ({pick.cores_machine:.2f} of {cpus} cores busy: "
            f"{split}): "
            f"throughput = slots / time per alert, so more slots per child go faster until "
            f"the CPU saturates.")
    else:
        lines.append(
            f"Neither the CPU ({pick.cores_machine:.2f} of {cpus} cores: {split}) nor the slots "
            f"({pick.slot_utilisation:.0%}) are saturated: the limit is elsewhere (the "
            f"publisher's window, the broker, the database or the webhook outbox).")
    disturbed = [name(r) for r in runs if r.cores_other > OTHER_DISTURBS]
    if disturbed:
        lines.append(f"Other processes used more than {OTHER_DISTURBS} cores during "
                     f"{', '.join(disturbed)}: those figures are disturbed; rerun on a quiet "
                     "machine.")
    lines.append(
        f"KEDA: value = workers x concurrency = {pick.slots} per replica; replicas for R "
        f"alerts/s = ceil(R / {pick.alerts_per_s:.1f}) on a machine like this one.")
    return lines


def _children(n: int) -> str:
    return "child" if n == 1 else "children"
