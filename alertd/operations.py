"""Operator commands on the database: the webhook outbox seen and nudged from the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from alertd.adapters.postgres import PostgresStore, open_pool

T = TypeVar("T")


def undelivered_webhooks(dsn: str, limit: int) -> list[dict[str, Any]]:
    async def run(store: PostgresStore) -> list[dict[str, Any]]:
        return [dataclasses.asdict(row) for row in await store.list_undelivered(limit)]
    return _with_store(dsn, run)


def retry_webhooks(dsn: str, webhook_ids: list[str] | None) -> int:
    """Make the given deliveries (every pending or failed one when None) due now."""
    async def run(store: PostgresStore) -> int:
        if webhook_ids is None:
            return await store.retry_all_now()
        return await store.retry_now(webhook_ids)
    return _with_store(dsn, run)


def prune(dsn: str, older_than_s: float, *, dry_run: bool) -> int:
    """Delete (or with ``dry_run`` count) the alerts settled longer ago than this."""
    async def run(store: PostgresStore) -> int:
        return await store.prune(older_than_s, dry_run=dry_run)
    return _with_store(dsn, run)


def _with_store(dsn: str, run: Callable[[PostgresStore], Awaitable[T]]) -> T:
    """``run`` on a one-connection store, once the schema is known to be this code's
    (an unmigrated or newer database is one line naming 'alertd db migrate')."""
    async def main() -> T:
        pool = await open_pool(dsn, 1)
        try:
            store = PostgresStore(pool)
            await store.check_schema()
            return await run(store)
        finally:
            await pool.close()
    return asyncio.run(main())
