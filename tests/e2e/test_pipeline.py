"""End to end: `alertd start` against real RabbitMQ, PostgreSQL, ffprobe and local HTTP servers."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e.harness import (
    TEST_SECRET,
    Alertd,
    Servers,
    alert,
    close_broker_connections,
    outbox,
    publish,
    queue_counts,
    queue_settled,
    rows,
    take_dead_letters,
    wait_until,
)
from tests.servers import Reply

pytestmark = pytest.mark.e2e


def test_a_mixed_batch_ends_with_the_right_rows_dead_letters_and_signed_webhooks(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    with Servers(clips) as srv, Alertd(
        tmp_path, fresh_vhost, fresh_db, "--max-download-bytes", "1000000",
        "--download-timeout", "2", "--max-attempts", "2", "--retry-delay", "0.5",
        workers=1, concurrency=8,
    ) as proc:
        proc.wait_consuming()
        hook = srv.hook_url()
        closed_port = "http://127.0.0.1:9/clip.mp4"
        valid = {
            "ok-mp4": srv.clip_url("mp4"), "ok-webm": srv.clip_url("webm"),
            "ok-mkv": srv.clip_url("mkv"), "ok-mov": srv.clip_url("mov"),
            "ok-audio": srv.clip_url("audio_only"),
        }
        failing = {
            "e-404": (srv.clips.url("/status/404"), "download_not_found"),
            "e-410": (srv.clips.url("/status/410"), "download_not_found"),
            "e-notvideo": (srv.clip_url("not_a_video"), "not_a_video"),
            "e-empty": (srv.clip_url("empty"), "not_a_video"),
            "e-large": (srv.clip_url("large"), "download_too_large"),
            "e-ssrf": (srv.clip_url("mp4").replace("127.0.0.1", "127.0.0.2"),
                       "forbidden_address"),
            "e-timeout": (srv.clips.url("/drip"), "download_timeout"),
            "e-refused": (closed_port, "download_failed"),
            "e-500": (srv.clips.url("/status/500"), "download_failed"),
        }
        invalid = [b"{not json", b"[1,2,3]", orjson.dumps({"video_url": srv.clip_url("mp4")}),
                   orjson.dumps({"alert_id": "bad-scheme", "video_url": "ftp://x/y",
                                 "webhook_url": hook})]
        bodies: list[bytes] = [orjson.dumps(alert(i, u, hook, attributes={"n": i}))
                               for i, u in valid.items()]
        bodies += [orjson.dumps(alert(i, u, hook)) for i, (u, _) in failing.items()]
        bodies += invalid
        # An exact redelivery: acked without a second row or webhook.
        bodies.append(orjson.dumps(alert("ok-mp4", srv.clip_url("mp4"), hook,
                                         attributes={"n": "ok-mp4"})))
        publish(fresh_vhost, bodies)

        expected = set(valid) | set(failing)
        wait_until(lambda: set(rows(fresh_db)) == expected, 60, "every alert stored")
        wait_until(lambda: set(srv.webhooks_by_alert()) == expected, 30, "every webhook")
        wait_until(lambda: queue_settled(fresh_vhost), 30, "the queue to drain")
        time.sleep(1)  # a duplicate webhook would arrive by now

        stored = rows(fresh_db)
        for alert_id in valid:
            row = stored[alert_id]
            assert row["status"] == "done" and row["error"] is None, row
            meta = row["metadata"]
            assert set(meta) >= {"duration_s", "size_bytes", "sha256", "format_name",
                                 "bit_rate", "video", "audio", "streams"}
            assert meta["size_bytes"] == clips[alert_id.removeprefix("ok-").replace(
                "audio", "audio_only")].stat().st_size
        assert stored["ok-mp4"]["metadata"]["video"]["codec"] == "h264"
        assert stored["ok-mp4"]["metadata"]["video"]["width"] == 320
        assert stored["ok-audio"]["metadata"]["video"] is None
        assert stored["ok-audio"]["metadata"]["audio"]["codec"] == "aac"
        for alert_id, (_, code) in failing.items():
            row = stored[alert_id]
            assert row["status"] == "failed" and row["metadata"] is None, row
            assert row["error"]["code"] == code, (alert_id, row["error"])
        assert stored["e-timeout"]["attempts"] == 2
        assert stored["e-refused"]["attempts"] == 2
        assert stored["e-404"]["attempts"] == 1

        verifier = Webhook(TEST_SECRET)
        by_alert = srv.webhooks_by_alert()
        ids = set()
        for alert_id, requests in by_alert.items():
            assert len(requests) == 1, f"{alert_id} got {len(requests)} webhooks"
            request = requests[0]
            payload = verifier.verify(request.body, request.headers)
            assert payload["alert_id"] == alert_id
            ids.add(request.headers["webhook-id"])
        assert len(ids) == len(expected)
        ok = orjson.loads(by_alert["ok-mp4"][0].body)
        assert ok["type"] == "alert.processed" and ok["status"] == "done"
        assert ok["attributes"] == {"n": "ok-mp4"} and ok["error"] is None
        bad = orjson.loads(by_alert["e-404"][0].body)
        assert bad["type"] == "alert.failed" and bad["metadata"] is None
        assert bad["error"]["code"] == "download_not_found"

        dead = take_dead_letters(fresh_vhost)
        reasons = sorted(str(headers["x-alertd-reason"]).split(":")[0] for _, headers in dead)
        assert reasons == ["invalid_field", "invalid_json", "missing_field", "not_an_object"]
        assert {body for body, _ in dead} == set(invalid)

        # The same id again, for another clip, once the first is stored: acked
        # without a second result or webhook (issue 2), counted and logged.
        reused = orjson.dumps(alert("ok-webm", srv.clip_url("mkv"), hook))
        publish(fresh_vhost, [reused])
        wait_until(lambda: "already stored for a different request" in proc.log(), 30,
                   "the reused id seen")
        wait_until(lambda: queue_settled(fresh_vhost), 30, "the reused id acked")
        time.sleep(1)  # a second webhook would arrive by now
        assert queue_counts(fresh_vhost)["alerts.dlq"] == 0
        assert len(srv.webhooks_by_alert()["ok-webm"]) == 1
        assert rows(fresh_db)["ok-webm"]["video_url"] == srv.clip_url("webm")
        assert all(o["status"] == "delivered" for o in outbox(fresh_db))
        proc.stop()
        assert queue_counts(fresh_vhost)["alerts"] == 0


def test_a_failing_webhook_is_retried_with_the_same_webhook_id_until_it_succeeds(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    script = [Reply(500), Reply(503, headers={"Retry-After": "1"}), Reply(200)]
    with Servers(clips, sink_script=script) as srv, Alertd(tmp_path, fresh_vhost,
                                                            fresh_db) as proc:
        proc.wait_consuming()
        publish(fresh_vhost, [alert("hook-retry", srv.clip_url("mp4"), srv.hook_url())])
        requests = wait_until(lambda: len(srv.webhooks()) >= 3 and srv.webhooks(), 30,
                              "three webhook attempts")
        assert len({r.headers["webhook-id"] for r in requests}) == 1
        wait_until(lambda: outbox(fresh_db)[0]["status"] == "delivered", 10, "delivered")
        row = outbox(fresh_db)[0]
        assert row["attempts"] == 3
        assert queue_settled(fresh_vhost)


def test_sigterm_finishes_in_flight_alerts_leaves_the_rest_queued_and_exits_zero(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db,
                                       "--graceful-timeout", "20",
                                       workers=1, concurrency=2) as proc:
        proc.wait_consuming()
        slow = srv.clips.url("/slow/mp4?delay=2")
        publish(fresh_vhost, [alert(f"drain-{i}", slow, srv.hook_url()) for i in range(6)])
        wait_until(lambda: len(srv.clips.requests) >= 2, 10, "two downloads in flight")
        proc.send(signal.SIGTERM)
        assert proc.wait(30) == 0
        stored = rows(fresh_db)
        assert 2 <= len(stored) < 6, sorted(stored)
        assert all(r["status"] == "done" for r in stored.values())
        # alertd is gone, so nothing is unacked: whatever it did not finish is ready.
        assert queue_counts(fresh_vhost)["alerts"] == 6 - len(stored)


def test_a_broker_connection_loss_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db,
                                       workers=1, concurrency=4) as proc:
        proc.wait_consuming()
        slow = srv.clips.url("/slow/mp4?delay=1")
        ids = [f"conn-{i}" for i in range(12)]
        publish(fresh_vhost, [alert(i, slow, srv.hook_url()) for i in ids])
        wait_until(lambda: len(srv.clips.requests) >= 2, 10, "downloads in flight")
        close_broker_connections(fresh_vhost, "test: connection loss")
        wait_until(lambda: set(rows(fresh_db)) == set(ids), 60, "every alert stored")
        wait_until(lambda: set(srv.webhooks_by_alert()) == set(ids), 30, "every webhook")
        wait_until(lambda: queue_settled(fresh_vhost), 30, "the queue to drain")
        time.sleep(1)
        assert all(len(v) == 1 for v in srv.webhooks_by_alert().values())
        assert "AMQP reconnecting" in proc.log()
        proc.wait_consuming()
        proc.stop()
        assert proc.proc is not None and proc.proc.returncode == 0
        assert queue_counts(fresh_vhost)["alerts"] == 0
