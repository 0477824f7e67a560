"""PostgreSQL adapter: the result store and the webhook outbox on one async pool."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import select
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, LiteralString, TypeAlias

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from alertd.adapters.schema import (
    SCHEMA_VERSION,
    check_schema,
    first_line,
    migrate,
    require_schema_version,
    schema_version,
)
from alertd.domain import Outcome, WebhookEvent
from alertd.errors import AlertdError, StoreUnavailable
from alertd.ports import AttemptRecord, DeliveryResult, PendingDelivery
from alertd.signing import new_webhook_id

__all__ = [
    "SCHEMA_VERSION",
    "Pool",
    "PostgresStore",
    "UndeliveredWebhook",
    "check_schema",
    "migrate",
    "open_pool",
    "require_schema_version",
    "schema_version",
]

Pool: TypeAlias = AsyncConnectionPool[AsyncConnection[TupleRow]]

# What "the database is not there right now" looks like from psycopg: refused
# or lost connections, terminated backends, server restarts, pool timeouts,
# and a server that takes no writes (a failover left us on a standby, a
# default_transaction_read_only database, a managed one made read-only on a
# full disk): an InternalError in psycopg, but an outage to wait out, not a bug.
# ProgrammingError, IntegrityError and DataError are bugs and stay loud.
# Server-side limits on every statement of the daemon's connections, so a
# lock wait (a migration's ALTER TABLE queued behind a long reader queues
# everyone behind it) or a hung backend ends in StoreUnavailable (psycopg's
# QueryCanceled and LockNotAvailable are OperationalErrors) and the slot's
# retry, instead of holding the slot and its unacked delivery for ever with
# nothing to show for it. alertd's statements take milliseconds and lock a few
# rows, in one order (waits between its own are as short): 10 s of lock wait
# only comes from someone else's lock; 30 s of statement covers a slow disk or a
# checkpoint with room to spare, and ends a record of attempts well before its
# rows' lease (at least 30 s plus three webhook timeouts) would send them again.
STATEMENT_TIMEOUT_S = 30.0
LOCK_TIMEOUT_S = 10.0

_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout,
                psycopg.errors.ReadOnlySqlTransaction)


async def open_pool(
    dsn: str,
    size: int,
    *,
    checkout_timeout: float = 5.0,
    reconnect_timeout: float = 30.0,
    application_name: str = "alertd",
    statement_limits: bool = False,
) -> Pool:
    """Open a pool on the running loop; returns at once even if the database is down.

    Call it inside the child's ``serve()``, never at import or before fork.
    ``checkout_timeout`` bounds each wait for a connection (then ``StoreUnavailable``).
    ``statement_limits``: the daemon's STATEMENT_TIMEOUT_S and LOCK_TIMEOUT_S on
    every connection (not for an operator's command, whose one big UPDATE may
    rightly take longer).
    """
    pool: Pool = AsyncConnectionPool(
        dsn,
        min_size=size,
        max_size=size,
        open=False,
        name=application_name,
        kwargs={
            "autocommit": True,
            "connect_timeout": max(2, math.ceil(checkout_timeout)),
            "application_name": application_name,
            # A silently vanished server (network partition, host down) is
            # noticed in ~25 s instead of the kernel's ~2 h, so a query or
            # checkout check cannot hang a slot for that long.
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 25_000,
        },
        configure=_configure_with_limits if statement_limits else _configure,
        check=lambda conn: _check_and_sweep(conn, pool),
        timeout=checkout_timeout,
        # psycopg_pool backs off by doubling with no ceiling until it gives up
        # on a slot; the slot is re-grown with a fresh backoff on the next
        # request. A short give-up therefore bounds how long a pool waits after
        # the database is back, and never makes the pool stop retrying.
        reconnect_timeout=reconnect_timeout,
    )
    # wait=False: a database that is down at start is retried in the
    # background; callers get StoreUnavailable meanwhile and back off.
    await pool.open(wait=False)
    return pool


async def _check_and_sweep(conn: AsyncConnection[TupleRow], pool: Pool) -> None:
    """Checkout check: a dead connection is discarded instead of failing a query.

    A connection that looks alive without a round trip is handed out as is:
    this runs on every checkout, several per alert. One dead connection
    usually means all idle ones died with it (server restart, failover). The
    pool alone would find them one checkout at a time with a doubling backoff
    (1, 2, 4 s...), outlasting the checkout timeout; sweeping the idle ones at
    once gets the caller a fresh connection at the next try.
    """
    if _looks_alive(conn):
        return
    try:
        await AsyncConnectionPool.check_connection(conn)
    except Exception:
        await pool.check()
        raise


def _looks_alive(conn: AsyncConnection[TupleRow]) -> bool:
    """True when an idle connection's socket has nothing to read.

    The server ends a connection (terminated backend, restart, idle timeout)
    by sending an error and closing, which makes the socket readable; an idle
    healthy one has nothing to say (alertd never LISTENs). Anything readable,
    or no socket at all, gets the full check. A peer that vanished without a
    word (a failover that moved the address, a middlebox that lost its state)
    is only found by the query that uses the connection: ``_connection`` then
    sweeps the idle ones in the background.
    """
    if conn.closed or conn.broken:
        return False
    try:
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError, psycopg.Error):
        return False


async def _configure(conn: AsyncConnection[TupleRow]) -> None:
    """Each new connection: orjson for JSON."""
    set_json_dumps(orjson.dumps, conn)
    set_json_loads(orjson.loads, conn)


async def _configure_with_limits(conn: AsyncConnection[TupleRow]) -> None:
    """Each new daemon connection: orjson, and the timeouts set on the session.

    On the session, not through the DSN's ``options``, which stays the operator's.
    """
    await _configure(conn)
    await conn.execute(
        "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)",
        (f"{round(STATEMENT_TIMEOUT_S * 1000)}ms", f"{round(LOCK_TIMEOUT_S * 1000)}ms"))


@dataclass(frozen=True, slots=True)
class UndeliveredWebhook:
    """An outbox row that is not delivered, as an operator lists it."""

    webhook_id: str
    alert_id: str
    url: str
    status: str
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None
    last_status_code: int | None
    created_at: dt.datetime


# Alerts deleted per transaction by `alertd db prune`, and batches in a row
# it redoes after a concurrent `outbox retry` before it gives up.
PRUNE_BATCH = 5000
PRUNE_CONFLICTS = 10


class PostgresStore:
    """``ResultStore`` and ``WebhookOutbox`` on PostgreSQL.

    Every method is one short transaction on a pooled connection and raises
    ``StoreUnavailable`` (never a psycopg error) when the database cannot be
    reached; a failed transaction commits nothing.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._sweep: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[TupleRow]]:
        try:
            # The pool sees the original error first, so it discards a broken
            # connection before we translate the error for the caller.
            async with self._pool.connection() as conn:
                try:
                    yield conn
                except psycopg.errors.ReadOnlySqlTransaction:
                    # The pool would keep this connection: it is healthy, only
                    # read-only, and stays so (a standby, or a session that
                    # started read-only). Closed, it is replaced by a new one,
                    # which may reach the new primary or a writable database.
                    await conn.close()
                    raise
        except _UNAVAILABLE as exc:
            self._sweep_idle_soon()
            raise StoreUnavailable(f"database unavailable: {first_line(exc)}") from None

    def _sweep_idle_soon(self) -> None:
        """Check the idle connections (in the background, one sweep at a time).

        A connection that failed in use may have died with its siblings
        (failover, restart); the checkout check cannot see every such death
        without a round trip, so the sweep does, once, after a failure.
        """
        if self._sweep is None or self._sweep.done():
            self._sweep = asyncio.create_task(self._check_idle())

    async def _check_idle(self) -> None:
        with contextlib.suppress(Exception):
            await self._pool.check()

    async def check_schema(self) -> None:
        """Raise ``ConfigError`` unless the schema is at ``SCHEMA_VERSION``."""
        async with self._connection() as conn:
            await check_schema(conn)

    async def recorded_fingerprint(self, alert_id: str) -> str | None:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT coalesce(request_sha256, '') FROM alerts WHERE alert_id = %s",
                (alert_id,))
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def record_outcome(self, outcome: Outcome, event: WebhookEvent | None) -> bool:
        alert = outcome.alert
        params: dict[str, Any] = {
            "alert_id": alert.alert_id,
            "status": str(outcome.status),
            "metadata": _jsonb(outcome.metadata),
            "error": _jsonb(outcome.failure.to_json() if outcome.failure else None),
            "attempts": outcome.attempts,
            "received_at": outcome.received_at,
            "processed_at": outcome.processed_at,
            "source": alert.source,
            "occurred_at": alert.occurred_at,
            "video_url": alert.video_url,
            "request_sha256": alert.fingerprint,
        }
        if event is None:
            sql = _INSERT_ALERT
        else:
            event_type = event.payload.get("type")
            params.update({
                "webhook_id": new_webhook_id(),
                "event_type": event_type if isinstance(event_type, str) else None,
                "url": event.url,
                "payload": _jsonb(event.payload),
                "body": orjson.dumps(event.payload),
            })
            sql = _INSERT_ALERT_AND_OUTBOX
        # One statement, so one round trip and atomic under autocommit: the
        # outbox row exists exactly when the alert row was inserted by it.
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            if await cur.fetchone() is not None:
                return True
            # Already stored: the first outcome wins and its webhook was queued.
            # It may be this one, committed by an earlier call whose reply was
            # lost with its connection (the service tried again): recorded by
            # this delivery then, not a duplicate of another one. processed_at
            # tells them apart (another delivery's processing ended at another
            # microsecond), and the status and attempt number must match too.
            cur = await conn.execute(_SAME_OUTCOME_STORED, params)
            return await cur.fetchone() is not None

    async def claim_due(
        self, limit: int, lease_s: float, *, skip_receivers: Collection[str] = (),
        only_receivers: Collection[str] | None = None,
    ) -> list[PendingDelivery]:
        if limit < 1 or (only_receivers is not None and not only_receivers):
            return []
        params: dict[str, Any] = {"limit": limit, "lease_s": float(lease_s)}
        sql = _CLAIM_DUE
        if only_receivers is not None:
            sql, params["receivers"] = _CLAIM_DUE_ONLY, list(only_receivers)
        elif skip_receivers:
            sql, params["receivers"] = _CLAIM_DUE_SKIPPING, list(skip_receivers)
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
        deliveries = [
            PendingDelivery(
                delivery_id=row[0], webhook_id=row[1], alert_id=row[2],
                url=row[3], body=bytes(row[4]), attempts=row[5],
            )
            for row in rows
        ]
        return sorted(deliveries, key=lambda d: d.delivery_id)

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        # One statement per batch: atomic under autocommit, one round trip.
        # A row twice in one batch (a dispatcher that claimed it again after
        # its lease ran out while the first result waited to be written) would
        # update once and get two attempts numbered alike, so such a batch is
        # written in several statements.
        for group in _distinct_rows(attempts):
            columns = _attempt_columns(group)
            async with self._connection() as conn:
                await conn.execute(_RECORD_ATTEMPTS, columns)

    async def list_undelivered(self, limit: int = 100) -> list[UndeliveredWebhook]:
        """Pending, failed and gone rows, oldest first."""
        async with self._connection() as conn:
            cur = await conn.execute(_LIST_UNDELIVERED, (limit,))
            rows = await cur.fetchall()
        return [UndeliveredWebhook(*row) for row in rows]

    async def count_pending(self) -> int:
        """Webhook deliveries still to be made (the outbox backlog)."""
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM webhook_outbox WHERE status = 'pending'")
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def retry_now(self, webhook_ids: Collection[str]) -> int:
        """Make these undelivered webhooks due now, even failed or gone; return how many.

        ``attempts`` is kept, so a failed row gets one more attempt unless the
        dispatcher's limit allows more; its history stays in webhook_attempts.
        """
        if isinstance(webhook_ids, str):
            raise TypeError("webhook_ids must be a collection of ids, not one string")
        if not webhook_ids:
            return 0
        async with self._connection() as conn:
            cur = await conn.execute(_RETRY_NOW_IDS, (list(webhook_ids),))
            return cur.rowcount

    async def retry_all_now(self) -> int:
        """Make every pending or failed webhook due now; ``gone`` rows stay gone."""
        async with self._connection() as conn:
            cur = await conn.execute(_RETRY_ALL_NOW)
            return cur.rowcount

    async def prune(self, older_than_s: float, *, batch: int = PRUNE_BATCH,
                    dry_run: bool = False) -> int:
        """Delete the alerts decided more than ``older_than_s`` ago (by the
        database's clock) whose webhook is settled (delivered, gone or failed),
        with their outbox rows and attempts; return how many alerts.

        An alert whose webhook is still pending is kept, however old. Each
        batch is a transaction of its own, so locks stay short and a stop
        midway keeps what was done. ``dry_run`` only counts them.
        """
        if dry_run:
            async with self._connection() as conn:
                cur = await conn.execute(_PRUNABLE_COUNT, (older_than_s,))
                row = await cur.fetchone()
            return int(row[0]) if row else 0
        total = conflicts = 0
        while True:
            try:
                async with self._connection() as conn:
                    cur = await conn.execute(_PRUNE, (older_than_s, batch))
                    deleted = cur.rowcount
            except psycopg.errors.ForeignKeyViolation as exc:
                # A webhook of the batch was made pending again meanwhile (see
                # _PRUNE): the batch rolled back; the next one leaves it out.
                # Again and again is something else: stop, having kept it all.
                conflicts += 1
                if conflicts > PRUNE_CONFLICTS:
                    raise AlertdError(f"prune: {conflicts} batches in a row rolled back on "
                                      f"a foreign key: {first_line(exc)}") from None
                continue
            conflicts = 0
            total += deleted
            if deleted < batch:
                return total


def _distinct_rows(attempts: Sequence[AttemptRecord]) -> list[list[AttemptRecord]]:
    """The attempts in groups where no row appears twice, in order."""
    groups: list[tuple[set[int], list[AttemptRecord]]] = []
    for record in attempts:
        row = record.delivery.delivery_id
        for ids, group in groups:
            if row not in ids:
                ids.add(row)
                group.append(record)
                break
        else:
            groups.append(({row}, [record]))
    return [group for _, group in groups]


def _attempt_columns(attempts: Sequence[AttemptRecord]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {
        "ids": [], "statuses": [], "retry_in_s": [], "errors": [], "codes": [],
        "durations": [], "fallbacks": []}
    for record in attempts:
        status = _status_after(record.result, record.retry_in_s)
        columns["ids"].append(record.delivery.delivery_id)
        columns["statuses"].append(status)
        columns["retry_in_s"].append(record.retry_in_s if status == "pending" else None)
        # PostgreSQL text cannot hold NUL; an error text is ours, but may quote a peer.
        error = record.result.error
        columns["errors"].append(error.replace("\x00", "") if error else error)
        columns["codes"].append(record.result.status_code)
        columns["durations"].append(round(record.result.duration_s * 1000))
        # The attempt's number when its row was already ended by someone else.
        columns["fallbacks"].append(record.delivery.attempts + 1)
    return columns


def _status_after(result: DeliveryResult, retry_in_s: float | None) -> str:
    if result.ok:
        return "delivered"
    if result.gone:
        return "gone"
    if result.permanent or retry_in_s is None:
        return "failed"
    return "pending"


def _jsonb(value: Any) -> Jsonb | None:
    # SQL NULL, not JSON null, for an absent value: the contract is
    # "metadata is null when failed".
    return None if value is None else Jsonb(value, dumps=orjson.dumps)


_INSERT_ALERT: LiteralString = """
    INSERT INTO alerts (alert_id, status, metadata, error, attempts, received_at,
                        processed_at, source, occurred_at, video_url, request_sha256)
    VALUES (%(alert_id)s, %(status)s, %(metadata)s, %(error)s, %(attempts)s, %(received_at)s,
            %(processed_at)s, %(source)s, %(occurred_at)s, %(video_url)s, %(request_sha256)s)
    ON CONFLICT (alert_id) DO NOTHING
    RETURNING alert_id
"""

_INSERT_ALERT_AND_OUTBOX: LiteralString = """
    WITH stored AS (
        INSERT INTO alerts (alert_id, status, metadata, error, attempts, received_at,
                            processed_at, source, occurred_at, video_url, request_sha256)
        VALUES (%(alert_id)s, %(status)s, %(metadata)s, %(error)s, %(attempts)s,
                %(received_at)s, %(processed_at)s, %(source)s, %(occurred_at)s, %(video_url)s,
                %(request_sha256)s)
        ON CONFLICT (alert_id) DO NOTHING
        RETURNING alert_id
    )
    INSERT INTO webhook_outbox (webhook_id, alert_id, event_type, url, payload, body)
    SELECT %(webhook_id)s, alert_id, %(event_type)s, %(url)s, %(payload)s, %(body)s
    FROM stored
    RETURNING alert_id
"""

_SAME_OUTCOME_STORED: LiteralString = """
    SELECT 1 FROM alerts
    WHERE alert_id = %(alert_id)s AND processed_at = %(processed_at)s
      AND request_sha256 = %(request_sha256)s AND status = %(status)s
      AND attempts = %(attempts)s
"""

# SKIP LOCKED lets dispatchers in several processes claim disjoint rows without
# waiting on each other; a row another claimer just committed is re-checked by
# PostgreSQL and dropped since its next_attempt_at is now in the future. The
# lease is the claim: no separate "in flight" state that a crash could strand.
# A CTE, because a FOR UPDATE ... LIMIT subquery under IN may be re-run.
_CLAIM_DUE_HEAD: LiteralString = """
    WITH due AS (
        SELECT id FROM webhook_outbox
        WHERE status = 'pending' AND next_attempt_at <= now()"""
_CLAIM_DUE_TAIL: LiteralString = """
        ORDER BY next_attempt_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE webhook_outbox AS o
    SET next_attempt_at = now() + make_interval(secs => %(lease_s)s)
    FROM due
    WHERE o.id = due.id
    RETURNING o.id, o.webhook_id, o.alert_id, o.url, o.body, o.attempts
"""
# alertd.domain.webhook_receiver in SQL: host[:port] of the URL, lower case;
# '' (never NULL, which "<> ALL" would leave out of every claim) if unparsed.
_RECEIVER: LiteralString = (
    "coalesce(lower(substring(btrim(url) from "
    "'^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#]*@)?([^@/?#]*)')), '')")
_CLAIM_DUE: LiteralString = _CLAIM_DUE_HEAD + _CLAIM_DUE_TAIL
_CLAIM_DUE_SKIPPING: LiteralString = (
    _CLAIM_DUE_HEAD + " AND " + _RECEIVER + " <> ALL(%(receivers)s)" + _CLAIM_DUE_TAIL)
_CLAIM_DUE_ONLY: LiteralString = (
    _CLAIM_DUE_HEAD + " AND " + _RECEIVER + " = ANY(%(receivers)s)" + _CLAIM_DUE_TAIL)

# Each attempt updates its row and is logged in webhook_attempts, in one
# statement. The next attempt's time is the database's now() plus the delay,
# like the leases and the due check: the app host's clock, set ahead, delayed
# every retry by the difference, and set back, parked rows.
# A row no longer pending (its lease ran out and another dispatcher ended it)
# keeps its final status; the attempt still happened, so it is logged with the
# number this dispatcher gave it. Except that a delivery ends a failed or gone
# row as delivered (never the other way): when the dispatcher whose lease ran
# out writes its final failure before the one that took the row over writes
# its 2xx, the webhook was delivered, and `outbox retry --all` must not send it
# again.
# The rows are locked first, in id order, as every statement that locks
# several outbox rows does: two batches sharing rows (a lease that ran out)
# or a batch and `alertd outbox retry` then wait for each other instead of
# deadlocking, which aborted one of them (its webhooks were sent again).
_RECORD_ATTEMPTS: LiteralString = """
    WITH attempt AS (
        SELECT * FROM unnest(%(ids)s::bigint[], %(statuses)s::text[],
                             %(retry_in_s)s::float8[], %(errors)s::text[],
                             %(codes)s::int[], %(durations)s::int[], %(fallbacks)s::int[])
            AS a(id, status, retry_in_s, error, status_code, duration_ms, fallback)
    ), locked AS (
        SELECT id FROM webhook_outbox WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id FOR UPDATE
    ), updated AS (
        UPDATE webhook_outbox AS o
        SET status = a.status,
            attempts = o.attempts + 1,
            next_attempt_at = coalesce(now() + make_interval(secs => a.retry_in_s),
                                       o.next_attempt_at),
            last_error = a.error,
            last_status_code = a.status_code,
            delivered_at = CASE WHEN a.status = 'delivered' THEN now() END
        FROM attempt AS a
        WHERE o.id = a.id AND o.id IN (SELECT id FROM locked)
          AND (o.status = 'pending'
               OR (a.status = 'delivered' AND o.status IN ('failed', 'gone')))
        RETURNING o.id, o.attempts
    )
    INSERT INTO webhook_attempts (outbox_id, attempt, status_code, error, duration_ms)
    SELECT a.id, coalesce(u.attempts, a.fallback), a.status_code, a.error, a.duration_ms
    FROM attempt AS a LEFT JOIN updated AS u ON u.id = a.id
"""

_LIST_UNDELIVERED: LiteralString = """
    SELECT webhook_id, alert_id, url, status, attempts, next_attempt_at,
           last_error, last_status_code, created_at
    FROM webhook_outbox
    WHERE status <> 'delivered'
    ORDER BY created_at, id
    LIMIT %s
"""

# Rows locked in id order first, like _RECORD_ATTEMPTS (no deadlock with it).
_RETRY_NOW_IDS: LiteralString = """
    WITH locked AS (
        SELECT id FROM webhook_outbox
        WHERE status <> 'delivered' AND webhook_id = ANY(%s) ORDER BY id FOR UPDATE
    )
    UPDATE webhook_outbox SET status = 'pending', next_attempt_at = now()
    WHERE id IN (SELECT id FROM locked) AND status <> 'delivered'
"""
_RETRY_ALL_NOW: LiteralString = """
    WITH locked AS (
        SELECT id FROM webhook_outbox
        WHERE status IN ('pending', 'failed') ORDER BY id FOR UPDATE
    )
    UPDATE webhook_outbox SET status = 'pending', next_attempt_at = now()
    WHERE id IN (SELECT id FROM locked) AND status IN ('pending', 'failed')
"""

# An alert is prunable when it is old and its webhook is settled. The outbox
# delete re-checks the status: a row an operator made pending again meanwhile
# (`outbox retry`) is kept, and then its alert's delete fails on the foreign
# key, rolling the batch back, rather than losing the retry.
_PRUNABLE: LiteralString = """
    SELECT alert_id FROM alerts a
    WHERE processed_at < now() - make_interval(secs => %s)
      AND NOT EXISTS (SELECT 1 FROM webhook_outbox o
                      WHERE o.alert_id = a.alert_id AND o.status = 'pending')
"""
_PRUNABLE_COUNT: LiteralString = "SELECT count(*) FROM (" + _PRUNABLE + ") AS prunable"
_PRUNE: LiteralString = """
    WITH doomed AS (""" + _PRUNABLE + """ LIMIT %s FOR UPDATE SKIP LOCKED
    ), outbox AS (
        DELETE FROM webhook_outbox o USING doomed d
        WHERE o.alert_id = d.alert_id AND o.status <> 'pending'
    )
    DELETE FROM alerts a USING doomed d WHERE a.alert_id = d.alert_id
"""
