"""From a broker message to a disposition: what gets acked, dead-lettered or retried."""

from __future__ import annotations

import datetime as dt

import orjson

from alertd.config import Settings
from alertd.errors import ErrorCode, TransientError
from alertd.handler import (
    ATTEMPT_HEADER,
    RECEIVED_AT_HEADER,
    Ack,
    AlertHandler,
    DeadLetter,
    InboundMessage,
    Retry,
)
from alertd.stats import ChildStats
from tests.fakes import FakeFetcher, FakeProber, InMemoryStore

URL = "http://clips.test/a.mp4"
BODY = orjson.dumps({"alert_id": "h-1", "video_url": URL, "webhook_url": "http://h.test/"})


def handler(fetcher: FakeFetcher | None = None, store: InMemoryStore | None = None,
            committed: list[int] | None = None) -> tuple[AlertHandler, ChildStats]:
    stats = ChildStats()
    sink = committed if committed is not None else []
    return AlertHandler(
        Settings(max_attempts=3, retry_delay=2.0), fetcher=fetcher or FakeFetcher(),
        prober=FakeProber(), store=store if store is not None else InMemoryStore(),
        stats=stats, on_committed=lambda: sink.append(1),
    ), stats


async def test_an_invalid_body_is_dead_lettered_with_its_reason() -> None:
    handle, stats = handler()
    disposition = await handle(InboundMessage(b"nope", {}, False), stats.open_slot())
    assert isinstance(disposition, DeadLetter)
    assert disposition.reason.startswith("invalid_json")
    assert stats.counters[("invalid", "invalid_json")] == 1


async def test_a_stored_alert_is_acked_and_wakes_the_outbox() -> None:
    committed: list[int] = []
    handle, stats = handler(committed=committed)
    assert await handle(InboundMessage(BODY, {}, False), stats.open_slot()) == Ack()
    assert committed == [1]
    assert stats.counters[("alerts", "done", "")] == 1


async def test_a_duplicate_is_acked_without_waking_the_outbox() -> None:
    store, committed = InMemoryStore(), []
    handle, stats = handler(store=store, committed=committed)
    await handle(InboundMessage(BODY, {}, False), stats.open_slot())
    assert await handle(InboundMessage(BODY, {}, True), stats.open_slot()) == Ack()
    assert committed == [1]
    assert stats.counters[("duplicates",)] == 1
    assert stats.counters[("redelivered",)] == 1


async def test_a_commit_whose_reply_was_lost_counts_as_an_alert_and_wakes_the_outbox() -> None:
    store, committed = InMemoryStore(lost_replies=1), []
    handle, stats = handler(store=store, committed=committed)
    assert await handle(InboundMessage(BODY, {}, False), stats.open_slot()) == Ack()
    assert committed == [1]
    assert stats.counters[("alerts", "done", "")] == 1
    assert ("duplicates",) not in stats.counters


async def test_a_transient_failure_asks_for_the_next_attempt_after_a_doubling_delay() -> None:
    fetcher = FakeFetcher({URL: TransientError(ErrorCode.DOWNLOAD_TIMEOUT, "slow")})
    handle, stats = handler(fetcher=fetcher)
    first = await handle(InboundMessage(BODY, {}, False), stats.open_slot())
    assert isinstance(first, Retry) and first.attempt == 2 and first.delay_s == 2.0
    second = await handle(InboundMessage(BODY, {ATTEMPT_HEADER: 2,
                                                RECEIVED_AT_HEADER: first.received_at_ms},
                                         False), stats.open_slot())
    assert isinstance(second, Retry) and second.attempt == 3 and second.delay_s == 4.0
    assert second.received_at_ms == first.received_at_ms


async def test_the_last_attempt_is_stored_as_failed_and_acked() -> None:
    store = InMemoryStore()
    fetcher = FakeFetcher({URL: TransientError(ErrorCode.DOWNLOAD_FAILED, "HTTP 503")})
    handle, stats = handler(fetcher=fetcher, store=store)
    headers = {ATTEMPT_HEADER: 3, RECEIVED_AT_HEADER: 1_700_000_000_000}
    assert await handle(InboundMessage(BODY, headers, True), stats.open_slot()) == Ack()
    row = store.rows["h-1"]
    assert row.attempts == 3
    assert row.received_at.timestamp() == 1_700_000_000
    assert stats.counters[("alerts", "failed", "download_failed")] == 1


async def test_the_slot_reports_its_alert_id_while_busy() -> None:
    handle, stats = handler()
    slot = stats.open_slot()
    await handle(InboundMessage(BODY, {}, False), slot)
    assert stats.slots[slot].alert_id == "h-1"
    stats.close_slot(slot)
    assert stats.slots == {}


async def test_a_reused_alert_id_for_another_request_is_acked_counted_and_not_stored_again(
) -> None:
    # Issue 2: a duplicate alert_id already stored is acked without a second
    # result or webhook, whatever else the message says.
    store = InMemoryStore()
    handle, stats = handler(store=store)
    await handle(InboundMessage(BODY, {}, False), stats.open_slot())
    other = orjson.dumps({"alert_id": "h-1", "video_url": "http://clips.test/b.mp4",
                          "webhook_url": "http://h.test/"})
    disposition = await handle(InboundMessage(other, {}, False), stats.open_slot())
    assert disposition == Ack()
    assert len(store.rows) == 1 and len(store.outbox) == 1
    assert store.rows["h-1"].alert.video_url != "http://clips.test/b.mp4"
    assert stats.counters[("duplicates",)] == 1
    assert stats.counters[("conflicting_duplicates",)] == 1
    assert ("invalid", "duplicate_alert_id") not in stats.counters


async def test_a_received_at_header_out_of_range_is_ignored_not_a_crash() -> None:
    store = InMemoryStore()
    handle, stats = handler(store=store)
    headers = {ATTEMPT_HEADER: 2, RECEIVED_AT_HEADER: 10**15}
    assert await handle(InboundMessage(BODY, headers, False), stats.open_slot()) == Ack()
    row = store.rows["h-1"]
    assert row.attempts == 2 and row.received_at.year == dt.datetime.now(dt.UTC).year


async def test_an_attempt_header_out_of_range_is_clamped_to_the_attempts_alertd_allows() -> None:
    # Anyone who can publish sets headers: 2^40 would not fit the int4
    # ``attempts`` column, and the alert would end in the DLQ unstored.
    store = InMemoryStore()
    handle, stats = handler(store=store)
    for alert_id, number, stored in (("big", 2**40, 3), ("zero", 0, 1), ("neg", -5, 1)):
        body = orjson.dumps({"alert_id": alert_id, "video_url": "http://clips.test/a.mp4",
                             "webhook_url": "http://h.test/"})
        assert await handle(InboundMessage(body, {ATTEMPT_HEADER: number}, False),
                            stats.open_slot()) == Ack()
        assert store.rows[alert_id].attempts == stored
