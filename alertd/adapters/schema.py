"""The PostgreSQL schema: versioned migrations, applied once each, and the startup check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg

from alertd.errors import AlertdError, ConfigError, StoreUnavailable


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: LiteralString


# Append only: a released step is never edited, because databases that already
# ran it would silently differ from new ones. Change the schema with a new step.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "alerts, webhook outbox and delivery attempts", """
        CREATE TABLE alerts (
            alert_id     text PRIMARY KEY,
            status       text NOT NULL CHECK (status IN ('done', 'failed')),
            metadata     jsonb,
            error        jsonb,
            attempts     int NOT NULL,
            received_at  timestamptz NOT NULL,
            processed_at timestamptz NOT NULL,
            source       text,
            occurred_at  timestamptz,
            video_url    text,
            -- The contract readers rely on: metadata xor error, matching status.
            CONSTRAINT alerts_result_matches_status CHECK (
                (status = 'done' AND metadata IS NOT NULL AND error IS NULL)
                OR (status = 'failed' AND metadata IS NULL AND error IS NOT NULL)
            )
        );

        CREATE TABLE webhook_outbox (
            id               bigserial PRIMARY KEY,
            webhook_id       text NOT NULL UNIQUE,
            alert_id         text NOT NULL REFERENCES alerts (alert_id),
            event_type       text,
            url              text NOT NULL,
            payload          jsonb NOT NULL,
            -- The exact bytes that are signed and sent: jsonb does not keep key
            -- order or spacing, so re-serializing it could change the signature
            -- between attempts of the same webhook-id.
            body             bytea NOT NULL,
            status           text NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'delivered', 'gone', 'failed')),
            attempts         int NOT NULL DEFAULT 0,
            next_attempt_at  timestamptz NOT NULL DEFAULT now(),
            last_error       text,
            last_status_code int,
            created_at       timestamptz NOT NULL DEFAULT now(),
            delivered_at     timestamptz
        );
        -- The dispatcher's poll; delivered rows pile up and must not slow it.
        CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
            WHERE status = 'pending';
        -- Operators' "what is stuck" listing, same reason.
        CREATE INDEX webhook_outbox_undelivered ON webhook_outbox (created_at)
            WHERE status <> 'delivered';
        CREATE INDEX webhook_outbox_alert_id ON webhook_outbox (alert_id);

        CREATE TABLE webhook_attempts (
            id           bigserial PRIMARY KEY,
            outbox_id    bigint NOT NULL REFERENCES webhook_outbox (id) ON DELETE CASCADE,
            attempt      int NOT NULL,
            attempted_at timestamptz NOT NULL DEFAULT now(),
            status_code  int,
            error        text,
            duration_ms  int
        );
        CREATE INDEX webhook_attempts_outbox_id ON webhook_attempts (outbox_id);
    """),
    Migration(2, "request fingerprint, to tell a redelivery from a reused alert id", """
        -- NULL on rows stored before it was kept: treated as "same request".
        ALTER TABLE alerts ADD COLUMN request_sha256 text;
    """),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

# Any constant shared by every alertd; "alertd" in ASCII. Transaction-scoped,
# so a migrate that dies mid-step releases it with its rolled-back transaction.
_MIGRATION_LOCK = 0x616C65727464
_CONNECT_TIMEOUT_S = 10
# A step's ALTER TABLE waiting for its lock queues every other query on that
# table behind it, so it gives up soon, before the daemon's own queries give up
# on it (their lock_timeout, alertd.adapters.postgres.LOCK_TIMEOUT_S).
MIGRATION_LOCK_TIMEOUT_S = 5.0


def migrate(dsn: str) -> int:
    """Apply every missing migration, each in its own transaction; return the version.

    Safe to run twice and concurrently: each step takes an advisory lock and
    re-reads what is applied under it, so a second migrate waits, then skips.
    Raises ``StoreUnavailable`` when the database cannot be reached, and a
    one-line ``AlertdError`` when a step waited ``MIGRATION_LOCK_TIMEOUT_S``
    for a table that a long query or transaction holds.
    """
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
            with conn.transaction():
                # Under the lock too: CREATE TABLE IF NOT EXISTS is not safe
                # against a concurrent create of the same table.
                _lock(conn)
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version int PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
            for step in MIGRATIONS:
                with conn.transaction():
                    _lock(conn)
                    # After the advisory lock: a concurrent migrate waits
                    # for this one's steps however long they take.
                    conn.execute("SELECT set_config('lock_timeout', %s, true)",
                                 (f"{round(MIGRATION_LOCK_TIMEOUT_S * 1000)}ms",))
                    done = conn.execute(
                        "SELECT 1 FROM schema_migrations WHERE version = %s", (step.version,)
                    ).fetchone()
                    if done is None:
                        conn.execute(step.sql)
                        conn.execute(
                            "INSERT INTO schema_migrations (version) VALUES (%s)", (step.version,)
                        )
            return _read_version(conn)
    except psycopg.errors.LockNotAvailable as exc:
        # Not an outage (an OperationalError too): a long query or transaction
        # holds a table the step changes; the step rolled back, nothing is half done.
        raise AlertdError(
            f"migration gave up after waiting {MIGRATION_LOCK_TIMEOUT_S:g} s for a table"
            f" in use ({first_line(exc)}): run 'alertd db migrate' again once the long"
            " queries or transactions on it have ended") from None
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"database unavailable: {first_line(exc)}") from None
    except psycopg.Error as exc:  # no privilege to create, a read-only standby...
        raise AlertdError(f"migration refused by the database: {first_line(exc)}") from None


def schema_version(dsn: str) -> int:
    """The version the database is at; 0 when it was never migrated."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
            return _read_version(conn)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"database unavailable: {first_line(exc)}") from None


async def check_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """Raise ``ConfigError`` unless the database is at exactly this code's version.

    Run at start: a worker on an older schema would fail on every alert with
    SQL errors instead of one clear line telling the operator what to do.
    """
    exists = await (await conn.execute(_TABLE_EXISTS)).fetchone()
    found = 0
    if exists and exists[0]:
        row = await (await conn.execute(_MAX_VERSION)).fetchone()
        found = int(row[0]) if row else 0
    require_schema_version(found)


def require_schema_version(found: int) -> None:
    """Raise the one-line ``ConfigError`` an operator sees when versions differ."""
    if found < SCHEMA_VERSION:
        raise ConfigError(
            f"dsn: database schema is at version {found}, expected {SCHEMA_VERSION}:"
            " run 'alertd db migrate'"
        )
    if found > SCHEMA_VERSION:
        raise ConfigError(
            f"dsn: database schema is at version {found}, expected {SCHEMA_VERSION}:"
            " this alertd is older than the database, upgrade it"
        )


def first_line(exc: BaseException) -> str:
    """libpq messages span lines (DETAIL, HINT); logs and errors want one."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Two queries, not one: a query naming a missing table fails at parse time
# even in a branch that would not run, and a never-migrated database is
# version 0, not an UndefinedTable error.
_TABLE_EXISTS: LiteralString = "SELECT to_regclass('schema_migrations') IS NOT NULL"
_MAX_VERSION: LiteralString = "SELECT coalesce(max(version), 0) FROM schema_migrations"


def _read_version(conn: psycopg.Connection[Any]) -> int:
    exists = conn.execute(_TABLE_EXISTS).fetchone()
    if not (exists and exists[0]):
        return 0
    row = conn.execute(_MAX_VERSION).fetchone()
    return int(row[0]) if row else 0


def _lock(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
