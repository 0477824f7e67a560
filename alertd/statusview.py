"""What the master shows: /healthz, /readyz and /metrics over HTTP, and its control socket."""

from __future__ import annotations

import logging
import os
import selectors
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from alertd import __version__
from alertd.config import Settings
from alertd.errors import AlertdError
from alertd.stats import LATENCY_BUCKETS
from alertd.tinyserve import TinyServer

if TYPE_CHECKING:
    from alertd.master import Arbiter

log = logging.getLogger(__name__)

STAGES = ("dedup", "download", "probe", "store", "notify")


def _listen(key: str, where: str, open_server: Callable[[], TinyServer]) -> TinyServer:
    """``open_server()``, its OSError (a port in use, a missing directory) made a
    one-line refusal naming the setting, as for a bad config."""
    try:
        return open_server()
    except OSError as exc:
        raise AlertdError(f"{key}: cannot listen on {where}: "
                          f"{exc.strerror or exc}") from None


class MasterViews:
    def __init__(self, arbiter: Arbiter, selector: selectors.BaseSelector,
                 settings: Settings, control_path: str | None) -> None:
        self._arbiter = arbiter
        self._servers: list[TinyServer] = []
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(arbiter))
        try:
            if settings.metrics_port:
                self._servers.append(_listen(
                    "metrics_port", f"{settings.metrics_host}:{settings.metrics_port}",
                    lambda: TinyServer.tcp(settings.metrics_host, settings.metrics_port,
                                           selector, self.http)))
                log.info("serving /metrics /healthz /readyz on %s:%d", settings.metrics_host,
                         settings.metrics_port)
            if control_path:
                self._servers.append(_listen(
                    "control_socket", control_path,
                    lambda: TinyServer.unix(control_path, selector, self.control)))
        except AlertdError:
            self.close()
            raise

    def fds(self) -> list[int]:
        return [fd for server in self._servers for fd in server.fds()]

    def expire(self) -> None:
        for server in self._servers:
            server.expire()

    def close(self) -> None:
        for server in self._servers:
            server.close()

    def http(self, method: str, path: str) -> tuple[int, str, bytes]:
        arbiter = self._arbiter
        if path == "/healthz":
            ok = arbiter.heartbeats_fresh()
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"stale heartbeats\n"
        if path == "/readyz":
            ready = not arbiter.stopping and any(
                c.state == "consuming" and not c.retiring for c in arbiter.children.values())
            return (200 if ready else 503), "text/plain", b"ready\n" if ready else b"not ready\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(
                self._registry)
        return 404, "text/plain", b"not found\n"

    def control(self, command: str) -> bytes:
        if command != "status":
            return orjson.dumps({"error": f"unknown command {command!r}"}) + b"\n"
        return orjson.dumps(status_document(self._arbiter)) + b"\n"


def status_document(arbiter: Arbiter) -> dict[str, Any]:
    now = time.monotonic()
    children = []
    for child in sorted(arbiter.children.values(), key=lambda c: (c.index, c.started)):
        report = child.last_report
        counters = [tuple(row) for row in report.get("counters", [])]
        children.append({
            "index": child.index, "pid": child.pid, "state": child.state,
            "generation": child.generation, "age_s": round(now - child.started, 1),
            "retiring": child.retiring,
            # Per slot: a HUP successor shows the count of the child it replaces.
            "restarts": arbiter.aggregate.slot_restarts[child.index],
            "concurrency": report.get("concurrency"),
            "rss_bytes": report.get("rss_bytes", 0),
            "loop_lag_s": report.get("loop_lag_s", 0.0),
            "processed": child.processed,
            "failed": sum(int(r[-1]) for r in counters if r[:2] == ("alerts", "failed")),
            "heartbeat_age_s": round(now - child.last_beat, 1),
            "slots": report.get("slots", []),
        })
    done, failed = arbiter.aggregate.processed()
    return {
        "master_pid": os.getpid(), "uptime_s": round(now - arbiter.started, 1),
        "workers": arbiter.num_workers, "concurrency": arbiter.settings.concurrency,
        "stopping": arbiter.stopping, "restarts": arbiter.aggregate.restarts,
        "hung": arbiter.aggregate.hung, "generation": arbiter.generation,
        "processed": done + failed, "failed": failed, "children": children,
        "autoscale": autoscale_document(arbiter, now),
    }


def autoscale_document(arbiter: Arbiter, now: float) -> dict[str, Any] | None:
    """Bounds, target, the last queue sample and the decisions; None when off."""
    scaler = arbiter.autoscaler
    if scaler is None:
        return None
    scaling = arbiter.aggregate.scaling
    return {
        "min": scaler.low, "max": scaler.high, "target": arbiter.num_workers,
        "interval_s": scaler.settings.autoscale_interval,
        "queue_ready": scaler.ready,
        "sample_age_s": None if scaler.sampled_at is None else round(now - scaler.sampled_at, 1),
        "sample_failures": scaler.failures, "last_error": scaler.last_error,
        "decisions": {"up": scaling["up"], "down": scaling["down"]},
        "last_decision": scaler.last_decision,
    }


class _Collector:
    """Builds every metric from the master's aggregate at scrape time."""

    def __init__(self, arbiter: Arbiter) -> None:
        self._arbiter = arbiter

    def collect(self) -> Iterator[Metric]:
        arbiter = self._arbiter
        agg = arbiter.aggregate
        info = InfoMetricFamily("alertd_build", "alertd build information")
        info.add_metric([], {"version": __version__})
        yield info

        processed = CounterMetricFamily("alertd_alerts_processed", "Alerts with a stored "
                                        "outcome, by outcome and error code",
                                        labels=["outcome", "code"])
        retried = CounterMetricFamily("alertd_alerts_retried", "Transient failures sent to "
                                      "a delay queue for another attempt", labels=["code"])
        invalid = CounterMetricFamily("alertd_messages_invalid", "Messages dead-lettered as "
                                      "invalid, by reason", labels=["reason"])
        webhooks = CounterMetricFamily("alertd_webhook_deliveries", "Webhook delivery "
                                       "attempts by outcome", labels=["outcome"])
        for key, value in agg.counters.items():
            name, labels = key[0], key[1:]
            if name == "alerts":
                processed.add_metric([labels[0], labels[1] if len(labels) > 1 else ""], value)
            elif name == "retries":
                retried.add_metric([labels[0]], value)
            elif name == "invalid":
                invalid.add_metric([labels[0]], value)
            elif name == "webhooks":
                webhooks.add_metric([labels[0]], value)
        yield from (processed, retried, invalid, webhooks)
        for metric, counter, help_text in (
            ("alertd_messages_dead_lettered", "dead_lettered", "Messages sent to the DLQ"),
            ("alertd_alerts_duplicate", "duplicates", "Redelivered or duplicate alerts "
             "acked without a second result"),
            ("alertd_alerts_duplicate_conflicting", "conflicting_duplicates", "Duplicates "
             "whose request differed from the stored one (a producer reused the alert id "
             "or rebuilt the message); acked, the stored outcome stands"),
            ("alertd_messages_redelivered", "redelivered", "Deliveries flagged redelivered "
             "by the broker"),
            ("alertd_amqp_reconnects", "amqp_reconnects", "AMQP reconnections by children"),
            ("alertd_internal_errors", "internal_errors", "Unexpected errors while handling "
             "a message"),
            ("alertd_downloaded_bytes", "downloaded_bytes", "Bytes of clips downloaded for "
             "stored outcomes"),
        ):
            yield CounterMetricFamily(metric, help_text, value=agg.counters.get((counter,), 0))

        stage = HistogramMetricFamily("alertd_stage_duration_seconds", "Time spent per "
                                      "pipeline stage", labels=["stage"])
        for name in STAGES:
            if name in agg.hist_counts:
                stage.add_metric([name], _buckets(agg.hist_counts[name]),
                                 agg.hist_sums.get(name, 0.0))
        yield stage
        if "end_to_end" in agg.hist_counts:
            e2e = HistogramMetricFamily("alertd_alert_duration_seconds", "Time from taking "
                                        "an alert to committing its outcome")
            e2e.add_metric([], _buckets(agg.hist_counts["end_to_end"]),
                           agg.hist_sums.get("end_to_end", 0.0))
            yield e2e

        children = list(arbiter.children.values())
        busy = sum(len(c.last_report.get("slots", [])) for c in children)
        slots = arbiter.settings.concurrency * len([c for c in children if not c.retiring])
        yield GaugeMetricFamily("alertd_alerts_in_flight", "Alerts being processed", value=busy)
        yield GaugeMetricFamily("alertd_slots_free", "Idle slots over all children",
                                value=max(0, slots - busy))
        alive = GaugeMetricFamily("alertd_children", "Children by state", labels=["state"])
        for state in ("booting", "connecting", "consuming", "draining"):
            alive.add_metric([state], sum(1 for c in children if c.state == state))
        yield alive
        yield CounterMetricFamily("alertd_child_restarts", "Children replaced after an "
                                  "unplanned exit", value=agg.restarts)
        yield CounterMetricFamily("alertd_child_hung", "Children killed for a missing "
                                  "heartbeat", value=agg.hung)
        rss = GaugeMetricFamily("alertd_child_rss_bytes", "Resident memory per child",
                                labels=["child"])
        lag = GaugeMetricFamily("alertd_child_loop_lag_seconds", "Event-loop lag per child",
                                labels=["child"])
        for c in children:
            rss.add_metric([str(c.index)], c.last_report.get("rss_bytes", 0))
            lag.add_metric([str(c.index)], c.last_report.get("loop_lag_s", 0.0))
        yield rss
        yield lag
        yield CounterMetricFamily("alertd_cpu_seconds", "CPU used by children and their "
                                  "probe processes (ffprobe, PyAV helpers)", value=agg.cpu_s)
        backlog = agg.gauge_max("outbox_backlog")
        if backlog is not None:
            # Every child counts the same table: the max is the freshest view.
            yield GaugeMetricFamily("alertd_webhook_outbox_backlog", "Webhook deliveries "
                                    "pending in the outbox", value=backlog)
        yield GaugeMetricFamily("alertd_last_success_timestamp_seconds", "Unix time of the "
                                "last alert stored as done", value=agg.last_success_ts)
        yield from _autoscale_metrics(arbiter)


def _autoscale_metrics(arbiter: Arbiter) -> Iterator[Metric]:
    scaler = arbiter.autoscaler
    if scaler is None:
        return
    yield GaugeMetricFamily("alertd_autoscale_target_children", "Children the autoscaler "
                            "wants now (within --autoscale MIN,MAX)", value=arbiter.num_workers)
    bounds = GaugeMetricFamily("alertd_autoscale_bound_children", "The --autoscale bounds",
                               labels=["bound"])
    bounds.add_metric(["min"], scaler.low)
    bounds.add_metric(["max"], scaler.high)
    yield bounds
    decisions = CounterMetricFamily("alertd_autoscale_decisions", "Children added (up) or "
                                    "retired (down) by the autoscaler", labels=["direction"])
    for direction in ("up", "down"):
        decisions.add_metric([direction], arbiter.aggregate.scaling[direction])
    yield decisions
    yield CounterMetricFamily("alertd_autoscale_sample_failures", "Queue samples that "
                              "failed (broker down, probe killed): no decision",
                              value=scaler.failures)
    if scaler.ready is not None:
        yield GaugeMetricFamily("alertd_queue_ready_messages", "Messages ready in the main "
                                "queue at the last autoscale sample", value=scaler.ready)


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip([*LATENCY_BUCKETS, float("inf")], counts, strict=False):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
    return out
