"""The use case: one alert from message to committed outcome, as small readable steps."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from alertd.domain import (
    JSON,
    Alert,
    Failure,
    Outcome,
    Stage,
    webhook_event,
)
from alertd.errors import PermanentError, StoreUnavailable, TransientError
from alertd.ports import Prober, ResultStore, VideoFetcher

T = TypeVar("T")

Clock = Callable[[], dt.datetime]
Sleep = Callable[[float], Awaitable[None]]
StageReporter = Callable[[Stage], None]


@dataclass(frozen=True, slots=True)
class Attempt:
    """Which try of an alert this is, and when alertd first received it."""

    number: int
    max_attempts: int
    received_at: dt.datetime

    @property
    def is_last(self) -> bool:
        return self.number >= self.max_attempts


@dataclass(frozen=True, slots=True)
class Recorded:
    """This delivery's outcome is committed, with its outbox row."""

    outcome: Outcome


@dataclass(frozen=True, slots=True)
class AlreadyRecorded:
    """A redelivery or duplicate of an alert whose outcome is already committed."""


@dataclass(frozen=True, slots=True)
class ConflictingDuplicate:
    """The alert id is already stored for a different request: a producer reused it."""


@dataclass(frozen=True, slots=True)
class RetryLater:
    """A transient failure with attempts left: try again after a delay, off the slot."""

    failure: Failure


Decision = Recorded | AlreadyRecorded | ConflictingDuplicate | RetryLater


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def process_alert(
    alert: Alert,
    *,
    attempt: Attempt,
    fetcher: VideoFetcher,
    prober: Prober,
    store: ResultStore,
    default_webhook_url: str | None = None,
    on_stage: StageReporter = lambda stage: None,
    clock: Clock = utc_now,
    sleep: Sleep,
) -> Decision:
    """Process one alert; the caller acks once this returns (never before).

    Store outages do not fail the alert: the store calls wait and try again
    until they succeed or the task is cancelled at shutdown, so an alert is
    never failed or acked because the database blinked.
    """
    on_stage(Stage.DEDUP)
    if (seen := await _already_stored(alert, store, sleep)) is not None:
        return seen

    try:
        metadata = await extract_metadata(alert, fetcher=fetcher, prober=prober, on_stage=on_stage)
    except TransientError as exc:
        if not attempt.is_last:
            return RetryLater(Failure.from_error(exc))
        outcome = _failed(alert, Failure.from_error(exc), attempt, clock)
    except PermanentError as exc:
        outcome = _failed(alert, Failure.from_error(exc), attempt, clock)
    else:
        outcome = Outcome.done(
            alert, metadata, attempts=attempt.number,
            received_at=attempt.received_at, processed_at=clock(),
        )

    on_stage(Stage.STORE)
    event = webhook_event(outcome, default_url=default_webhook_url)
    if await _until_store_answers(lambda: store.record_outcome(outcome, event), sleep):
        return Recorded(outcome)
    # Another delivery of this id committed first while this one was processed:
    # a redelivery racing the original, or a producer reusing the id at once.
    return await _already_stored(alert, store, sleep) or AlreadyRecorded()


async def _already_stored(alert: Alert, store: ResultStore,
                          sleep: Sleep) -> AlreadyRecorded | ConflictingDuplicate | None:
    """None when no outcome for the alert's id is committed; else whether it was this request."""
    stored = await _until_store_answers(lambda: store.recorded_fingerprint(alert.alert_id), sleep)
    if stored is None:
        return None
    if stored and stored != alert.fingerprint:
        return ConflictingDuplicate()
    return AlreadyRecorded()


async def extract_metadata(
    alert: Alert, *, fetcher: VideoFetcher, prober: Prober, on_stage: StageReporter,
) -> JSON:
    """Download the clip and probe it; the downloaded file is gone when this returns."""
    on_stage(Stage.DOWNLOAD)
    async with fetcher.fetch_video(alert.video_url) as video:
        on_stage(Stage.PROBE)
        metadata = await prober.probe(video.path)
    return {**metadata, "size_bytes": video.size_bytes, "sha256": video.sha256}


def _failed(alert: Alert, failure: Failure, attempt: Attempt, clock: Clock) -> Outcome:
    return Outcome.failed(
        alert, failure, attempts=attempt.number,
        received_at=attempt.received_at, processed_at=clock(),
    )


STORE_RETRY_FIRST_S = 0.5
STORE_RETRY_MAX_S = 15.0


async def _until_store_answers(call: Callable[[], Awaitable[T]], sleep: Sleep) -> T:
    delay = STORE_RETRY_FIRST_S
    while True:
        try:
            return await call()
        except StoreUnavailable:
            # Jitter so that every slot of every child does not hit a
            # recovering database in the same instant.
            await sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, STORE_RETRY_MAX_S)
