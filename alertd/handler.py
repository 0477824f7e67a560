"""From one broker message to one disposition: validate, run the use case, decide.

The AMQP adapter applies the disposition (ack, dead-letter, retry, requeue);
this module never sees a delivery tag, and the use case never sees a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from alertd.config import Settings
from alertd.domain import parse_alert
from alertd.errors import InvalidMessage
from alertd.logs import current_alert_id
from alertd.ports import Prober, ResultStore, VideoFetcher
from alertd.service import (
    AlreadyRecorded,
    Attempt,
    ConflictingDuplicate,
    Recorded,
    RetryLater,
    process_alert,
)
from alertd.stats import ChildStats

log = logging.getLogger(__name__)

# Headers alertd sets on the messages it republishes (retries, dead letters).
ATTEMPT_HEADER = "x-alertd-attempt"
RECEIVED_AT_HEADER = "x-alertd-received-at"
REASON_HEADER = "x-alertd-reason"
ERROR_HEADER = "x-alertd-last-error"


@dataclass(frozen=True, slots=True)
class InboundMessage:
    body: bytes
    headers: Mapping[str, object]
    redelivered: bool


@dataclass(frozen=True, slots=True)
class Ack:
    """Done with this message (outcome committed, or a duplicate of a committed one)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Not an alert we can ever process: park it in the DLQ with the reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Republish to the delay queue for attempt ``attempt`` after ``delay_s``, then ack."""

    attempt: int
    delay_s: float
    received_at_ms: int
    error: str


@dataclass(frozen=True, slots=True)
class Requeue:
    """Give the message back to the broker untouched (shutdown, lost slot)."""


Disposition = Ack | DeadLetter | Retry | Requeue


class AlertHandler:
    """Callable by the AMQP adapter for every delivery, inside a slot."""

    def __init__(
        self, settings: Settings, *, fetcher: VideoFetcher, prober: Prober,
        store: ResultStore, stats: ChildStats, on_committed: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._fetcher = fetcher
        self._prober = prober
        self._store = store
        self._stats = stats
        self._on_committed = on_committed

    async def __call__(self, message: InboundMessage, slot: int) -> Disposition:
        try:
            alert = parse_alert(message.body, default_webhook_url=self._settings.webhook_url)
        except InvalidMessage as exc:
            self._stats.count("invalid", exc.reason.split(":", 1)[0])
            log.warning("dead-lettering an invalid message: %s", exc.reason)
            return DeadLetter(exc.reason)

        current_alert_id.set(alert.alert_id)
        state = self._stats.slots.get(slot)
        if state is not None:
            state.alert_id = alert.alert_id
        if message.redelivered:
            self._stats.count("redelivered")
        attempt = _attempt_of(message.headers, self._settings.max_attempts)
        started = time.monotonic()
        decision = await process_alert(
            alert,
            attempt=attempt,
            fetcher=self._fetcher,
            prober=self._prober,
            store=self._store,
            default_webhook_url=self._settings.webhook_url,
            on_stage=functools.partial(self._stats.enter_stage, slot),
            sleep=asyncio.sleep,
        )
        match decision:
            # Most common first: a new outcome committed.
            case Recorded(outcome):
                code = str(outcome.failure.code) if outcome.failure else ""
                self._stats.count("alerts", str(outcome.status), code)
                if outcome.metadata is not None:
                    self._stats.count("downloaded_bytes", by=int(outcome.metadata["size_bytes"]))
                self._stats.observe("end_to_end", time.monotonic() - started)
                self._on_committed()
                return Ack()
            case ConflictingDuplicate():
                # The contract: a duplicate alert_id already stored is acked
                # without a second result or webhook. A differing request
                # (most often a producer's retry that rebuilt occurred_at or
                # attributes, sometimes a reused id) is counted and logged so
                # that a producer bug is seen; the stored outcome stands.
                self._stats.count("duplicates")
                self._stats.count("conflicting_duplicates")
                log.warning("alert %s is already stored for a different request (video_url, "
                            "webhook_url, occurred_at, source or attributes differ); acked "
                            "without a second result, the stored outcome stands",
                            alert.alert_id)
                return Ack()
            case AlreadyRecorded():
                self._stats.count("duplicates")
                log.info("alert %s already stored; acking the duplicate", alert.alert_id)
                return Ack()
            case RetryLater(failure):
                self._stats.count("retries", str(failure.code))
                delay = self._settings.retry_delay_for(attempt.number)
                log.info("alert %s attempt %d failed (%s: %s); retry in %.0fs",
                         alert.alert_id, attempt.number, failure.code, failure.message, delay)
                return Retry(attempt.number + 1, delay,
                             int(attempt.received_at.timestamp() * 1000),
                             f"{failure.code}: {failure.message}")


def attempt_number(headers: Mapping[str, object], max_attempts: int) -> int:
    """The attempt a delivery is, from alertd's header: 1..max_attempts.

    The header comes from the broker, so from anyone who can publish: a
    value beyond int4 or 2^1024 must not reach the ``attempts`` column or a
    backoff computation, and one below 1 means a first attempt.
    """
    number = headers.get(ATTEMPT_HEADER)
    if not isinstance(number, int) or number < 1:
        return 1
    return min(number, max_attempts)


def _attempt_of(headers: Mapping[str, object], max_attempts: int) -> Attempt:
    received = headers.get(RECEIVED_AT_HEADER)
    now = dt.datetime.now(dt.UTC)
    received_at = now
    if isinstance(received, int) and received > 0:
        # Set by alertd on a retry; a header from elsewhere may be out of range
        # for a datetime, and every attempt would then fail the same way.
        with contextlib.suppress(ValueError, OverflowError, OSError):
            received_at = dt.datetime.fromtimestamp(received / 1000, dt.UTC)
    return Attempt(
        number=attempt_number(headers, max_attempts),
        max_attempts=max_attempts,
        received_at=received_at,
    )
