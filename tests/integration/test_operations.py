"""Operator commands against the real broker and database: dlq and outbox."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pika
import pytest

from alertd.adapters.amqp import topology
from alertd.adapters.postgres import PostgresStore, open_pool
from alertd.config import Settings
from alertd.domain import Alert, Outcome, webhook_event
from alertd.ports import AttemptRecord, DeliveryResult
from tests.e2e.harness import outbox, publish, queue_counts, unmigrated_database

ALERTD = str(Path(sys.executable).with_name("alertd"))
pytestmark = pytest.mark.integration


def alertd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([ALERTD, *args], capture_output=True, text=True, input=stdin,
                          timeout=60, check=False)


@pytest.fixture()
def dead_letters(fresh_vhost: str) -> str:
    """A vhost whose alerts.dlq holds three dead letters with alertd's headers."""
    publish(fresh_vhost, [b"{}"])  # declares the topology; then empty the main queue
    connection = pika.BlockingConnection(pika.URLParameters(fresh_vhost))
    channel = connection.channel()
    channel.queue_purge("alerts")
    for i, reason in enumerate(["invalid_json: x", "missing_field: video_url", "too_deep: 40"]):
        body = orjson.dumps({"alert_id": f"dead-{i}"}) if i else b"{broken"
        channel.basic_publish("", "alerts.dlq", body, pika.BasicProperties(
            delivery_mode=2, headers={"x-alertd-reason": reason, "x-alertd-attempt": 2}))
    connection.close()
    return fresh_vhost


def test_dlq_list_shows_every_reason_and_removes_nothing(dead_letters: str) -> None:
    for _ in range(2):
        done = alertd("dlq", "list", "--json", "--amqp-url", dead_letters)
        assert done.returncode == 0, done.stderr
        docs = [orjson.loads(line) for line in done.stdout.splitlines()]
        assert [d["reason"] for d in docs] == [
            "invalid_json: x", "missing_field: video_url", "too_deep: 40"]
        assert [d["alert_id"] for d in docs] == [None, "dead-1", "dead-2"]
    assert queue_counts(dead_letters)["alerts.dlq"] == 3


def test_dlq_show_prints_headers_and_body_of_one_letter(dead_letters: str) -> None:
    done = alertd("dlq", "show", "dead-2", "--amqp-url", dead_letters)
    assert done.returncode == 0, done.stderr
    assert "too_deep: 40" in done.stdout and '{"alert_id":"dead-2"}' in done.stdout
    assert alertd("dlq", "show", "nope", "--amqp-url", dead_letters).returncode == 1


def test_dlq_replay_moves_only_the_chosen_letters_back_as_fresh_alerts(dead_letters: str) -> None:
    done = alertd("dlq", "replay", "dead-1", "--amqp-url", dead_letters)
    assert done.returncode == 0, done.stderr
    assert "replayed 1" in done.stdout
    counts = queue_counts(dead_letters)
    assert counts["alerts.dlq"] == 2 and counts["alerts"] == 1
    connection = pika.BlockingConnection(pika.URLParameters(dead_letters))
    method, props, body = connection.channel().basic_get("alerts", auto_ack=True)
    connection.close()
    assert method is not None and orjson.loads(body) == {"alert_id": "dead-1"}
    assert "x-alertd-reason" not in props.headers and "x-alertd-attempt" not in props.headers
    assert props.delivery_mode == 2


class DeadLetterer(threading.Thread):
    """Stands in for a running alertd: every message of the main queue goes back
    to the DLQ as invalid, at once."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.seen = url, 0
        self.ready, self.stop = threading.Event(), threading.Event()

    def run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=8)
        self.ready.set()
        for method, props, body in channel.consume("alerts", inactivity_timeout=0.05):
            if self.stop.is_set():
                break
            if method is None:
                continue
            headers = {**(props.headers or {}), "x-alertd-reason": "invalid_json: again"}
            channel.basic_publish("", "alerts.dlq", body, pika.BasicProperties(
                delivery_mode=2, headers=headers))
            channel.basic_ack(method.delivery_tag)
            self.seen += 1
        channel.cancel()
        connection.close()


def test_dlq_replay_while_alertd_runs_replays_each_letter_once(dead_letters: str) -> None:
    # Each replayed letter is dead-lettered again at once, behind the others:
    # the walk must not take it again (it did, up to 10 000 times; found by a review).
    worker = DeadLetterer(dead_letters)
    worker.start()
    assert worker.ready.wait(10)
    try:
        done = alertd("dlq", "replay", "--all", "--amqp-url", dead_letters)
    finally:
        worker.stop.set()
        worker.join(10)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "replayed 3 dead letters to 'alerts'", worker.seen
    assert done.stderr == ""


def test_dlq_replay_with_the_main_queue_missing_is_one_line_and_keeps_the_letter(
    dead_letters: str,
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(dead_letters))
    connection.channel().queue_delete("alerts")  # e.g. to change --queue-type
    connection.close()
    done = alertd("dlq", "replay", "--all", "--amqp-url", dead_letters)
    assert done.returncode == 1
    assert done.stderr.strip() == ("alertd: error: queue 'alerts' does not exist: nothing more "
                                   "was replayed; start alertd (or 'alertd publish') to declare "
                                   "it, then run this again"), done.stderr
    assert queue_counts(dead_letters)["alerts.dlq"] == 3


def test_publish_with_the_daemon_config_declares_the_queue_as_alertd_does(
    fresh_vhost: str, tmp_path: Path,
) -> None:
    # A fresh broker, publish first: alertd's own declare with the same file
    # was refused (PRECONDITION_FAILED, x-delivery-limit) for ever.
    conf = tmp_path / "alertd.toml"
    conf.write_text(f'amqp_url = "{fresh_vhost}"\ndelivery_limit = 5\nworkers = 3\n')
    done = alertd("publish", "--config", str(conf), '{"alert_id": "p-1"}')
    assert done.returncode == 0, done.stderr
    connection = pika.BlockingConnection(pika.URLParameters(fresh_vhost))
    channel = connection.channel()
    for name, arguments in topology(Settings(amqp_url=fresh_vhost, delivery_limit=5)):
        channel.queue_declare(name, durable=True, arguments=arguments)  # no PRECONDITION_FAILED
    connection.close()


def test_outbox_commands_on_an_unmigrated_database_say_so_in_one_line() -> None:
    with unmigrated_database() as dsn:
        for command in (["outbox", "list"], ["outbox", "retry", "--all"],
                        ["db", "prune", "--older-than", "30", "--yes"]):
            done = alertd(*command, "--dsn", dsn)
            assert done.returncode == 3, done.stderr
            assert done.stderr.strip().endswith("run 'alertd db migrate'"), done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_dlq_purge_asks_first_and_purges_only_when_confirmed(dead_letters: str) -> None:
    refused = alertd("dlq", "purge", "--amqp-url", dead_letters, stdin="n\n")
    assert refused.returncode != 0
    assert queue_counts(dead_letters)["alerts.dlq"] == 3
    done = alertd("dlq", "purge", "--yes", "--amqp-url", dead_letters)
    assert done.returncode == 0 and "purged 3" in done.stdout
    assert queue_counts(dead_letters)["alerts.dlq"] == 0


async def test_outbox_list_and_retry_show_and_requeue_undelivered_webhooks(fresh_db: str) -> None:
    pool = await open_pool(fresh_db, 1)
    store = PostgresStore(pool)
    now = dt.datetime.now(dt.UTC)
    for i in range(2):
        alert = Alert(alert_id=f"ob-{i}", video_url="http://x/v", webhook_url="http://h/")
        outcome = Outcome.done(alert, {"duration_s": 1.0}, attempts=1, received_at=now,
                               processed_at=now)
        assert await store.record_outcome(outcome, webhook_event(outcome, default_url=None))
    [first, second] = await store.claim_due(10, 60)
    await store.record_attempts([
        AttemptRecord(first, DeliveryResult(ok=True, status_code=200), None)])
    await store.record_attempts([
        AttemptRecord(second, DeliveryResult(ok=False, status_code=500, error="boom"), None)])
    await pool.close()

    listed = alertd("outbox", "list", "--json", "--dsn", fresh_db)
    assert listed.returncode == 0, listed.stderr
    [row] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert row["alert_id"] == "ob-1" and row["status"] == "failed" and row["attempts"] == 1
    retried = alertd("outbox", "retry", row["webhook_id"], "--dsn", fresh_db)
    assert retried.returncode == 0 and "1 webhook" in retried.stdout, retried.stderr
    again = {r["alert_id"]: r for r in outbox(fresh_db)}
    assert again["ob-1"]["status"] == "pending"
    assert again["ob-0"]["status"] == "delivered"


async def test_db_prune_counts_asks_then_deletes_old_settled_alerts(fresh_db: str) -> None:
    pool = await open_pool(fresh_db, 1)
    store = PostgresStore(pool)
    now = dt.datetime.now(dt.UTC)
    for i, days in enumerate((40, 40, 10)):
        alert = Alert(alert_id=f"pr-{i}", video_url="http://x/v")
        when = now - dt.timedelta(days=days)
        assert await store.record_outcome(Outcome.done(alert, {"duration_s": 1.0}, attempts=1,
                                                       received_at=when, processed_at=when),
                                          None)
    await pool.close()

    counted = alertd("db", "prune", "--older-than", "30", "--dry-run", "--dsn", fresh_db)
    assert counted.returncode == 0 and counted.stdout.strip() == "2 alerts would be deleted"
    refused = alertd("db", "prune", "--older-than", "30", "--dsn", fresh_db, stdin="n\n")
    assert refused.returncode != 0
    too_soon = alertd("db", "prune", "--older-than", "0.5", "--yes", "--dsn", fresh_db)
    assert too_soon.returncode == 2, too_soon.stderr  # at least a day
    done = alertd("db", "prune", "--older-than", "30", "--yes", "--dsn", fresh_db)
    assert done.returncode == 0 and done.stdout.strip() == "2 alerts were deleted", done.stderr
    again = alertd("db", "prune", "--older-than", "30", "--dry-run", "--dsn", fresh_db)
    assert again.stdout.strip() == "0 alerts would be deleted"
