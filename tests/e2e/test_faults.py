"""Faults injected for real under load; each test names the failure it reproduces."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
import pytest

from tests.conftest import PG_ADMIN_DSN, rabbitmqctl
from tests.e2e.faults import Run, run_with_fault
from tests.e2e.harness import (
    Alertd,
    Servers,
    alert,
    close_broker_connections,
    kill_quietly,
    outbox,
    publish,
    queue_counts,
    rows,
    take_dead_letters,
    vhost_of,
    wait_until,
)
from tests.faultproxy import FaultProxy
from tests.servers import Reply

pytestmark = pytest.mark.e2e


def via_proxy(url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def test_children_sigkilled_repeatedly_under_load_lose_and_duplicate_nothing(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """Celery/Dramatiq-style loss: messages acked before a killed worker finished them."""
    def kill_children(run: Run) -> None:
        for _ in range(4):
            victims = [c["pid"] for c in run.proc.children() if c["state"] == "consuming"]
            if victims:
                kill_quietly(random.choice(victims), signal.SIGKILL)
            time.sleep(1.5)

    run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, kill_children)


def test_the_broker_closing_every_connection_twice_loses_and_duplicates_nothing(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """Tasks run twice after a broker reconnect; children back with zero consumers."""
    def close_twice(run: Run) -> None:
        close_broker_connections(run.amqp_url, "fault test: close all")
        wait_until(run.proc.consuming, 60, "children consuming again")
        close_broker_connections(run.amqp_url, "fault test: close all again")

    run = run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, close_twice)
    assert run.proc.log().count("AMQP reconnecting") >= 2


def test_the_broker_app_stopped_and_restarted_loses_nothing(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """rabbitmqctl stop_app / start_app under load: reconnect, resume consuming."""
    def restart_broker(run: Run) -> None:
        rabbitmqctl("stop_app")
        try:
            time.sleep(3)
        finally:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")

    run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, restart_broker)


def test_a_broker_connection_that_stalls_without_closing_is_detected_and_replaced(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """Hangs on a broker that stops answering: AMQP heartbeats (2 s) find it."""
    with FaultProxy("127.0.0.1", 5672) as proxy:
        stalled_url = via_proxy(fresh_vhost, proxy).replace("heartbeat=10", "heartbeat=2")

        def stall(run: Run) -> None:
            proxy.stall()
            time.sleep(12)
            proxy.resume()

        run = run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, stall,
                             amqp_for_alertd=stalled_url, alerts=120)
    assert "AMQP reconnecting" in run.proc.log()


def test_database_backends_terminated_repeatedly_fail_no_alert(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """Backends killed mid-transaction: retried, never acked before commit."""
    dbname = urlsplit(fresh_db).path.lstrip("/")

    def terminate(run: Run) -> None:
        for _ in range(3):
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
            time.sleep(1)

    run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, terminate)
    assert all(r["status"] == "done" for r in rows(fresh_db).values())


def test_a_database_gone_longer_than_the_retry_budget_delays_but_fails_no_alert(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """The DB blinks for 20 s, longer than 2 attempts x 0.5 s: alerts wait, none fails."""
    with FaultProxy("127.0.0.1", 5432) as proxy:
        def outage(run: Run) -> None:
            proxy.down()
            time.sleep(20)
            proxy.resume()

        run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, outage,
                       dsn_for_alertd=via_proxy(fresh_db, proxy),
                       args=("--max-attempts", "2", "--retry-delay", "0.5"))
    stored = rows(fresh_db)
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in stored.values())


def test_a_postgresql_restart_under_load_fails_no_alert(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """The server restarts (every connection dropped, refused for a while)."""
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]

    def restart(run: Run) -> None:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main",
                        "restart"], check=True, capture_output=True, timeout=120)

    run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, restart)
    assert all(r["status"] == "done" for r in rows(fresh_db).values())


def test_a_webhook_receiver_down_for_a_long_stretch_gets_every_result_after(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """Results stay in the outbox while the receiver is gone, all delivered after."""
    with Servers(clips) as sink_host, FaultProxy("127.0.0.1", sink_host.sink.port) as proxy:
        proxy.down()
        hook = f"http://127.0.0.1:{proxy.port}/hook"

        def come_back(run: Run) -> None:
            wait_until(lambda: len(rows(fresh_db)) >= 100, 60, "results piling up")
            time.sleep(10)
            proxy.resume()

        run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, come_back, alerts=150,
                       hook=lambda srv, i: hook, webhook_srv=sink_host, settle_s=240)
    assert all(row["status"] == "delivered" for row in outbox(fresh_db))


def test_a_clip_server_that_drips_hangs_resets_lies_or_loops_fails_each_alert_cleanly(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """Hostile clip servers: every alert ends with its code, nothing leaks."""
    routes = ["/clips/mp4", "/drip", "/endless", "/reset", "/lying-length", "/redirect/9"]
    # /endless streams as fast as loopback allows: the byte cap (4 MB here)
    # stops it before any timeout does.
    expected = ["done", "download_timeout", "download_too_large", "download_failed",
                "download_failed", "download_failed"]
    run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, lambda run: None, alerts=60,
                   clip=lambda srv, i: srv.clips.url(routes[i % len(routes)]),
                   args=("--download-timeout", "2", "--max-attempts", "2",
                         "--retry-delay", "0.5", "--max-download-bytes", "4000000"))
    stored = rows(fresh_db)
    for alert_id, row in stored.items():
        want = expected[int(alert_id.rsplit("-", 1)[1]) % len(routes)]
        got = row["status"] if row["status"] == "done" else row["error"]["code"]
        assert got == want, (alert_id, row["error"])


def test_a_full_download_disk_is_transient_and_leaves_no_partial_file(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """ENOSPC while writing a clip: retried later, recovered, no partial files left."""
    mount = tmp_path / "downloads"
    mount.mkdir()
    size = clips["mp4"].stat().st_size
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3}", "tmpfs", str(mount)],
                   check=True, capture_output=True, timeout=30)
    try:
        run_with_fault(tmp_path, fresh_vhost, fresh_db, clips, lambda run: None, alerts=60,
                       clip=lambda srv, i: srv.clips.url("/slow/mp4?delay=0.2"),
                       args=("--max-attempts", "8", "--retry-delay", "0.2"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True,
                       timeout=30)
    stored = rows(fresh_db)
    retried = [r for r in stored.values() if r["attempts"] > 1]
    assert retried, "the tmpfs never filled up: the test proved nothing"
    assert all(r["status"] == "done" for r in stored.values())


def test_a_dead_letter_queue_that_refuses_messages_leaves_nothing_unacked(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """The DLQ publish is nacked by the broker: requeued, then dead-lettered once it can be."""
    vhost = vhost_of(fresh_vhost)
    # A high delivery limit: this test is about alertd's requeue, not the
    # broker's backstop (which would dead-letter it after 20 returns).
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db,
                                       "--delivery-limit", "1000") as proc:
        proc.wait_consuming()
        rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", "full-dlq",
                    r"^alerts\.dlq$", '{"max-length": 0, "overflow": "reject-publish"}')
        # A quorum queue takes one message past its limit before refusing.
        publish(fresh_vhost, [b"filler"], queue="alerts.dlq")
        publish(fresh_vhost, [b"{not json", orjson.dumps(alert("fine", srv.clip_url("mp4"),
                                                                srv.hook_url()))])
        wait_until(lambda: "could not settle delivery" in proc.log(), 60, "a refused publish")
        wait_until(lambda: set(rows(fresh_db)) == {"fine"}, 15,
                   "the other alert processed although a dead letter is stuck")
        rabbitmqctl("clear_policy", "-p", vhost, "full-dlq")
        # RabbitMQ 3.10 keeps refusing a channel that a full quorum queue once
        # rejected; alertd's next try goes out on a fresh channel and lands.
        wait_until(lambda: queue_counts(fresh_vhost)["alerts.dlq"] == 2, 30,
                   "the letter dead-lettered once the DLQ accepts again")
        proc.stop()
    assert queue_counts(fresh_vhost)["alerts"] == 0
    [(body, headers)] = [(b, h) for b, h in take_dead_letters(fresh_vhost) if b != b"filler"]
    assert body == b"{not json" and str(headers["x-alertd-reason"]).startswith("invalid_json")


def test_a_receiver_answering_410_or_retry_after_is_honoured(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    """410 Gone stops the deliveries of that event; Retry-After delays the next attempt."""
    script = [Reply(410), Reply(503, headers={"Retry-After": "3"}), Reply(200)]
    with Servers(clips, sink_script=script) as srv, Alertd(tmp_path, fresh_vhost,
                                                            fresh_db) as proc:
        proc.wait_consuming()
        publish(fresh_vhost, [alert("gone", srv.clip_url("mp4"), srv.hook_url("/gone"))])
        wait_until(lambda: outbox(fresh_db) and outbox(fresh_db)[0]["status"] == "gone", 30,
                   "the 410 to end the delivery")
        publish(fresh_vhost, [alert("later", srv.clip_url("mp4"), srv.hook_url("/later"))])
        wait_until(lambda: len(srv.webhooks()) >= 3, 30, "the retry after Retry-After")
        time.sleep(1.5)
    gone = [r for r in srv.webhooks() if r.path_qs == "/gone"]
    later = [r for r in srv.webhooks() if r.path_qs == "/later"]
    assert len(gone) == 1, "a 410 must not be retried"
    assert len(later) == 2
    attempts = {r["alert_id"]: r for r in outbox(fresh_db)}
    assert attempts["gone"]["status"] == "gone" and attempts["later"]["status"] == "delivered"
    with psycopg.connect(fresh_db) as conn:
        [(gap,)] = conn.execute(
            "SELECT extract(epoch FROM max(attempted_at) - min(attempted_at)) FROM "
            "webhook_attempts a JOIN webhook_outbox o ON o.id = a.outbox_id "
            "WHERE o.alert_id = 'later'").fetchall()
    assert float(gap) >= 3.0
