"""The use case with fakes: what gets stored, retried or skipped for one alert."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from alertd.domain import Alert, DownloadedVideo, Stage, Status
from alertd.errors import ErrorCode, PermanentError, TransientError
from alertd.service import (
    AlreadyRecorded,
    Attempt,
    ConflictingDuplicate,
    Recorded,
    RetryLater,
    process_alert,
)
from tests.fakes import FakeFetcher, FakeProber, InMemoryStore, no_sleep

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
ALERT = Alert(alert_id="a-1", video_url="http://clips.test/a.mp4",
              webhook_url="http://hooks.test/h", attributes={"camera": 7})


def first_attempt(max_attempts: int = 3, number: int = 1) -> Attempt:
    return Attempt(number=number, max_attempts=max_attempts, received_at=T0)


async def run(alert: Alert = ALERT, *, fetcher: FakeFetcher | None = None,
              prober: FakeProber | None = None, store: InMemoryStore | None = None,
              attempt: Attempt | None = None, stages: list[Stage] | None = None,
              default_webhook_url: str | None = None,
              processed_at: dt.datetime = T0):  # type: ignore[no-untyped-def]
    return await process_alert(
        alert, attempt=attempt or first_attempt(), fetcher=fetcher or FakeFetcher(),
        prober=prober or FakeProber(), store=store if store is not None else InMemoryStore(),
        default_webhook_url=default_webhook_url,
        on_stage=(stages.append if stages is not None else lambda s: None),
        clock=lambda: processed_at, sleep=no_sleep,
    )


async def test_a_good_clip_is_stored_done_with_size_and_hash_and_one_webhook() -> None:
    store = InMemoryStore()
    fetcher = FakeFetcher({ALERT.video_url: DownloadedVideo("/tmp/x.mp4", 4242, "cd" * 32)})
    decision = await run(fetcher=fetcher, store=store)
    assert isinstance(decision, Recorded)
    row = store.rows["a-1"]
    assert row.status is Status.DONE and row.failure is None
    assert row.metadata is not None
    assert row.metadata["size_bytes"] == 4242 and row.metadata["sha256"] == "cd" * 32
    assert row.metadata["video"]["codec"] == "h264"
    [event] = store.outbox
    assert event.url == "http://hooks.test/h"
    assert event.payload["type"] == "alert.processed"
    assert event.payload["attributes"] == {"camera": 7}
    assert event.payload["error"] is None
    assert fetcher.open_files == 0


async def test_the_stages_are_reported_in_pipeline_order() -> None:
    stages: list[Stage] = []
    await run(stages=stages)
    assert stages == [Stage.DEDUP, Stage.DOWNLOAD, Stage.PROBE, Stage.STORE]


async def test_an_alert_already_stored_is_skipped_without_download_or_webhook() -> None:
    store = InMemoryStore()
    await run(store=store)
    fetcher = FakeFetcher()
    decision = await run(store=store, fetcher=fetcher)
    assert isinstance(decision, AlreadyRecorded)
    assert fetcher.fetched == []
    assert len(store.outbox) == 1


async def test_a_permanent_error_fails_at_once_with_its_code_and_notifies() -> None:
    store = InMemoryStore()
    not_found = PermanentError(ErrorCode.DOWNLOAD_NOT_FOUND, "HTTP 404")
    fetcher = FakeFetcher({ALERT.video_url: not_found})
    decision = await run(fetcher=fetcher, store=store)
    assert isinstance(decision, Recorded)
    row = store.rows["a-1"]
    assert row.status is Status.FAILED and row.metadata is None
    assert row.failure is not None and row.failure.code is ErrorCode.DOWNLOAD_NOT_FOUND
    assert store.outbox[0].payload["type"] == "alert.failed"
    assert store.outbox[0].payload["error"] == {"code": "download_not_found", "message": "HTTP 404"}


async def test_a_transient_error_with_attempts_left_asks_for_a_retry_and_stores_nothing() -> None:
    store = InMemoryStore()
    fetcher = FakeFetcher({ALERT.video_url: TransientError(ErrorCode.DOWNLOAD_TIMEOUT, "read")})
    decision = await run(fetcher=fetcher, store=store, attempt=first_attempt(3, 2))
    assert isinstance(decision, RetryLater)
    assert decision.failure.code is ErrorCode.DOWNLOAD_TIMEOUT
    assert store.rows == {} and store.outbox == []


async def test_a_transient_error_on_the_last_attempt_is_recorded_as_failed() -> None:
    store = InMemoryStore()
    fetcher = FakeFetcher({ALERT.video_url: TransientError(ErrorCode.DOWNLOAD_FAILED, "HTTP 503")})
    decision = await run(fetcher=fetcher, store=store, attempt=first_attempt(3, 3))
    assert isinstance(decision, Recorded)
    assert store.rows["a-1"].attempts == 3
    assert store.rows["a-1"].failure is not None
    assert store.rows["a-1"].failure.code is ErrorCode.DOWNLOAD_FAILED


async def test_a_probe_failure_is_recorded_as_not_a_video() -> None:
    store = InMemoryStore()
    fetcher = FakeFetcher({ALERT.video_url: DownloadedVideo("/tmp/bad", 10, "00" * 32)})
    prober = FakeProber(errors={"/tmp/bad": PermanentError(ErrorCode.NOT_A_VIDEO, "no stream")})
    await run(fetcher=fetcher, prober=prober, store=store)
    assert store.rows["a-1"].failure is not None
    assert store.rows["a-1"].failure.code is ErrorCode.NOT_A_VIDEO
    assert fetcher.open_files == 0


async def test_a_store_outage_is_waited_out_not_turned_into_a_failure() -> None:
    store = InMemoryStore(outages=4)
    decision = await run(store=store)
    assert isinstance(decision, Recorded)
    assert store.rows["a-1"].status is Status.DONE
    assert store.calls == 6


async def test_the_default_webhook_url_is_used_when_the_alert_has_none() -> None:
    store = InMemoryStore()
    alert = Alert(alert_id="a-2", video_url="http://clips.test/b.mp4")
    await run(alert, store=store, default_webhook_url="http://default.test/h")
    assert store.outbox[0].url == "http://default.test/h"


async def test_received_at_and_processed_at_are_kept_on_the_row() -> None:
    store = InMemoryStore()
    await run(store=store)
    assert store.rows["a-1"].received_at == T0
    assert store.rows["a-1"].processed_at == T0


async def test_a_reused_alert_id_with_a_different_request_is_a_conflict_not_a_duplicate() -> None:
    store = InMemoryStore()
    await run(store=store)
    reused = Alert(alert_id="a-1", video_url="http://clips.test/other.mp4",
                   webhook_url="http://hooks.test/h", attributes={"camera": 7})
    fetcher = FakeFetcher()
    decision = await run(reused, store=store, fetcher=fetcher)
    assert isinstance(decision, ConflictingDuplicate)
    assert fetcher.fetched == [] and len(store.outbox) == 1


@dataclass
class RacedFetcher(FakeFetcher):
    """While this delivery downloads, another delivery of ``racer`` commits first
    (its processing ended at another moment)."""

    racer: Alert = ALERT
    store: InMemoryStore = field(default_factory=InMemoryStore)

    @asynccontextmanager
    async def fetch_video(self, url: str) -> AsyncIterator[DownloadedVideo]:
        racer = await run(self.racer, store=self.store, processed_at=T0 - dt.timedelta(seconds=1))
        assert isinstance(racer, Recorded)
        async with super().fetch_video(url) as video:
            yield video


async def test_a_redelivery_that_loses_the_race_to_commit_is_a_duplicate() -> None:
    store = InMemoryStore()
    decision = await run(store=store, fetcher=RacedFetcher(store=store))
    assert isinstance(decision, AlreadyRecorded)
    assert len(store.outbox) == 1


async def test_a_reused_id_that_loses_the_race_to_commit_is_a_conflict_not_a_duplicate() -> None:
    store = InMemoryStore()
    reused = Alert(alert_id="a-1", video_url="http://clips.test/other.mp4",
                   webhook_url="http://hooks.test/h", attributes={"camera": 7})
    decision = await run(reused, store=store, fetcher=RacedFetcher(store=store))
    assert isinstance(decision, ConflictingDuplicate)
    assert store.rows["a-1"].alert == ALERT and len(store.outbox) == 1


async def test_a_commit_whose_reply_was_lost_is_recorded_not_counted_as_a_duplicate() -> None:
    """The connection drops after COMMIT: the store call fails, is tried again and
    finds the outcome it committed itself. The handler then counts a processed alert
    and wakes the dispatcher, as for any commit."""
    store = InMemoryStore(lost_replies=1)
    decision = await run(store=store)
    assert isinstance(decision, Recorded)
    assert len(store.rows) == 1 and len(store.outbox) == 1


def test_the_fingerprint_ignores_the_id_and_key_order_but_not_the_request() -> None:
    a = Alert("x", "http://v/1", "http://h/", attributes={"a": 1, "b": {"c": 2, "d": 3}})
    b = Alert("y", "http://v/1", "http://h/", attributes={"b": {"d": 3, "c": 2}, "a": 1})
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != Alert("x", "http://v/2", "http://h/", attributes=a.attributes
                                  ).fingerprint
