"""Operator commands on the database: the webhook outbox seen and nudged from the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from alertd.adapters.postgres import PostgresStore, open_pool


def undelivered_webhooks(dsn: str, limit: int) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        pool = await open_pool(dsn, 1)
        try:
            rows = await PostgresStore(pool).list_undelivered(limit)
        finally:
            await pool.close()
        return [dataclasses.asdict(row) for row in rows]
    return asyncio.run(run())


def retry_webhooks(dsn: str, webhook_ids: list[str] | None) -> int:
    """Make the given deliveries (every pending or failed one when None) due now."""
    async def run() -> int:
        pool = await open_pool(dsn, 1)
        try:
            store = PostgresStore(pool)
            if webhook_ids is None:
                return await store.retry_all_now()
            return await store.retry_now(webhook_ids)
        finally:
            await pool.close()
    return asyncio.run(run())
