"""The webhook outbox dispatcher: deliver committed results, retry with backoff, never lose one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from alertd.domain import webhook_receiver
from alertd.errors import StoreUnavailable
from alertd.ports import (
    AttemptRecord,
    DeliveryResult,
    PendingDelivery,
    WebhookOutbox,
    WebhookSender,
)
from alertd.stats import ChildStats

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 3600.0
POLL_INTERVAL_S = 1.0
CLAIM_LINGER_S = 0.005
BACKLOG_EVERY_S = 5.0
# A receiver that does not answer (timeouts, refused or reset connections)
# would hold every slot for its timeout while its due rows keep coming; its
# deliveries get a few slots of their own instead, until it answers again.
UNANSWERING_SHARE = 8          # concurrency // 8 slots (at least 1), on top of the main ones
UNANSWERING_FORGET_S = 600.0   # ... or until this long after its last failure


def next_attempt_delay(attempts_made: int, result: DeliveryResult) -> float:
    """Exponential backoff with full jitter; a receiver's Retry-After wins when longer."""
    # The exponent is capped: 2.0 ** 1024 overflows a float, and the number of
    # attempts has no upper bound (--webhook-max-attempts). 2 ** 32 s is past any cap.
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(max(0, attempts_made - 1), 32))
    delay = random.uniform(ceiling / 2, ceiling)
    if result.retry_after is not None:
        delay = max(delay, min(result.retry_after, BACKOFF_MAX_S))
    return delay


class OutboxDispatcher:
    """Keeps up to ``concurrency`` deliveries in flight until stopped.

    Every child runs one; rows are claimed with a lease (SKIP LOCKED), so the
    dispatchers of all children share the work and a dead one only delays its
    rows until the lease expires. A slot that frees up is refilled at once
    (a slow delivery holds one slot, not a batch), and finished attempts are
    written together: whatever finished while the last write was in flight
    goes in the next one. A receiver whose last attempt got no answer is
    left out of the main claims; its rows get a few slots of their own
    (shared by all such receivers), so one receiver that hangs cannot hold
    up everybody else's webhooks.
    """

    def __init__(self, outbox: WebhookOutbox, sender: WebhookSender, stats: ChildStats,
                 *, max_attempts: int, lease_s: float, concurrency: int = 16) -> None:
        self._outbox = outbox
        self._sender = sender
        self._stats = stats
        self._max_attempts = max_attempts
        self._lease_s = lease_s
        self._limit = concurrency
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        # Receivers whose last attempt got no answer -> when (loop time), and
        # the deliveries in flight to them, apart from the main slots.
        self._unanswering: dict[str, float] = {}
        self._unanswering_limit = max(1, concurrency // UNANSWERING_SHARE)
        self._in_flight_unanswering: set[asyncio.Task[None]] = set()
        # True while the last claim filled every free slot: more may be due.
        self._backlogged = False
        self._finished: list[AttemptRecord] = []
        self._to_record = asyncio.Event()
        self._closing = False

    def wake(self) -> None:
        """A new row was committed: look now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Deliver until stopped, then let the deliveries in flight finish and record them.

        Cancelled, deliveries in flight are cut short and unrecorded ones are
        dropped: their leases run out and they are sent again, same webhook-id.
        """
        recorder = asyncio.create_task(self._record_finished(), name="outbox-recorder")
        claimer = asyncio.create_task(self._claim_and_start(), name="outbox-claimer")
        try:
            # A recorder that fails (a bug, not an outage) must stop the
            # dispatcher loudly: deliveries whose attempts are never written
            # would be sent again every lease, forever.
            await asyncio.wait((claimer, recorder), return_when=asyncio.FIRST_COMPLETED)
            if recorder.done():
                recorder.result()
                raise RuntimeError("outbox recorder ended before the dispatcher was stopped")
            await claimer
            if self._in_flight:
                await asyncio.wait(self._in_flight)
            self._closing = True
            self._to_record.set()
            await recorder
        finally:
            tasks = (claimer, recorder, *self._in_flight)
            for task in tasks:
                task.cancel()
            # Unwound before the caller closes the pool and the HTTP session.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _claim_and_start(self) -> None:
        unavailable_delay = POLL_INTERVAL_S
        backlog_due = 0.0
        unanswering_due = 0.0  # their claim comes up empty while they back off: once a poll
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            self._wake.clear()
            if loop.time() >= backlog_due:
                backlog_due = loop.time() + BACKLOG_EVERY_S
                with contextlib.suppress(StoreUnavailable):
                    self._stats.gauges["outbox_backlog"] = await self._outbox.count_pending()
            self._forget_unanswering(loop.time())
            unanswering = tuple(self._unanswering)
            free = self._limit - len(self._in_flight - self._in_flight_unanswering)
            free_unanswering = (self._unanswering_limit - len(self._in_flight_unanswering)
                                if unanswering and loop.time() >= unanswering_due else 0)
            if free <= 0 and free_unanswering <= 0:
                await self._pause(POLL_INTERVAL_S)
                continue
            filled = False
            try:
                # Each claim's rows start before the next claim: a claim that
                # fails must not strand rows already leased.
                if free > 0:
                    claimed = await self._outbox.claim_due(
                        free, self._lease_s, skip_receivers=unanswering)
                    for delivery in claimed:
                        self._start(delivery)
                    # Only the main claim's: a freed slot wakes the loop while
                    # it is True, also across rounds where no main slot is free.
                    self._backlogged = filled = len(claimed) == free
                if free_unanswering > 0:
                    retried = await self._outbox.claim_due(
                        free_unanswering, self._lease_s, only_receivers=unanswering)
                    for delivery in retried:
                        self._in_flight_unanswering.add(self._start(delivery))
                    if len(retried) < free_unanswering:
                        unanswering_due = loop.time() + POLL_INTERVAL_S
                    filled = filled or len(retried) == free_unanswering
                unavailable_delay = POLL_INTERVAL_S
            except StoreUnavailable as exc:
                log.warning("outbox: store unavailable (%s); retrying in %.0fs",
                            exc, unavailable_delay)
                self._backlogged = False  # finished deliveries must not cut the wait short
                await self._pause(unavailable_delay)
                unavailable_delay = min(unavailable_delay * 2, 30.0)
                continue
            if not filled:
                await self._pause(POLL_INTERVAL_S)
                # Commits come in bursts under load: a moment's wait lets
                # one claim take the rows of several.
                await asyncio.sleep(CLAIM_LINGER_S)

    def _start(self, delivery: PendingDelivery) -> asyncio.Task[None]:
        task = asyncio.create_task(self._deliver(delivery))
        self._in_flight.add(task)
        task.add_done_callback(self._delivery_done)
        return task

    def _forget_unanswering(self, now: float) -> None:
        for receiver, since in list(self._unanswering.items()):
            if now - since > UNANSWERING_FORGET_S:
                del self._unanswering[receiver]

    def _note_answer(self, delivery: PendingDelivery, result: DeliveryResult) -> None:
        receiver = webhook_receiver(delivery.url)
        if result.status_code is None and not result.ok and not result.permanent:
            if receiver not in self._unanswering:
                log.warning("webhook receiver %s does not answer (%s): its deliveries share "
                            "%d slot(s) until it does, so that other receivers' go on",
                            receiver, result.error, self._unanswering_limit)
            self._unanswering[receiver] = asyncio.get_running_loop().time()
        elif result.status_code is not None and receiver in self._unanswering:
            del self._unanswering[receiver]
            log.info("webhook receiver %s answers again", receiver)

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._in_flight_unanswering.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("outbox: a delivery task failed: %r", exc, exc_info=exc)
        if self._backlogged:
            self._wake.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _deliver(self, delivery: PendingDelivery) -> None:
        try:
            result = await self._sender.deliver(delivery)
        except Exception as exc:
            # A bug, not an HTTP outcome. Recorded as a failed attempt, so the
            # row backs off and ends as failed after max attempts instead of
            # being sent again every lease.
            log.exception("webhook %s for alert %s: the sender failed", delivery.webhook_id,
                          delivery.alert_id)
            result = DeliveryResult(ok=False, error=f"internal_error: {type(exc).__name__}")
        try:
            record = self._attempt_record(delivery, result)
        except Exception:
            # A bug after the POST went out. Unrecorded, the row would be sent
            # again every lease, for ever; recorded without a next time, it
            # ends (failed unless delivered or gone) where `alertd outbox list`
            # shows it and `alertd outbox retry` can send it again.
            log.exception("webhook %s for alert %s: handling the answer failed; the row "
                          "ends here", delivery.webhook_id, delivery.alert_id)
            record = AttemptRecord(delivery, result, None)
        self._finished.append(record)
        self._to_record.set()

    def _attempt_record(self, delivery: PendingDelivery, result: DeliveryResult) -> AttemptRecord:
        """What to write for this attempt: the row's next state, counted and logged."""
        attempts_made = delivery.attempts + 1
        self._note_answer(delivery, result)
        self._stats.observe("notify", result.duration_s)
        retry_in_s = None
        if result.ok:
            outcome = "delivered"
        elif result.gone:
            outcome = "gone"
        elif result.permanent or attempts_made >= self._max_attempts:
            outcome = "failed"
        else:
            outcome = "retry"
            retry_in_s = next_attempt_delay(attempts_made, result)
        self._stats.count("webhooks", outcome)
        if outcome != "delivered":
            log.warning("webhook %s for alert %s attempt %d: %s (%s)", delivery.webhook_id,
                        delivery.alert_id, attempts_made,
                        result.error or f"HTTP {result.status_code}", outcome)
        return AttemptRecord(delivery, result, retry_in_s)

    async def _record_finished(self) -> None:
        while True:
            await self._to_record.wait()
            self._to_record.clear()
            if self._finished:
                batch, self._finished = self._finished, []
                try:
                    await self._outbox.record_attempts(batch)
                except StoreUnavailable as exc:
                    # The leases run out and the rows are tried again; the
                    # receiver deduplicates by webhook-id, so a repeat is harmless.
                    log.warning("outbox: could not record %d attempts (%s): %s", len(batch),
                                ", ".join(r.delivery.webhook_id for r in batch), exc)
                except Exception:
                    log.exception("outbox: recording %d attempts failed (%s)", len(batch),
                                  ", ".join(r.delivery.webhook_id for r in batch))
                    raise
            if self._closing and not self._finished:
                return
