"""PostgresStore and migrations against the real server: contract, concurrency, faults."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from alertd import outbox as outbox_module
from alertd.adapters import postgres, schema
from alertd.adapters.postgres import (
    SCHEMA_VERSION,
    Pool,
    PostgresStore,
    migrate,
    open_pool,
    schema_version,
)
from alertd.adapters.schema import MIGRATIONS
from alertd.domain import Alert, Failure, Outcome, WebhookEvent, webhook_event, webhook_receiver
from alertd.errors import AlertdError, ConfigError, ErrorCode, StoreUnavailable
from alertd.outbox import OutboxDispatcher
from alertd.ports import AttemptRecord, DeliveryResult, PendingDelivery
from alertd.stats import ChildStats
from tests.fakes import VIDEO_METADATA, RecordingSender
from tests.ports import free_port

pytestmark = pytest.mark.integration

RECEIVED = dt.datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=dt.UTC)
PROCESSED = RECEIVED + dt.timedelta(seconds=7)
OCCURRED = RECEIVED - dt.timedelta(minutes=1)
HOOK = "https://hooks.test/alerts"
APP = "alertd-test-store"


def make_outcome(*, failed: bool = False, webhook_url: str | None = HOOK) -> Outcome:
    alert = Alert(
        alert_id=f"alert-{uuid.uuid4().hex}", video_url="https://clips.test/a.mp4",
        webhook_url=webhook_url, occurred_at=OCCURRED, source="camera-7",
        attributes={"site": "north"},
    )
    if failed:
        failure = Failure(ErrorCode.NOT_A_VIDEO, "no video stream")
        return Outcome.failed(alert, failure, attempts=1, received_at=RECEIVED,
                              processed_at=PROCESSED)
    return Outcome.done(alert, dict(VIDEO_METADATA), attempts=2, received_at=RECEIVED,
                        processed_at=PROCESSED)


def event_for(outcome: Outcome) -> WebhookEvent:
    event = webhook_event(outcome, default_url=None)
    assert event is not None
    return event


async def queue_webhooks(store: PostgresStore, count: int) -> list[str]:
    alert_ids = []
    for _ in range(count):
        outcome = make_outcome()
        assert await store.record_outcome(outcome, event_for(outcome))
        alert_ids.append(outcome.alert.alert_id)
    return alert_ids


async def claim_one(store: PostgresStore) -> PendingDelivery:
    claimed = await store.claim_due(10, lease_s=60)
    assert len(claimed) == 1
    return claimed[0]


async def fetch(dsn: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


@pytest.fixture()
async def pool(fresh_db: str) -> AsyncIterator[Pool]:
    pool = await open_pool(fresh_db, 4, application_name=APP)
    await pool.wait(timeout=10)
    yield pool
    await pool.close()


@pytest.fixture()
def store(pool: Pool) -> PostgresStore:
    return PostgresStore(pool)


@pytest.fixture()
def unmigrated_db(pg_dsn: str) -> Iterator[str]:
    name = f"alertd_test_raw_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(pg_dsn, dbname=name)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))


# --- migrations ---------------------------------------------------------------------------


def test_migrate_twice_is_a_no_op_that_returns_the_same_version(pg_dsn: str) -> None:
    assert migrate(pg_dsn) == SCHEMA_VERSION
    assert migrate(pg_dsn) == SCHEMA_VERSION
    with psycopg.connect(pg_dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in MIGRATIONS]


def test_concurrent_migrates_of_a_new_database_apply_each_step_once(unmigrated_db: str) -> None:
    with ThreadPoolExecutor(max_workers=4) as workers:
        results = list(workers.map(migrate, [unmigrated_db] * 4))
    assert results == [SCHEMA_VERSION] * 4
    assert schema_version(unmigrated_db) == SCHEMA_VERSION
    with psycopg.connect(unmigrated_db) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert count == (len(MIGRATIONS),)


def test_a_never_migrated_database_is_at_schema_version_zero(unmigrated_db: str) -> None:
    assert schema_version(unmigrated_db) == 0


def test_migrate_of_an_unreachable_database_raises_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        migrate(f"postgresql://postgres@127.0.0.1:{free_port()}/alertd")


async def test_check_schema_accepts_a_database_at_this_version(store: PostgresStore) -> None:
    await store.check_schema()


async def test_check_schema_says_which_versions_differ_and_what_to_run(
    store: PostgresStore, fresh_db: str,
) -> None:
    await fetch(fresh_db, "DELETE FROM schema_migrations WHERE version = %s", (SCHEMA_VERSION,))
    with pytest.raises(ConfigError) as info:
        await store.check_schema()
    assert str(info.value) == (
        f"dsn: database schema is at version {SCHEMA_VERSION - 1}, expected {SCHEMA_VERSION}:"
        " run 'alertd db migrate'"
    )


async def test_a_missing_table_is_a_loud_programming_error_not_store_unavailable(
    unmigrated_db: str,
) -> None:
    pool = await open_pool(unmigrated_db, 1)
    try:
        with pytest.raises(psycopg.errors.UndefinedTable):
            await PostgresStore(pool).recorded_fingerprint("a-1")
    finally:
        await pool.close()


# --- record_outcome -----------------------------------------------------------------------


async def test_record_outcome_commits_the_alert_and_one_pending_outbox_row(
    store: PostgresStore, fresh_db: str,
) -> None:
    outcome = make_outcome()
    event = event_for(outcome)
    assert await store.record_outcome(outcome, event) is True
    assert await store.recorded_fingerprint(outcome.alert.alert_id) == outcome.alert.fingerprint
    rows = await fetch(fresh_db, """
        SELECT webhook_id, event_type, url, payload, body, status, attempts,
               next_attempt_at <= now(), delivered_at
        FROM webhook_outbox WHERE alert_id = %s""", (outcome.alert.alert_id,))
    assert len(rows) == 1
    webhook_id, event_type, url, payload, body, status, attempts, due, delivered_at = rows[0]
    assert webhook_id.startswith("msg_") and len(webhook_id) == 36
    assert (event_type, url, status, attempts, due, delivered_at) == (
        "alert.processed", HOOK, "pending", 0, True, None)
    assert payload == event.payload
    assert bytes(body) == orjson.dumps(event.payload)


async def test_a_duplicate_alert_id_returns_false_and_leaves_one_row_and_one_webhook(
    store: PostgresStore, fresh_db: str,
) -> None:
    first = make_outcome()
    again = Outcome.failed(first.alert, Failure(ErrorCode.PROBE_CRASHED, "boom"), attempts=3,
                           received_at=RECEIVED, processed_at=PROCESSED)
    assert await store.record_outcome(first, event_for(first)) is True
    assert await store.record_outcome(again, event_for(again)) is False
    alert_id = first.alert.alert_id
    assert await fetch(fresh_db, "SELECT status, attempts FROM alerts WHERE alert_id = %s",
                       (alert_id,)) == [("done", 2)]
    assert await fetch(fresh_db, "SELECT count(*) FROM webhook_outbox WHERE alert_id = %s",
                       (alert_id,)) == [(1,)]


async def test_the_same_outcome_recorded_again_after_a_lost_commit_reply_is_true(
    store: PostgresStore, fresh_db: str,
) -> None:
    """The service records it again when the COMMIT's reply was lost: that is this
    delivery's commit, not another delivery's, which ended at another moment."""
    outcome = make_outcome()
    assert await store.record_outcome(outcome, event_for(outcome)) is True
    assert await store.record_outcome(outcome, event_for(outcome)) is True
    other = dataclasses.replace(outcome, processed_at=PROCESSED + dt.timedelta(microseconds=1))
    assert await store.record_outcome(other, event_for(other)) is False
    assert await fetch(fresh_db, "SELECT count(*) FROM webhook_outbox") == [(1,)]


async def test_an_outcome_without_a_webhook_event_queues_nothing(
    store: PostgresStore, fresh_db: str,
) -> None:
    outcome = make_outcome(webhook_url=None)
    assert await store.record_outcome(outcome, None) is True
    assert await store.recorded_fingerprint(outcome.alert.alert_id) is not None
    assert await fetch(fresh_db, "SELECT count(*) FROM webhook_outbox") == [(0,)]


ALERT_COLUMNS = """
    SELECT status, metadata, error, metadata IS NULL, error IS NULL, attempts, received_at,
           processed_at, source, occurred_at, video_url
    FROM alerts WHERE alert_id = %s"""


async def test_a_done_row_has_metadata_and_a_sql_null_error(
    store: PostgresStore, fresh_db: str,
) -> None:
    outcome = make_outcome()
    await store.record_outcome(outcome, event_for(outcome))
    [row] = await fetch(fresh_db, ALERT_COLUMNS, (outcome.alert.alert_id,))
    assert row == ("done", VIDEO_METADATA, None, False, True, 2, RECEIVED, PROCESSED,
                   "camera-7", OCCURRED, "https://clips.test/a.mp4")


async def test_a_failed_row_has_code_and_message_and_a_sql_null_metadata(
    store: PostgresStore, fresh_db: str,
) -> None:
    outcome = make_outcome(failed=True)
    await store.record_outcome(outcome, event_for(outcome))
    [row] = await fetch(fresh_db, ALERT_COLUMNS, (outcome.alert.alert_id,))
    assert row == ("failed", None, {"code": "not_a_video", "message": "no video stream"},
                   True, False, 1, RECEIVED, PROCESSED, "camera-7", OCCURRED,
                   "https://clips.test/a.mp4")
    [(event_type,)] = await fetch(fresh_db, "SELECT event_type FROM webhook_outbox")
    assert event_type == "alert.failed"


# --- claim_due ----------------------------------------------------------------------------


async def test_claim_due_hands_out_the_exact_stored_body_and_attempt_count(
    store: PostgresStore,
) -> None:
    outcome = make_outcome()
    event = event_for(outcome)
    await store.record_outcome(outcome, event)
    delivery = await claim_one(store)
    assert delivery.alert_id == outcome.alert.alert_id
    assert delivery.body == orjson.dumps(event.payload)
    assert (delivery.url, delivery.attempts) == (HOOK, 0)


async def test_concurrent_claimers_never_get_the_same_row(store: PostgresStore) -> None:
    await queue_webhooks(store, 40)

    async def claim_until_empty() -> list[int]:
        mine: list[int] = []
        while batch := await store.claim_due(3, lease_s=60):
            mine.extend(d.delivery_id for d in batch)
        return mine

    claims = await asyncio.gather(*(claim_until_empty() for _ in range(4)))
    everything = [i for claimed in claims for i in claimed]
    assert len(everything) == len(set(everything)) == 40
    assert sum(1 for claimed in claims if claimed) > 1, "claims did not overlap in time"


async def test_a_claimed_row_is_reclaimed_only_after_its_lease_expires(
    store: PostgresStore,
) -> None:
    await queue_webhooks(store, 1)
    first = await store.claim_due(10, lease_s=1.0)
    assert len(first) == 1
    assert await store.claim_due(10, lease_s=1.0) == []
    await asyncio.sleep(1.2)
    assert await store.claim_due(10, lease_s=1.0) == first


URLS = ["http://Dead.Test:8080/a?x=1", "https://user:pw@dead.test:8080/b", "http://dead.test/c",
        "http://ok.test/d", "http://[::1]:81/e", "https://OK.test#f", " https://ok.test/g ",
        "http://a@b@Dead.Test:8080/h"]  # the host follows the last @ of the authority


async def test_claims_can_skip_or_take_only_the_rows_of_given_receivers(
    store: PostgresStore,
) -> None:
    """The SQL receiver of a URL is alertd.domain.webhook_receiver's, case and userinfo aside."""
    for url in URLS:
        outcome = make_outcome(webhook_url=url)
        assert await store.record_outcome(outcome, event_for(outcome))
    assert {webhook_receiver(u) for u in URLS} == {"dead.test:8080", "dead.test", "ok.test",
                                                   "[::1]:81"}
    only = await store.claim_due(10, 60, only_receivers=["dead.test:8080", "[::1]:81"])
    assert sorted(d.url for d in only) == sorted(URLS[i] for i in (0, 1, 4, 7))
    assert await store.claim_due(10, 60, only_receivers=[]) == []
    rest = await store.claim_due(10, 60, skip_receivers=["ok.test"])
    assert [d.url for d in rest] == [URLS[2]]
    assert sorted(d.url for d in await store.claim_due(10, 60)) == sorted(URLS[i]
                                                                          for i in (3, 5, 6))


async def test_a_row_whose_url_names_no_receiver_is_still_claimed_while_others_are_skipped(
    store: PostgresStore,
) -> None:
    # NULL <> ALL(...) is NULL: such a row would leave every claim that skips someone.
    outcome = make_outcome(webhook_url="not a url at all")
    assert await store.record_outcome(outcome, event_for(outcome))
    [row] = await store.claim_due(10, 60, skip_receivers=["dead.test"])
    assert row.url == "not a url at all"


# --- record_attempts ----------------------------------------------------------------------


OUTBOX_STATE = """
    SELECT status, attempts, last_error, last_status_code, delivered_at IS NOT NULL
    FROM webhook_outbox WHERE id = %s"""
ATTEMPTS = """
    SELECT attempt, status_code, error, duration_ms FROM webhook_attempts
    WHERE outbox_id = %s ORDER BY id"""


# The attempt's time is the transaction's now(), as is the next attempt's base.
NEXT_AFTER_ATTEMPT = """
    SELECT o.next_attempt_at - a.attempted_at
    FROM webhook_outbox AS o JOIN webhook_attempts AS a ON a.outbox_id = o.id"""


async def test_a_2xx_attempt_marks_the_row_delivered_and_logs_the_attempt(
    store: PostgresStore, fresh_db: str,
) -> None:
    await queue_webhooks(store, 1)
    delivery = await claim_one(store)
    result = DeliveryResult(ok=True, status_code=204, duration_s=0.0421)
    await store.record_attempts([AttemptRecord(delivery, result, None)])
    assert await fetch(fresh_db, OUTBOX_STATE, (delivery.delivery_id,)) == [
        ("delivered", 1, None, 204, True)]
    assert await fetch(fresh_db, ATTEMPTS, (delivery.delivery_id,)) == [(1, 204, None, 42)]


async def test_a_410_attempt_ends_the_row_as_gone(store: PostgresStore, fresh_db: str) -> None:
    await queue_webhooks(store, 1)
    delivery = await claim_one(store)
    result = DeliveryResult(ok=False, status_code=410, error="HTTP 410", gone=True)
    await store.record_attempts([AttemptRecord(delivery, result, 300.0)])
    assert await fetch(fresh_db, OUTBOX_STATE, (delivery.delivery_id,)) == [
        ("gone", 1, "HTTP 410", 410, False)]


async def test_a_failed_attempt_without_a_next_time_ends_the_row_as_failed(
    store: PostgresStore, fresh_db: str,
) -> None:
    await queue_webhooks(store, 1)
    delivery = await claim_one(store)
    result = DeliveryResult(ok=False, status_code=503, error="HTTP 503", duration_s=1.5)
    await store.record_attempts([AttemptRecord(delivery, result, None)])
    assert await fetch(fresh_db, OUTBOX_STATE, (delivery.delivery_id,)) == [
        ("failed", 1, "HTTP 503", 503, False)]
    assert await fetch(fresh_db, ATTEMPTS, (delivery.delivery_id,)) == [(1, 503, "HTTP 503", 1500)]


async def test_a_permanent_failure_ends_the_row_even_when_a_next_time_is_given(
    store: PostgresStore, fresh_db: str,
) -> None:
    await queue_webhooks(store, 1)
    delivery = await claim_one(store)
    result = DeliveryResult(ok=False, error="forbidden_address", permanent=True)
    await store.record_attempts([AttemptRecord(delivery, result, 0.0)])
    assert await fetch(fresh_db, OUTBOX_STATE, (delivery.delivery_id,)) == [
        ("failed", 1, "forbidden_address", None, False)]


async def test_a_failed_attempt_with_a_next_time_stays_pending_until_then(
    store: PostgresStore, fresh_db: str,
) -> None:
    await queue_webhooks(store, 1)
    delivery = await claim_one(store)
    result = DeliveryResult(ok=False, status_code=500, error="HTTP 500")
    await store.record_attempts([AttemptRecord(delivery, result, 1.0)])
    assert await fetch(fresh_db, OUTBOX_STATE, (delivery.delivery_id,)) == [
        ("pending", 1, "HTTP 500", 500, False)]
    assert await fetch(fresh_db, NEXT_AFTER_ATTEMPT) == [(dt.timedelta(seconds=1),)]
    assert await store.claim_due(10, lease_s=60) == []
    await asyncio.sleep(1.2)
    retried = await claim_one(store)
    assert (retried.webhook_id, retried.body, retried.attempts) == (
        delivery.webhook_id, delivery.body, 1)
    await store.record_attempts([
        AttemptRecord(retried, DeliveryResult(ok=True, status_code=200), None)])
    assert [r[0] for r in await fetch(fresh_db, ATTEMPTS, (delivery.delivery_id,))] == [1, 2]


async def test_a_late_attempt_after_the_row_ended_is_logged_without_reopening_it(
    store: PostgresStore, fresh_db: str,
) -> None:
    await queue_webhooks(store, 1)
    stale = await claim_one(store)
    await store.record_attempts([
        AttemptRecord(stale, DeliveryResult(ok=True, status_code=200), None)])
    await store.record_attempts([
        AttemptRecord(stale, DeliveryResult(ok=False, status_code=500), 60.0)])
    assert await fetch(fresh_db, OUTBOX_STATE, (stale.delivery_id,)) == [
        ("delivered", 1, None, 200, True)]
    assert len(await fetch(fresh_db, ATTEMPTS, (stale.delivery_id,))) == 2


@pytest.mark.parametrize("late_end", [
    DeliveryResult(ok=False, status_code=500, error="HTTP 500"),
    DeliveryResult(ok=False, status_code=410, error="HTTP 410", gone=True),
], ids=["failed", "gone"])
async def test_a_delivery_recorded_after_a_late_final_failure_ends_the_row_delivered(
    store: PostgresStore, fresh_db: str, late_end: DeliveryResult,
) -> None:
    """Dispatcher A's lease runs out mid-delivery and B takes the row over; A's
    final failure is written first, B's 200 second. The webhook was delivered:
    listed as failed, `outbox retry --all` would have sent it again."""
    await queue_webhooks(store, 1)
    first = (await store.claim_due(10, lease_s=0))[0]  # A's lease, already run out
    second = await claim_one(store)  # B
    assert second.delivery_id == first.delivery_id
    await store.record_attempts([AttemptRecord(first, late_end, None)])
    await store.record_attempts([
        AttemptRecord(second, DeliveryResult(ok=True, status_code=200), None)])
    assert await fetch(fresh_db, OUTBOX_STATE, (first.delivery_id,)) == [
        ("delivered", 2, None, 200, True)]
    assert [r[:2] for r in await fetch(fresh_db, ATTEMPTS, (first.delivery_id,))] == [
        (1, late_end.status_code), (2, 200)]
    assert await store.list_undelivered() == []
    assert await store.retry_all_now() == 0


async def test_a_batch_of_attempts_is_recorded_in_one_call_each_row_as_if_alone(
    store: PostgresStore, fresh_db: str,
) -> None:
    await queue_webhooks(store, 4)
    ok, retry, gone, late = await store.claim_due(10, lease_s=60)
    await store.record_attempts([
        AttemptRecord(late, DeliveryResult(ok=True, status_code=200), None)])
    soon = 60.0
    await store.record_attempts([
        AttemptRecord(ok, DeliveryResult(ok=True, status_code=204, duration_s=0.01), None),
        AttemptRecord(retry, DeliveryResult(ok=False, status_code=500, error="HTTP 500"), soon),
        AttemptRecord(gone, DeliveryResult(ok=False, status_code=410, gone=True), soon),
        AttemptRecord(late, DeliveryResult(ok=False, error="refused"), soon),
        # The same row twice in one batch: both attempts counted and numbered.
        AttemptRecord(retry, DeliveryResult(ok=False, status_code=502), soon),
    ])
    states = {d.delivery_id: (await fetch(fresh_db, OUTBOX_STATE, (d.delivery_id,)))[0]
              for d in (ok, retry, gone, late)}
    assert states == {
        ok.delivery_id: ("delivered", 1, None, 204, True),
        retry.delivery_id: ("pending", 2, None, 502, False),
        gone.delivery_id: ("gone", 1, None, 410, False),
        late.delivery_id: ("delivered", 1, None, 200, True),  # ended before: kept
    }
    numbers = {d.delivery_id: [r[0] for r in await fetch(fresh_db, ATTEMPTS, (d.delivery_id,))]
               for d in (ok, retry, gone, late)}
    # The late attempt keeps the number its claim gave it (its row had 0).
    assert numbers == {ok.delivery_id: [1], retry.delivery_id: [1, 2],
                       gone.delivery_id: [1], late.delivery_id: [1, 1]}


async def test_an_empty_batch_of_attempts_touches_nothing(
    store: PostgresStore, fresh_db: str,
) -> None:
    await queue_webhooks(store, 1)
    await store.record_attempts([])
    assert await fetch(fresh_db, "SELECT count(*) FROM webhook_attempts") == [(0,)]
    assert await fetch(fresh_db, "SELECT status, attempts FROM webhook_outbox") == [
        ("pending", 0)]


# --- operator queries ---------------------------------------------------------------------


async def end_one(store: PostgresStore, result: DeliveryResult) -> PendingDelivery:
    delivery = await claim_one(store)
    await store.record_attempts([AttemptRecord(delivery, result, None)])
    return delivery


async def test_list_undelivered_shows_pending_failed_and_gone_but_not_delivered(
    store: PostgresStore,
) -> None:
    await queue_webhooks(store, 1)
    delivered = await end_one(store, DeliveryResult(ok=True, status_code=200))
    await queue_webhooks(store, 1)
    failed = await end_one(store, DeliveryResult(ok=False, status_code=500, error="HTTP 500"))
    await queue_webhooks(store, 1)
    gone = await end_one(store, DeliveryResult(ok=False, status_code=410, gone=True))
    await queue_webhooks(store, 1)
    listed = await store.list_undelivered()
    assert [w.status for w in listed] == ["failed", "gone", "pending"]
    assert delivered.webhook_id not in {w.webhook_id for w in listed}
    assert (listed[0].webhook_id, listed[0].last_error, listed[0].last_status_code) == (
        failed.webhook_id, "HTTP 500", 500)
    assert listed[1].webhook_id == gone.webhook_id
    assert len(await store.list_undelivered(limit=1)) == 1


async def test_retry_now_makes_a_failed_webhook_due_again_with_its_history(
    store: PostgresStore,
) -> None:
    await queue_webhooks(store, 1)
    failed = await end_one(store, DeliveryResult(ok=False, status_code=500))
    assert await store.claim_due(10, lease_s=60) == []
    assert await store.retry_now([failed.webhook_id, "msg_unknown"]) == 1
    again = await claim_one(store)
    assert (again.delivery_id, again.attempts) == (failed.delivery_id, 1)


async def test_retry_all_now_requeues_failed_webhooks_but_leaves_gone_ones(
    store: PostgresStore,
) -> None:
    await queue_webhooks(store, 1)
    failed = await end_one(store, DeliveryResult(ok=False, status_code=500))
    await queue_webhooks(store, 1)
    await end_one(store, DeliveryResult(ok=False, status_code=410, gone=True))
    assert await store.retry_all_now() == 1
    assert (await claim_one(store)).delivery_id == failed.delivery_id


# --- db prune -----------------------------------------------------------------------------

async def age(dsn: str, alert_ids: list[str], interval: str) -> None:
    await fetch(dsn, "UPDATE alerts SET processed_at = now() - %s::interval "
                     "WHERE alert_id = ANY(%s)", (interval, alert_ids))


async def test_prune_deletes_old_settled_alerts_with_their_webhooks_and_keeps_the_rest(
    store: PostgresStore, fresh_db: str,
) -> None:
    settled = []
    for result in (DeliveryResult(ok=True, status_code=200),
                   DeliveryResult(ok=False, status_code=500, error="HTTP 500"),
                   DeliveryResult(ok=False, status_code=410, gone=True)):
        settled += await queue_webhooks(store, 1)
        await end_one(store, result)
    no_webhook = make_outcome(webhook_url=None)
    assert await store.record_outcome(no_webhook, None)
    settled.append(no_webhook.alert.alert_id)
    recent = await queue_webhooks(store, 1)
    await end_one(store, DeliveryResult(ok=True, status_code=200))
    pending = await queue_webhooks(store, 1)  # old, but its webhook is still to be sent
    await age(fresh_db, [*settled, *pending], "40 days")
    await age(fresh_db, recent, "29 days")

    assert await store.prune(30 * 86400, dry_run=True) == 4
    assert len(await fetch(fresh_db, "SELECT 1 FROM alerts")) == 6  # a count only
    assert await store.prune(30 * 86400, batch=3) == 4  # two batches: 3, then 1
    assert await store.prune(30 * 86400) == 0

    left = await fetch(fresh_db, "SELECT alert_id FROM alerts")
    assert sorted(row[0] for row in left) == sorted([*recent, *pending])
    rows = await fetch(fresh_db, "SELECT alert_id, status FROM webhook_outbox")
    assert sorted(rows) == sorted([(recent[0], "delivered"), (pending[0], "pending")])
    attempts = await fetch(fresh_db, "SELECT o.alert_id FROM webhook_attempts a "
                                     "JOIN webhook_outbox o ON o.id = a.outbox_id")
    assert attempts == [(recent[0],)]
    # The pending one is sent as usual, and goes at the next prune once settled.
    await end_one(store, DeliveryResult(ok=True, status_code=200))
    assert await store.prune(30 * 86400) == 1


async def test_prune_keeps_a_webhook_an_operator_made_pending_again_meanwhile(
    store: PostgresStore, fresh_db: str,
) -> None:
    [alert_id] = await queue_webhooks(store, 1)
    failed = await end_one(store, DeliveryResult(ok=False, status_code=500))
    await age(fresh_db, [alert_id], "40 days")
    async with await psycopg.AsyncConnection.connect(fresh_db) as retrying:
        # `outbox retry` has updated the row but not committed when prune runs.
        await retrying.execute("UPDATE webhook_outbox SET status = 'pending' "
                               "WHERE webhook_id = %s", (failed.webhook_id,))
        pruning = asyncio.create_task(store.prune(30 * 86400))
        await asyncio.sleep(0.5)
        assert not pruning.done()  # waiting for the retry's row lock
        await retrying.commit()
        # Its batch rolls back (the alert's delete fails on the kept row) and
        # the next batch leaves the alert out: nothing is deleted, nothing lost.
        assert await pruning == 0
    rows = await fetch(fresh_db, "SELECT status FROM webhook_outbox")
    assert rows == [("pending",)]
    assert len(await fetch(fresh_db, "SELECT 1 FROM alerts")) == 1


async def test_prune_gives_up_in_one_error_when_every_batch_rolls_back(
    store: PostgresStore, fresh_db: str,
) -> None:
    # Not a racing retry but a table of the operator's referencing alerts:
    # redoing the batch would never end.
    [alert_id] = await queue_webhooks(store, 1)
    await end_one(store, DeliveryResult(ok=True, status_code=200))
    await age(fresh_db, [alert_id], "40 days")
    await fetch(fresh_db, "CREATE TABLE notes (alert_id text REFERENCES alerts)")
    await fetch(fresh_db, "INSERT INTO notes VALUES (%s)", (alert_id,))

    with pytest.raises(AlertdError, match="batches in a row rolled back on a foreign key"):
        await store.prune(30 * 86400)
    assert len(await fetch(fresh_db, "SELECT 1 FROM webhook_outbox")) == 1  # all kept


# --- lock order ---------------------------------------------------------------------------

LOCK_WAITERS = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = %s AND wait_event_type = 'Lock'
"""


async def locked_while_it_waits(
    fresh_db: str, rows: list[PendingDelivery], call: Callable[[], Awaitable[object]],
) -> list[int]:
    """Hold the middle one of three rows, start ``call`` and, once it waits for that row,
    return which of the other two it has locked already."""
    low, mid, high = rows
    async with await psycopg.AsyncConnection.connect(fresh_db) as holder:
        await holder.execute("SELECT 1 FROM webhook_outbox WHERE id = %s FOR UPDATE",
                             (mid.delivery_id,))
        task = asyncio.create_task(call())
        for _ in range(1000):
            if (await fetch(fresh_db, LOCK_WAITERS, (APP,)))[0][0] or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done(), "it did not wait for the held row"
        cur = await holder.execute(
            "SELECT id FROM webhook_outbox WHERE id = ANY(%s) ORDER BY id FOR UPDATE SKIP LOCKED",
            ([low.delivery_id, high.delivery_id],))
        free = {row[0] for row in await cur.fetchall()}
        await holder.rollback()  # lets it go on
    await task
    return [d.delivery_id for d in (low, high) if d.delivery_id not in free]


@pytest.fixture()
async def big_table_store(fresh_db: str) -> AsyncIterator[PostgresStore]:
    """A store whose planner fetches outbox rows by index, as on a big table.

    On a few rows it scans the table, which happens to lock them in id order
    whatever the statement asks; by index, rows come in the batch's order.
    """
    name = sql.Identifier(conninfo_to_dict(fresh_db)["dbname"])
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn:
        for setting in ("enable_seqscan", "enable_hashjoin", "enable_mergejoin"):
            await conn.execute(sql.SQL("ALTER DATABASE {} SET {} = off").format(
                name, sql.Identifier(setting)))
    pool = await open_pool(fresh_db, 2, application_name=APP)
    await pool.wait(timeout=10)
    yield PostgresStore(pool)
    await pool.close()


async def test_a_batch_of_attempts_locks_its_rows_in_id_order(
    big_table_store: PostgresStore, fresh_db: str,
) -> None:
    """Two batches sharing rows (a lease ran out) wait for each other instead of
    deadlocking, which aborted one and sent its webhooks again: rows are locked in id
    order, whatever the batch's order. Here, given highest first, it waits for the
    middle row holding only the lowest."""
    store = big_table_store
    await queue_webhooks(store, 3)
    rows = list(await store.claim_due(10, lease_s=60))
    # Leases ending in the reverse order of the ids, so that a plan walking the
    # due index (next_attempt_at) meets the rows highest id first.
    await fetch(fresh_db, "UPDATE webhook_outbox SET next_attempt_at = "
                          "now() + make_interval(secs => 1000 - id)")
    ok = DeliveryResult(ok=True, status_code=200)
    held = await locked_while_it_waits(fresh_db, rows, lambda: store.record_attempts(
        [AttemptRecord(d, ok, None) for d in reversed(rows)]))
    assert held == [rows[0].delivery_id]
    assert await fetch(fresh_db, "SELECT status, count(*) FROM webhook_outbox GROUP BY 1") == [
        ("delivered", 3)]


async def test_retry_now_locks_its_rows_in_id_order(
    big_table_store: PostgresStore, fresh_db: str,
) -> None:
    store = big_table_store
    rows = []
    for _ in range(3):
        await queue_webhooks(store, 1)
        rows.append(await end_one(store, DeliveryResult(ok=False, status_code=500)))
    held = await locked_while_it_waits(fresh_db, rows, lambda: store.retry_now(
        [d.webhook_id for d in reversed(rows)]))
    assert held == [rows[0].delivery_id]
    assert await fetch(fresh_db, "SELECT status, count(*) FROM webhook_outbox GROUP BY 1") == [
        ("pending", 3)]


# --- faults -------------------------------------------------------------------------------


async def test_an_unreachable_database_raises_store_unavailable_from_every_call() -> None:
    pool = await open_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/alertd", 1,
                           checkout_timeout=0.3)
    store = PostgresStore(pool)
    outcome = make_outcome()
    delivery = PendingDelivery(1, "msg_x", "a", HOOK, b"{}", 0)
    try:
        calls = [
            store.recorded_fingerprint("a"),
            store.record_outcome(outcome, event_for(outcome)),
            store.claim_due(1, 30),
            store.record_attempts([AttemptRecord(delivery, DeliveryResult(ok=True), None)]),
            store.list_undelivered(),
            store.check_schema(),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert info.value.__cause__ is None and info.value.__suppress_context__
    finally:
        await pool.close()


async def pipe_to(host: str, port: int, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    up_reader, up_writer = await asyncio.open_connection(host, port)

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer),
                         return_exceptions=True)


async def test_a_pool_opened_while_the_database_is_down_serves_once_it_is_back(
    fresh_db: str,
) -> None:
    real = conninfo_to_dict(fresh_db)
    port = free_port()
    pool = await open_pool(make_conninfo(fresh_db, host="127.0.0.1", port=port), 1,
                           checkout_timeout=0.5, reconnect_timeout=2.0)
    store = PostgresStore(pool)
    try:
        with pytest.raises(StoreUnavailable):
            await store.recorded_fingerprint("a")
        server = await asyncio.start_server(
            lambda r, w: pipe_to(str(real["host"]), int(real.get("port") or 5432), r, w),
            "127.0.0.1", port)
        async with server:
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                try:
                    assert await store.recorded_fingerprint("a") is None
                    break
                except StoreUnavailable:
                    assert asyncio.get_running_loop().time() < deadline, "pool never reconnected"
                    await asyncio.sleep(0.2)
            await pool.close()  # before the proxy goes, so its sessions end cleanly
    finally:
        await pool.close()


TERMINATE_POOL = """
    SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = %s"""


async def test_terminated_idle_backends_are_replaced_before_the_next_call(
    store: PostgresStore, fresh_db: str,
) -> None:
    assert await fetch(fresh_db, TERMINATE_POOL, (APP,)) == [(4,)]
    outcome = make_outcome()
    # The pool's checkout check finds the dead connections and reconnects, so
    # the call succeeds rather than surfacing StoreUnavailable.
    assert await store.record_outcome(outcome, event_for(outcome)) is True
    assert await store.recorded_fingerprint(outcome.alert.alert_id) == outcome.alert.fingerprint


async def test_a_healthy_connection_is_checked_out_without_a_round_trip(fresh_db: str) -> None:
    app = f"alertd-test-quiet-{uuid.uuid4().hex[:8]}"
    pool = await open_pool(fresh_db, 1, application_name=app)
    try:
        await pool.wait()
        async with pool.connection() as conn:
            await conn.execute("SELECT 'marker'")
        for _ in range(3):
            async with pool.connection():
                pass
        # pg_stat_activity shows a backend's last statement: still ours, so
        # the three checkouts sent nothing (a checking query would show).
        assert await fetch(fresh_db, "SELECT query FROM pg_stat_activity "
                           "WHERE application_name = %s", (app,)) == [("SELECT 'marker'",)]
    finally:
        await pool.close()


async def test_a_connection_that_fails_in_use_gets_the_idle_ones_checked_at_once(
    store: PostgresStore, pool: Pool, fresh_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The checkout check cannot see an idle connection that died silently
    # (a failover); one that failed in use is the hint, and the idle ones
    # are checked then rather than one failed query each.
    checks: list[float] = []
    real_check = pool.check

    async def spy() -> None:
        checks.append(asyncio.get_running_loop().time())
        await real_check()
    monkeypatch.setattr(pool, "check", spy)

    async def long_query() -> None:
        async with store._connection() as conn:
            await conn.execute("SELECT pg_sleep(30)")
    task = asyncio.create_task(long_query())
    sleeping: list[tuple[Any, ...]] = []
    for _ in range(100):
        sleeping = await fetch(fresh_db, """
            SELECT pid FROM pg_stat_activity WHERE application_name = %s
            AND query LIKE 'SELECT pg_sleep%%'""", (APP,))
        if sleeping:
            break
        await asyncio.sleep(0.05)
    await fetch(fresh_db, "SELECT pg_terminate_backend(%s, 5000)", sleeping[0])
    with pytest.raises(StoreUnavailable):
        await task
    for _ in range(50):
        if checks:
            break
        await asyncio.sleep(0.02)
    assert len(checks) == 1
    assert await store.recorded_fingerprint("x") is None  # the store works on


async def test_a_backend_terminated_mid_transaction_raises_store_unavailable_and_commits_nothing(
    store: PostgresStore, fresh_db: str,
) -> None:
    outcome = make_outcome()
    async with await psycopg.AsyncConnection.connect(fresh_db) as locker:
        # The alert row is inserted, then the outbox insert waits on this lock:
        # the transaction is caught midway.
        await locker.execute("LOCK TABLE webhook_outbox IN ACCESS EXCLUSIVE MODE")
        task = asyncio.create_task(store.record_outcome(outcome, event_for(outcome)))
        waiting: list[tuple[Any, ...]] = []
        for _ in range(100):
            waiting = await fetch(fresh_db, """
                SELECT pid FROM pg_stat_activity WHERE datname = current_database()
                AND application_name = %s AND wait_event_type = 'Lock'""", (APP,))
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert len(waiting) == 1, "record_outcome never reached the outbox insert"
        await fetch(fresh_db, "SELECT pg_terminate_backend(%s, 5000)", waiting[0])
        with pytest.raises(StoreUnavailable):
            await task
        await locker.rollback()
    assert await store.recorded_fingerprint(outcome.alert.alert_id) is None
    assert await store.record_outcome(outcome, event_for(outcome)) is True
    assert await fetch(fresh_db, "SELECT count(*) FROM webhook_outbox") == [(1,)]


async def set_read_only(dsn: str, on: bool) -> None:
    """Make the database refuse writes on its new connections (as a standby, or a
    managed database whose disk is full, does), or take them again."""
    name = sql.Identifier(conninfo_to_dict(dsn)["dbname"])
    setting = sql.SQL("on" if on else "off")
    writable = make_conninfo(dsn, options="-c default_transaction_read_only=off")
    await fetch(writable, sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = {}")
                .format(name, setting))


async def test_a_read_only_database_is_unavailable_until_it_takes_writes_again(
    fresh_db: str,
) -> None:
    await set_read_only(fresh_db, True)
    pool = await open_pool(fresh_db, 2, application_name=APP)
    try:
        await pool.wait(timeout=10)
        store = PostgresStore(pool)
        outcome = make_outcome()
        with pytest.raises(StoreUnavailable, match="read-only transaction"):
            await store.record_outcome(outcome, event_for(outcome))
        with pytest.raises(StoreUnavailable, match="read-only transaction"):
            await store.claim_due(10, lease_s=60)
        assert await store.recorded_fingerprint(outcome.alert.alert_id) is None  # reads work
        await set_read_only(fresh_db, False)
        # A connection that refused a write is replaced rather than kept, so
        # each read-only one fails once at most and then the same store writes.
        refused = 0
        while True:
            try:
                assert await store.record_outcome(outcome, event_for(outcome)) is True
                break
            except StoreUnavailable:
                refused += 1
                assert refused <= 2, "read-only connections were kept"
        assert await fetch(fresh_db, "SELECT count(*) FROM webhook_outbox") == [(1,)]
    finally:
        await pool.close()


async def test_the_outbox_dispatcher_waits_out_a_read_only_database(
    store: PostgresStore, fresh_db: str,
) -> None:
    await queue_webhooks(store, 1)
    await set_read_only(fresh_db, True)
    pool = await open_pool(fresh_db, 1, application_name=APP)
    sender = RecordingSender()
    dispatcher = OutboxDispatcher(PostgresStore(pool), sender, ChildStats(), max_attempts=5,
                                  lease_s=60)
    task = asyncio.create_task(dispatcher.run())
    try:
        await asyncio.sleep(1.5)  # claims refused: before, the claimer died of the first
        assert not task.done() and sender.sent == []
        await set_read_only(fresh_db, False)
        delivered: list[tuple[Any, ...]] = []
        for _ in range(100):
            dispatcher.wake()
            delivered = await fetch(fresh_db, "SELECT status FROM webhook_outbox")
            if delivered == [("delivered",)]:
                break
            await asyncio.sleep(0.1)
        assert delivered == [("delivered",)]
        assert len(sender.sent) == 1
        dispatcher.stop()
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()


async def test_a_statement_waiting_for_a_lock_ends_in_store_unavailable_within_the_lock_timeout(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ALTER TABLE queued behind a long reader (here: a held lock) no longer holds
    the slot and its delivery for ever; the slot's store retry takes over."""
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT_S", 0.5)
    pool = await open_pool(fresh_db, 1, application_name=APP, statement_limits=True)
    try:
        await pool.wait(timeout=10)
        store = PostgresStore(pool)
        outcome = make_outcome()
        async with await psycopg.AsyncConnection.connect(fresh_db) as holder:
            await holder.execute("LOCK TABLE alerts IN ACCESS EXCLUSIVE MODE")
            started = asyncio.get_running_loop().time()
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                await asyncio.wait_for(store.record_outcome(outcome, event_for(outcome)), 5)
            assert asyncio.get_running_loop().time() - started < 2
            await holder.rollback()
        assert await store.record_outcome(outcome, event_for(outcome)) is True
    finally:
        await pool.close()


async def test_a_hung_statement_ends_in_store_unavailable_within_the_statement_timeout(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT_S", 0.5)
    pool = await open_pool(fresh_db, 1, application_name=APP, statement_limits=True)
    try:
        store = PostgresStore(pool)

        async def hung_backend() -> None:
            async with store._connection() as conn:
                await conn.execute("SELECT pg_sleep(30)")
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            await asyncio.wait_for(hung_backend(), 5)
        assert await store.recorded_fingerprint("x") is None  # the connection works on
    finally:
        await pool.close()


async def test_only_the_daemons_pool_limits_statements_not_an_operators_command(
    fresh_db: str,
) -> None:
    # `alertd outbox retry --all` may rightly run one UPDATE for longer than 30 s.
    for limits, expected in ((True, ("30s", "10s")), (False, ("0", "0"))):
        pool = await open_pool(fresh_db, 1, application_name=APP, statement_limits=limits)
        try:
            async with pool.connection(timeout=10) as conn:
                cur = await conn.execute("SELECT current_setting('statement_timeout'), "
                                         "current_setting('lock_timeout')")
                assert await cur.fetchone() == expected
        finally:
            await pool.close()


def test_a_migration_step_waiting_for_a_table_in_use_fails_in_one_line_instead_of_hanging(
    unmigrated_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queued ALTER TABLE would block every query on the table behind it."""
    monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS[:1])
    assert migrate(unmigrated_db) == 1
    monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS)
    monkeypatch.setattr(schema, "MIGRATION_LOCK_TIMEOUT_S", 0.5)
    with psycopg.connect(unmigrated_db) as reader, ThreadPoolExecutor(max_workers=1) as pool:
        reader.execute("SELECT count(*) FROM alerts")  # a long reader: its transaction is open
        attempt = pool.submit(migrate, unmigrated_db)
        try:
            with pytest.raises(AlertdError) as info:
                attempt.result(timeout=5)
        finally:
            reader.rollback()  # let a migrate that hangs (the bug) end
    message = str(info.value)
    assert "\n" not in message and "alertd db migrate" in message, message
    assert schema_version(unmigrated_db) == 1
    assert migrate(unmigrated_db) == SCHEMA_VERSION


class DayAhead(dt.datetime):
    """The app host's clock, set a day ahead of the database's."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> DayAhead:
        ahead = dt.datetime.now(tz) + dt.timedelta(days=1)
        return cls.fromtimestamp(ahead.timestamp(), tz)


async def test_a_retry_is_due_after_its_delay_by_the_database_clock_whatever_the_app_clock(
    store: PostgresStore, fresh_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Leases and due checks use the database's now(); a retry time taken from the
    app host's clock was off by the skew (a day late here; set back, rows parked)."""
    monkeypatch.setattr(outbox_module, "dt", types.SimpleNamespace(
        datetime=DayAhead, timedelta=dt.timedelta, UTC=dt.UTC), raising=False)
    await queue_webhooks(store, 1)
    sender = RecordingSender([DeliveryResult(ok=False, status_code=500, error="HTTP 500")])
    dispatcher = OutboxDispatcher(store, sender, ChildStats(), max_attempts=5, lease_s=60)
    task = asyncio.create_task(dispatcher.run())
    try:
        for _ in range(100):
            if await fetch(fresh_db, "SELECT count(*) FROM webhook_attempts") == [(1,)]:
                break
            await asyncio.sleep(0.05)
        dispatcher.stop()
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    [(delay,)] = await fetch(fresh_db, NEXT_AFTER_ATTEMPT)
    # The first retry's backoff: BACKOFF_FIRST_S, jittered down to half.
    assert dt.timedelta(seconds=0.5) <= delay <= dt.timedelta(seconds=1), delay
