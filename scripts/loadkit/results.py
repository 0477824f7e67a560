"""One run's figures, computed from what the tool saw and alertd's /metrics, and checked."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loadkit.metrics import STAGES, Scrape, processed, webhook_attempts
from loadkit.proctree import CpuSample, MemoryPeaks
from loadkit.servers import Receipt

MB = 1024 * 1024


@dataclass
class RunResult:
    """Flat fields go to results.csv; ``outcomes``, ``stage_p95_ms``, ``checks`` only to JSON."""

    profile: str
    prober: str  # pyav, ffprobe; "noop" for runs with no-op adapters
    adapters: str  # real, or noop (--noop-adapters: framework overhead only)
    workers: int
    concurrency: int
    slots: int
    window: int
    alerts_requested: int
    repeat: int = 1  # which of --repeat's measurements of this configuration
    alerts_measured: int = 0
    alerts_delivered: int = 0
    status: str = "ok"  # ok, capped (hit --duration-cap) or failed: <why>
    window_s: float = math.nan
    alerts_per_s: float = math.nan
    latency_mean_ms: float = math.nan
    latency_p50_ms: float = math.nan
    latency_p95_ms: float = math.nan
    latency_p99_ms: float = math.nan
    latency_max_ms: float = math.nan
    to_processed_mean_ms: float = math.nan  # publish -> the outcome's processed_at
    outbox_lag_p50_ms: float = math.nan  # processed_at -> webhook arrival (store + outbox)
    outbox_lag_p99_ms: float = math.nan
    alert_duration_mean_ms: float = math.nan  # alertd_alert_duration_seconds: take -> commit
    busy_slots: float = math.nan  # Little's law: alerts/s x alert duration
    slot_utilisation: float = math.nan
    stage_dedup_ms: float = math.nan
    stage_download_ms: float = math.nan
    stage_probe_ms: float = math.nan
    stage_store_ms: float = math.nan
    stage_notify_ms: float = math.nan
    cpu_alertd_s: float = math.nan
    cpu_ms_per_alert: float = math.nan
    cpu_metric_ms_per_alert: float = math.nan  # alertd_cpu_seconds_total, for comparison
    master_ms_per_alert: float = math.nan  # the master's own share of cpu_ms_per_alert
    cpu_x_raw: float = math.nan  # cpu_ms_per_alert / the raw consumer's ms per message
    idle_cores_alertd: float = math.nan  # noop runs: the tree's CPU while idle, before the run
    paused_s: float = math.nan  # noop runs: how long alertd was stopped for the prefill
    cores_alertd: float = math.nan
    broker_ms_per_alert: float = math.nan
    database_ms_per_alert: float = math.nan
    loadgen_ms_per_alert: float = math.nan
    cores_broker: float = math.nan
    cores_database: float = math.nan
    cores_loadgen: float = math.nan
    cores_machine: float = math.nan
    cores_other: float = math.nan  # machine - alertd - broker - database - loadgen
    busiest_child_cores: float = math.nan  # one child's own CPU (its event loop) / window
    peak_rss_total_mb: float = math.nan
    peak_rss_child_mb: float = math.nan
    peak_rss_helpers_mb: float = math.nan
    rows_failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    webhook_500s: int = 0
    webhooks_failed: int = 0
    consistent: bool = False
    load_start: str = ""
    load_end: str = ""
    waited_for_load_s: float = 0.0
    exit_code: int | None = None
    stragglers_killed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    stage_p95_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_per_child_mb: list[float] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # failed consistency checks
    py_spy_files: dict[str, str] = field(default_factory=dict)  # role -> path in the results
    notes: list[str] = field(default_factory=list)  # worth knowing, not failures (py-spy)

    def flat(self) -> dict[str, Any]:
        nested = {"outcomes", "stage_p95_ms", "peak_rss_per_child_mb", "checks", "py_spy_files",
                  "notes"}
        return {k: v for k, v in vars(self).items() if k not in nested}

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "capped") and self.consistent


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def fill_latency(result: RunResult, published: dict[str, float],
                 delivered: dict[str, float]) -> None:
    """Throughput and publish->webhook latency of the measured alerts that were delivered."""
    done = [a for a in published if a in delivered]
    result.alerts_measured, result.alerts_delivered = len(published), len(done)
    if not done:
        return
    latencies = [(delivered[a] - published[a]) * 1000 for a in done]
    result.window_s = max(delivered[a] for a in done) - min(published.values())
    result.alerts_per_s = len(done) / result.window_s if result.window_s > 0 else math.nan
    result.latency_mean_ms = sum(latencies) / len(latencies)
    for q in (50, 95, 99):
        setattr(result, f"latency_p{q}_ms", percentile(latencies, q))
    result.latency_max_ms = max(latencies)


def fill_outbox_lag(result: RunResult, receipts: list[Receipt]) -> None:
    """Where the time after alertd goes: publish -> processed_at, processed_at -> webhook."""
    first_ok: dict[str, Receipt] = {}
    for r in receipts:
        if r.answered == 200:
            first_ok.setdefault(r.alert_id, r)
    timed = [r for r in first_ok.values() if math.isfinite(r.processed_at)]
    if not timed:
        return
    result.to_processed_mean_ms = 1000 * sum(r.processed_at - r.published_at
                                             for r in timed) / len(timed)
    lags = [1000 * (r.received_at - r.processed_at) for r in timed]
    result.outbox_lag_p50_ms = percentile(lags, 50)
    result.outbox_lag_p99_ms = percentile(lags, 99)


def fill_from_metrics(result: RunResult, delta: Scrape) -> None:
    """Per-stage latency (means and p95 estimates) and Little's law, from /metrics only."""
    for stage in STAGES:
        hist = delta.histogram("alertd_stage_duration_seconds", stage=stage)
        setattr(result, f"stage_{stage}_ms", hist.mean * 1000)
        result.stage_p95_ms[stage] = hist.quantile(0.95) * 1000
    alert = delta.histogram("alertd_alert_duration_seconds")
    result.alert_duration_mean_ms = alert.mean * 1000
    if alert.count and not math.isnan(result.alerts_per_s):
        result.busy_slots = result.alerts_per_s * alert.mean
        result.slot_utilisation = result.busy_slots / result.slots
    result.retried = round(sum(delta.by_label("alertd_alerts_retried_total", "code").values()))
    attempts = webhook_attempts(delta)
    result.webhooks_failed = attempts.get("failed", 0) + attempts.get("gone", 0)
    cpu_metric = delta.value("alertd_cpu_seconds_total")
    if result.alerts_delivered:
        result.cpu_metric_ms_per_alert = 1000 * cpu_metric / result.alerts_delivered


def fill_resources(result: RunResult, cpu: CpuSample, peaks: MemoryPeaks) -> None:
    """CPU per alert for each party, cores busy, and memory peaks."""
    n = result.alerts_delivered
    if n and cpu.at > 0:
        result.cpu_alertd_s = cpu.alertd
        result.cpu_ms_per_alert = 1000 * cpu.alertd / n
        result.master_ms_per_alert = 1000 * cpu.master / n
        result.broker_ms_per_alert = 1000 * cpu.broker / n
        result.database_ms_per_alert = 1000 * cpu.database / n
        result.loadgen_ms_per_alert = 1000 * cpu.loadgen / n
        result.cores_alertd = cpu.alertd / cpu.at
        result.cores_broker = cpu.broker / cpu.at
        result.cores_database = cpu.database / cpu.at
        result.cores_loadgen = cpu.loadgen / cpu.at
        result.cores_machine = cpu.machine / cpu.at
        result.busiest_child_cores = max(cpu.children.values(), default=math.nan) / cpu.at
        result.cores_other = max(0.0, (cpu.machine - cpu.alertd - cpu.broker - cpu.database
                                       - cpu.loadgen) / cpu.at)
    result.peak_rss_total_mb = peaks.total_rss / MB
    result.peak_rss_per_child_mb = [round(v / MB, 1) for v in peaks.child_rss.values()]
    result.peak_rss_child_mb = max(result.peak_rss_per_child_mb, default=math.nan)
    result.peak_rss_helpers_mb = peaks.helpers_rss / MB


def check_consistency(result: RunResult, delta: Scrape, receipts: list[Receipt],
                      measured: set[str], db_rows: dict[str, int]) -> None:
    """The tool's counts must equal alertd's own: fills ``outcomes``, ``checks``, ``consistent``.

    ``receipts`` are the sink's, for the measured alerts only; ``db_rows`` the
    measured alerts' rows in the database by status.
    """
    first_ok: dict[str, Receipt] = {}
    for r in receipts:
        if r.answered == 200:
            first_ok.setdefault(r.alert_id, r)
    seen = Counter(f"{r.status}:{r.code}" if r.code else r.status for r in first_ok.values())
    result.outcomes = dict(sorted(seen.items()))
    result.rows_failed = sum(v for k, v in seen.items() if k.startswith("failed"))
    result.webhook_500s = sum(1 for r in receipts if r.answered == 500)
    reported = {f"{o}:{c}" if c else o: n for (o, c), n in processed(delta).items() if n}
    problems = []
    if reported != result.outcomes:
        problems.append(f"alerts processed by outcome: tool {result.outcomes} != "
                        f"/metrics {reported}")
    attempts = webhook_attempts(delta)
    oks = sum(1 for r in receipts if r.answered == 200)
    if attempts.get("delivered", 0) != oks:
        problems.append(f"webhooks delivered: sink {oks} != /metrics {attempts.get('delivered')}")
    if attempts.get("retry", 0) + attempts.get("failed", 0) != result.webhook_500s:
        problems.append(f"webhook attempts answered 500: sink {result.webhook_500s} != "
                        f"/metrics retry+failed {attempts.get('retry', 0)}"
                        f"+{attempts.get('failed', 0)}")
    ends = delta.histogram("alertd_alert_duration_seconds").count
    if round(ends) != sum(reported.values()):
        problems.append(f"alert duration observations {ends:.0f} != processed "
                        f"{sum(reported.values())}")
    if sum(db_rows.values()) != len(first_ok):
        problems.append(f"database rows {db_rows} != webhooks received {len(first_ok)}")
    if len(first_ok) != len(measured):
        problems.append(f"{len(measured) - len(first_ok)} measured alerts got no webhook")
    result.checks = problems
    result.consistent = not problems


def check_noop_consistency(result: RunResult, delta: Scrape, *, left_in_queue: int) -> None:
    """No-op runs: /metrics must count every prefilled message as one alert done, none left."""
    reported = {f"{o}:{c}" if c else o: n for (o, c), n in processed(delta).items() if n}
    result.outcomes = reported
    problems = []
    if reported != {"done": result.alerts_measured}:
        problems.append(f"alerts processed by outcome: /metrics {reported} != "
                        f"{{'done': {result.alerts_measured}}} prefilled")
    ends = delta.histogram("alertd_alert_duration_seconds").count
    if round(ends) != result.alerts_measured:
        problems.append(f"alert duration observations {ends:.0f} != prefilled "
                        f"{result.alerts_measured}")
    if left_in_queue:
        problems.append(f"{left_in_queue} messages still in the queue")
    result.checks = problems
    result.consistent = not problems
