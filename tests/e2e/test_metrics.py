"""/metrics end to end: exact counts for a known mix, kept across a child kill, no secrets."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import orjson
import pytest

from tests.e2e.harness import (
    TEST_SECRET,
    Alertd,
    Servers,
    alert,
    http_get,
    kill_quietly,
    metric_values,
    publish,
    rows,
    wait_until,
)
from tests.ports import free_port
from tests.unit.test_observability_files import (
    RABBITMQ_METRICS,
    autoscale_only,
    not_exported,
    referenced_metrics,
)

pytestmark = pytest.mark.e2e
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$')
SIGNED_QUERY_SECRET = "sig-9f8e7d6c5b4a"


def sample(values: dict[str, float], name: str, **labels: str) -> float:
    """The value of ``name`` with exactly ``labels`` (in any order); 0 when absent."""
    for key, value in values.items():
        match = SAMPLE.match(key)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return value
    return 0.0


def test_metrics_count_a_known_mix_exactly_and_survive_a_killed_child(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    port = free_port()
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db,
                                       "--metrics-port", str(port), workers=2,
                                       concurrency=4) as proc:
        proc.wait_consuming()
        hook = srv.hook_url()
        signed = srv.clip_url("mp4") + f"?token={SIGNED_QUERY_SECRET}"
        mix = [alert(f"done-{i}", signed, hook) for i in range(6)]
        mix += [alert(f"nf-{i}", srv.clips.url("/status/404"), hook) for i in range(3)]
        mix += [alert(f"nav-{i}", srv.clip_url("not_a_video"), hook) for i in range(2)]
        publish(fresh_vhost, [*mix, b"{not json"])
        wait_until(lambda: len(rows(fresh_db)) == 11 and len(srv.webhooks()) == 11, 60,
                   "every alert stored and delivered")

        def settled() -> dict[str, float] | None:
            values = metric_values(port)
            return values if sample(values, "alertd_webhook_deliveries_total",
                                    outcome="delivered") == 11 else None
        values = wait_until(settled, 10, "heartbeats carrying the last counts")

        assert sample(values, "alertd_alerts_processed_total", outcome="done", code="") == 6
        assert sample(values, "alertd_alerts_processed_total", outcome="failed",
                      code="download_not_found") == 3
        assert sample(values, "alertd_alerts_processed_total", outcome="failed",
                      code="not_a_video") == 2
        assert sample(values, "alertd_messages_invalid_total", reason="invalid_json") == 1
        assert sample(values, "alertd_messages_dead_lettered_total") == 1
        assert sample(values, "alertd_stage_duration_seconds_count", stage="download") == 11
        assert sample(values, "alertd_stage_duration_seconds_count", stage="probe") == 8
        assert sample(values, "alertd_stage_duration_seconds_count", stage="store") == 11
        assert sample(values, "alertd_stage_duration_seconds_count", stage="notify") == 11
        assert sample(values, "alertd_alert_duration_seconds_count") == 11
        assert sample(values, "alertd_downloaded_bytes_total") == 6 * clips["mp4"].stat().st_size
        assert sample(values, "alertd_children", state="consuming") == 2
        assert sample(values, "alertd_cpu_seconds_total") > 0
        assert sample(values, "alertd_last_success_timestamp_seconds") > 0

        _, body = http_get(port, "/metrics")
        # The autoscaler's own metrics need --autoscale: tests/e2e/test_autoscale.py.
        missing = not_exported({n for n in referenced_metrics() - RABBITMQ_METRICS
                                if not autoscale_only(n)}, body.decode())
        assert not missing, f"dashboard or rules name metrics alertd does not export: {missing}"
        assert "alertd_webhook_outbox_backlog 0.0" in body.decode()

        victim = proc.children()[0]["pid"]
        kill_quietly(victim, signal.SIGKILL)
        wait_until(lambda: victim not in {c["pid"] for c in proc.children()}
                   and proc.consuming(), 60, "the killed child replaced")
        publish(fresh_vhost, [orjson.dumps(alert(f"after-{i}", srv.clip_url("mp4"), hook))
                              for i in range(2)])
        after = wait_until(
            lambda: (v := metric_values(port)) and sample(
                v, "alertd_alerts_processed_total", outcome="done", code="") >= 8 and v,
            60, "the alerts after the kill counted")
        assert sample(after, "alertd_alerts_processed_total", outcome="done", code="") == 8
        assert sample(after, "alertd_alerts_processed_total", outcome="failed",
                      code="download_not_found") == 3, "a counter went back after the kill"
        assert sample(after, "alertd_child_restarts_total") == 1
        assert sample(after, "alertd_stage_duration_seconds_count", stage="download") == 13

    log = proc.log()
    for secret in (TEST_SECRET, TEST_SECRET.removeprefix("whsec_"), SIGNED_QUERY_SECRET):
        assert secret not in log, "a secret reached the log"
        assert secret not in body.decode(), "a secret reached /metrics"
