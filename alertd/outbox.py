"""The webhook outbox dispatcher: deliver committed results, retry with backoff, never lose one."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random

from alertd.errors import StoreUnavailable
from alertd.ports import DeliveryResult, PendingDelivery, WebhookOutbox, WebhookSender
from alertd.stats import ChildStats

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 3600.0
POLL_INTERVAL_S = 1.0
BACKLOG_EVERY_S = 5.0


def next_attempt_delay(attempts_made: int, result: DeliveryResult) -> float:
    """Exponential backoff with full jitter; a receiver's Retry-After wins when longer."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, attempts_made - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    if result.retry_after is not None:
        delay = max(delay, min(result.retry_after, BACKOFF_MAX_S))
    return delay


class OutboxDispatcher:
    """Claims due outbox rows and delivers them, ``batch`` at a time, until stopped.

    Every child runs one; rows are claimed with a lease (SKIP LOCKED), so the
    dispatchers of all children share the work and a dead one only delays its
    rows until the lease expires.
    """

    def __init__(self, outbox: WebhookOutbox, sender: WebhookSender, stats: ChildStats,
                 *, max_attempts: int, lease_s: float, batch: int = 16) -> None:
        self._outbox = outbox
        self._sender = sender
        self._stats = stats
        self._max_attempts = max_attempts
        self._lease_s = lease_s
        self._batch = batch
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def wake(self) -> None:
        """A new row was committed: look now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        unavailable_delay = POLL_INTERVAL_S
        backlog_due = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            self._wake.clear()
            if loop.time() >= backlog_due:
                backlog_due = loop.time() + BACKLOG_EVERY_S
                with contextlib.suppress(StoreUnavailable):
                    self._stats.gauges["outbox_backlog"] = await self._outbox.count_pending()
            try:
                claimed = await self._outbox.claim_due(self._batch, self._lease_s)
                unavailable_delay = POLL_INTERVAL_S
            except StoreUnavailable as exc:
                log.warning("outbox: store unavailable (%s); retrying in %.0fs",
                            exc, unavailable_delay)
                await self._pause(unavailable_delay)
                unavailable_delay = min(unavailable_delay * 2, 30.0)
                continue
            if claimed:
                await asyncio.gather(*(self._deliver(d) for d in claimed))
            if len(claimed) < self._batch:
                await self._pause(POLL_INTERVAL_S)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _deliver(self, delivery: PendingDelivery) -> None:
        result = await self._sender.deliver(delivery)
        attempts_made = delivery.attempts + 1
        self._stats.observe("notify", result.duration_s)
        next_at = None
        if result.ok:
            outcome = "delivered"
        elif result.gone:
            outcome = "gone"
        elif result.permanent or attempts_made >= self._max_attempts:
            outcome = "failed"
        else:
            outcome = "retry"
            next_at = dt.datetime.now(dt.UTC) + dt.timedelta(
                seconds=next_attempt_delay(attempts_made, result))
        self._stats.count("webhooks", outcome)
        if outcome != "delivered":
            log.warning("webhook %s for alert %s attempt %d: %s (%s)", delivery.webhook_id,
                        delivery.alert_id, attempts_made,
                        result.error or f"HTTP {result.status_code}", outcome)
        try:
            await self._outbox.record_attempt(delivery, result, next_attempt_at=next_at)
        except StoreUnavailable as exc:
            # The lease runs out and the row is tried again; the receiver
            # deduplicates by webhook-id, so a repeat is harmless.
            log.warning("outbox: could not record attempt for %s: %s", delivery.webhook_id, exc)
