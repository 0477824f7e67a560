"""End to end: ``--autoscale`` grows the fleet under a backlog and shrinks it when idle.

A real ``alertd start --autoscale 1,4 --concurrency 2`` with its own vhost and
database; slow clips keep the queue deep. ``--autoscale-interval 0.5`` makes
every window (3 samples to grow, 3 of cooldown, 12 idle to shrink) short
enough for the test to finish well within 90 s.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.harness import (
    Alertd,
    Servers,
    http_get,
    lines_with,
    metric_values,
    publish,
    queue_counts,
    spawned,
    wait_until,
)
from tests.e2e.test_faults import via_proxy
from tests.e2e.test_master import (
    slow_alerts,
    stopped_and_drained,
    stored_once_with_one_webhook_id,
)
from tests.faultproxy import FaultProxy
from tests.ports import free_port
from tests.unit.test_observability_files import autoscale_only, not_exported, referenced_metrics

pytestmark = pytest.mark.e2e

DECISION = re.compile(r"autoscale (up|down): (\d) -> (\d) children \((.+)\)")


def fleet(proc: Alertd) -> tuple[int, int]:
    """(target, live children, retiring ones included) from ``alertd status``."""
    doc = proc.status()
    if doc is None:
        return -1, -1
    return doc["autoscale"]["target"], len(doc["children"])


def test_a_backlog_grows_the_fleet_to_max_and_idleness_shrinks_it_gracefully_to_min(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    port = free_port()
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db, "--autoscale", "1,4",
                                       "--autoscale-interval", "0.5", "--metrics-port",
                                       str(port), workers=1, concurrency=2) as proc:
        proc.wait_consuming()
        # 60 downloads of 2 s: one child (2 slots) would need a minute.
        ids, bodies = slow_alerts(srv, "scale", 60, delay=2)
        published = time.monotonic()
        publish(fresh_vhost, bodies)

        def four_consuming() -> bool:
            proc.assert_running()
            return fleet(proc)[0] == 4 and proc.consuming(4)
        wait_until(four_consuming, 40, "the fleet to grow to 4 consuming children")
        grown = time.monotonic() - published
        assert queue_counts(fresh_vhost)["alerts"] > 0, "grew only after the backlog was gone"
        metrics = metric_values(port)
        assert metrics['alertd_autoscale_decisions_total{direction="up"}'] == 3
        assert metrics["alertd_autoscale_target_children"] == 4
        assert "alertd_queue_ready_messages" in metrics
        _, body = http_get(port, "/metrics")
        shown = {n for n in referenced_metrics() if autoscale_only(n)}
        assert shown and not not_exported(shown, body.decode())

        stored_once_with_one_webhook_id(srv, fresh_db, ids)
        drained = time.monotonic()
        wait_until(lambda: fleet(proc) == (1, 1), 45, "the fleet to shrink back to 1")
        shrunk = time.monotonic() - drained
        doc = proc.status()
        assert doc is not None and doc["restarts"] == 0 and doc["hung"] == 0
        auto = doc["autoscale"]
        assert auto["decisions"] == {"up": 3, "down": 3}, auto
        assert auto["min"] == 1 and auto["max"] == 4 and auto["queue_ready"] == 0
        assert auto["sample_failures"] == 0 and auto["last_decision"].startswith("down 2 -> 1")

        log = proc.log()
        steps = [(d, int(a), int(b)) for d, a, b, _ in DECISION.findall(log)]
        assert steps == [("up", 1, 2), ("up", 2, 3), ("up", 3, 4),
                         ("down", 4, 3), ("down", 3, 2), ("down", 2, 1)], steps
        # Never above MAX: four slots were ever used, each child forked once.
        assert sorted(index for index, _, _ in spawned(log)) == [0, 1, 2, 3]
        for index, pid, _ in spawned(log)[1:]:
            # Shrinking retires the highest slot first, through the TERM drain.
            assert lines_with(log, f"retiring child {index} pid {pid} (graceful)")
            assert lines_with(log, f"child {index} pid {pid} ended (exit code 0)")
        assert "requeued" not in log and "SIGKILL" not in log
        assert metric_values(port)["alertd_messages_redelivered_total"] == 0
        print(f"\ngrew 1 -> 4 in {grown:.1f}s after publishing; shrank 4 -> 1 in "
              f"{shrunk:.1f}s after the last webhook")
        stopped_and_drained(proc, fresh_vhost)


def test_a_stalled_broker_fails_samples_without_a_decision_and_never_stalls_the_master(
    tmp_path: Path, fresh_vhost: str, fresh_db: str,
) -> None:
    # MIN = workers and no load: nothing to decide, before, during or after the stall.
    with FaultProxy("127.0.0.1", 5672) as proxy, Alertd(
            tmp_path, via_proxy(fresh_vhost, proxy), fresh_db, "--autoscale", "2,3",
            "--autoscale-interval", "0.2", workers=2, concurrency=2) as proc:
        proc.wait_consuming()
        wait_until(lambda: (proc.status() or {}).get("autoscale", {}).get("sample_age_s")
                   is not None, 10, "a first queue sample")
        # Connections stay open but nothing flows: each probe's AMQP handshake hangs
        # until pika gives up (3 s) or the master kills the probe (5 s).
        proxy.stall()
        slowest, until = 0.0, time.monotonic() + 8
        while time.monotonic() < until:
            asked = time.monotonic()
            assert proc.status() is not None, "the master did not answer"
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.1)
        auto = proc.status()["autoscale"]  # type: ignore[index]
        assert auto["sample_failures"] >= 1 and auto["queue_ready"] is None, auto
        proxy.resume()
        wait_until(lambda: "queue samples work again" in proc.log(), 30,
                   "samples to work again")
        proc.wait_consuming(timeout=40)
        log = proc.log()
        failed = lines_with(log, "autoscale: queue sample failed")
        assert len([line for line in failed if " WARNING " in line]) == 1  # once per outage
        assert not DECISION.findall(log)
        assert slowest < 0.5, f"status took {slowest:.2f}s while the broker stalled"
        print(f"\nslowest status answer during the stall: {slowest * 1000:.0f} ms; "
              f"{auto['sample_failures']} failed samples")
        proc.send(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.log()
