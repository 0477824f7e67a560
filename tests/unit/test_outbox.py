"""The outbox dispatcher with fakes: delivery, backoff, Retry-After, 410, limits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence

import pytest

from alertd import outbox as outbox_module
from alertd.errors import StoreUnavailable
from alertd.outbox import BACKOFF_MAX_S, OutboxDispatcher, next_attempt_delay
from alertd.ports import AttemptRecord, DeliveryResult, PendingDelivery
from alertd.stats import ChildStats
from tests.fakes import InMemoryOutbox, RecordingSender


def delivery(n: int = 1, attempts: int = 0) -> PendingDelivery:
    return PendingDelivery(n, f"msg_{n}", f"alert-{n}", "http://hooks.test/h", b"{}", attempts)


async def run_until(dispatcher: OutboxDispatcher, seconds: float = 0.3) -> None:
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(seconds)
    dispatcher.stop()
    await asyncio.wait_for(task, 5)


async def stop_once(dispatcher: OutboxDispatcher, task: asyncio.Task[None],
                    done: Callable[[], bool], within_s: float) -> None:
    """Stop the dispatcher once ``done()`` holds, or after ``within_s`` at the latest."""
    for _ in range(int(within_s * 100)):
        if done():
            break
        await asyncio.sleep(0.01)
    dispatcher.stop()
    await asyncio.wait_for(task, 5)


def dispatcher_for(outbox: InMemoryOutbox, sender: RecordingSender,
                   max_attempts: int = 5) -> OutboxDispatcher:
    return OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=max_attempts, lease_s=60)


async def test_a_pending_webhook_is_delivered_and_its_row_finished() -> None:
    outbox, sender = InMemoryOutbox([delivery()]), RecordingSender()
    await run_until(dispatcher_for(outbox, sender))
    assert [d.webhook_id for d in sender.sent] == ["msg_1"]
    assert outbox.finished == {1: "delivered"}


async def test_a_failed_attempt_is_scheduled_again_with_backoff_not_dropped() -> None:
    outbox = InMemoryOutbox([delivery()])
    sender = RecordingSender([DeliveryResult(ok=False, status_code=500)])
    await run_until(dispatcher_for(outbox, sender))
    [(_, result, retry_in_s)] = outbox.attempts
    assert result.status_code == 500
    assert retry_in_s is not None and retry_in_s > 0
    assert 1 not in outbox.finished


async def test_retry_after_from_the_receiver_is_honoured_when_longer_than_backoff() -> None:
    result = DeliveryResult(ok=False, status_code=503, retry_after=120.0)
    assert next_attempt_delay(1, result) >= 120.0
    assert next_attempt_delay(1, DeliveryResult(ok=False, status_code=503)) <= 1.0


def test_backoff_grows_exponentially_and_is_capped() -> None:
    failed = DeliveryResult(ok=False)
    assert next_attempt_delay(3, failed) <= 4.0
    assert 8.0 <= next_attempt_delay(5, failed) <= 16.0
    assert next_attempt_delay(60, failed) <= BACKOFF_MAX_S
    assert next_attempt_delay(60, DeliveryResult(ok=False, retry_after=1e9)) <= BACKOFF_MAX_S


async def test_a_410_ends_the_row_as_gone_without_retrying() -> None:
    outbox = InMemoryOutbox([delivery()])
    sender = RecordingSender([DeliveryResult(ok=False, status_code=410, gone=True)])
    await run_until(dispatcher_for(outbox, sender))
    assert outbox.finished == {1: "gone"}
    assert outbox.attempts[0][2] is None


async def test_a_permanent_failure_or_the_last_attempt_ends_the_row_as_failed() -> None:
    outbox = InMemoryOutbox([delivery(1), delivery(2, attempts=4)])
    sender = RecordingSender([DeliveryResult(ok=False, permanent=True, error="forbidden"),
                              DeliveryResult(ok=False, status_code=500)])
    await run_until(dispatcher_for(outbox, sender, max_attempts=5))
    assert outbox.finished == {1: "failed", 2: "failed"}


async def test_wake_delivers_a_new_row_before_the_next_poll() -> None:
    outbox, sender = InMemoryOutbox(), RecordingSender()
    dispatcher = dispatcher_for(outbox, sender)
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.05)
    outbox.pending.append(delivery())
    dispatcher.wake()
    await asyncio.sleep(0.1)
    assert len(sender.sent) == 1
    dispatcher.stop()
    await asyncio.wait_for(task, 5)


async def test_the_backlog_gauge_reports_pending_deliveries() -> None:
    outbox = InMemoryOutbox([delivery(1), delivery(2)])
    sender = RecordingSender([DeliveryResult(ok=False, status_code=500)] * 2)
    dispatcher = dispatcher_for(outbox, sender)
    stats = dispatcher._stats
    await run_until(dispatcher, seconds=0.1)
    assert stats.gauges["outbox_backlog"] == 2


class GatedSender:
    """Answers ok, each delivery once its webhook id's gate opens (open ones at once)."""

    def __init__(self, held: Collection[str] = ()) -> None:
        self.gates = {webhook_id: asyncio.Event() for webhook_id in held}
        self.sent: list[str] = []

    async def deliver(self, delivery: PendingDelivery) -> DeliveryResult:
        gate = self.gates.get(delivery.webhook_id)
        if gate is not None:
            await gate.wait()
        self.sent.append(delivery.webhook_id)
        return DeliveryResult(ok=True, status_code=200)


async def test_a_slow_receiver_holds_one_slot_while_the_others_keep_delivering() -> None:
    outbox = InMemoryOutbox([delivery(n) for n in range(1, 8)])
    sender = GatedSender(held={"msg_1"})
    dispatcher = OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=5, lease_s=60,
                                  concurrency=2)
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.3)
    assert sorted(sender.sent) == [f"msg_{n}" for n in range(2, 8)]
    assert 1 not in outbox.finished
    sender.gates["msg_1"].set()
    dispatcher.stop()
    await asyncio.wait_for(task, 5)
    assert outbox.finished == {n: "delivered" for n in range(1, 8)}


class HangingReceiverSender:
    """``dead.test`` never answers (a timeout after ``hang_s``) until ``revive`` is set;
    every other receiver answers after ``answer_s``. ``started`` lists the URLs in order."""

    def __init__(self, hang_s: float, answer_s: float = 0.0) -> None:
        self.hang_s = hang_s
        self.answer_s = answer_s
        self.revive = asyncio.Event()
        self.started: list[str] = []

    async def deliver(self, delivery: PendingDelivery) -> DeliveryResult:
        self.started.append(delivery.url)
        if "dead.test" in delivery.url and not self.revive.is_set():
            await asyncio.sleep(self.hang_s)
            return DeliveryResult(ok=False, error=f"timeout after {self.hang_s}s")
        await asyncio.sleep(self.answer_s)
        return DeliveryResult(ok=True, status_code=200)


def to(receiver: str, n: int) -> PendingDelivery:
    return PendingDelivery(n, f"msg_{n}", f"alert-{n}", f"http://{receiver}/h", b"{}", 0)


async def test_a_receiver_that_never_answers_cannot_hold_up_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 40 due rows for a receiver that hangs, then one for a healthy one. Once
    # dead.test is known not to answer, it gets 1 of the 8 slots' worth of
    # attention (8 // 8) and the healthy row goes out at once. Before, each
    # round took 8 more dead.test rows: the healthy one waited 5 timeouts.
    outbox = InMemoryOutbox([*(to("dead.test", n) for n in range(1, 41)), to("ok.test", 99)])
    sender = HangingReceiverSender(hang_s=0.2)
    dispatcher = OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=5, lease_s=60,
                                  concurrency=8)
    task = asyncio.create_task(dispatcher.run())
    await stop_once(dispatcher, task, lambda: 99 in outbox.finished, within_s=2)
    assert outbox.finished.get(99) == "delivered"
    before_ok = sender.started[:sender.started.index("http://ok.test/h")]
    assert len(before_ok) <= 8 + 1, f"{len(before_ok)} dead.test attempts before ok.test's"
    assert "webhook receiver dead.test does not answer" in caplog.text


async def test_a_receiver_that_answers_again_gets_every_slot_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "alertd.outbox")
    outbox = InMemoryOutbox([to("dead.test", n) for n in range(1, 31)])
    sender = HangingReceiverSender(hang_s=0.1)
    dispatcher = OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=5, lease_s=60,
                                  concurrency=8)
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.15)  # the first round timed out: dead.test gets 1 slot
    sender.revive.set()
    await stop_once(dispatcher, task, lambda: len(outbox.finished) == 30, within_s=3)
    assert outbox.finished == {n: "delivered" for n in range(1, 31)}
    assert "webhook receiver dead.test answers again" in caplog.text


async def test_freed_slots_are_refilled_at_once_while_a_receiver_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hung receiver's rows back off; the backlog of a healthy one must still
    # refill each freed slot at once, not at the next poll (here: never).
    monkeypatch.setattr(outbox_module, "POLL_INTERVAL_S", 60.0)
    outbox = InMemoryOutbox([to("dead.test", 1), *(to("ok.test", n) for n in range(2, 42))])
    sender = HangingReceiverSender(hang_s=0.05, answer_s=0.02)
    dispatcher = OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=5, lease_s=60,
                                  concurrency=4)
    task = asyncio.create_task(dispatcher.run())
    await stop_once(dispatcher, task, lambda: len(outbox.finished) == 40, within_s=5)
    assert len(outbox.finished) == 40, f"{len(outbox.finished)} of 40 healthy rows delivered"
    assert 1 not in outbox.finished  # dead.test's row backs off


class UnansweringClaimFails(InMemoryOutbox):
    """The claim of the unanswering receivers' rows fails, as a database that blinked."""

    async def claim_due(
        self, limit: int, lease_s: float, *, skip_receivers: Collection[str] = (),
        only_receivers: Collection[str] | None = None,
    ) -> Sequence[PendingDelivery]:
        if only_receivers is not None:
            raise StoreUnavailable("database unavailable: connection reset")
        return await super().claim_due(limit, lease_s, skip_receivers=skip_receivers)


async def test_a_failed_second_claim_does_not_strand_the_rows_of_the_first() -> None:
    outbox = UnansweringClaimFails([to("dead.test", 1), *(to("ok.test", n) for n in range(2, 5))])
    sender = HangingReceiverSender(hang_s=0.05)
    dispatcher = OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=5, lease_s=60,
                                  concurrency=8)
    dispatcher._unanswering["dead.test"] = asyncio.get_running_loop().time()
    await run_until(dispatcher, seconds=0.3)
    assert outbox.finished == {2: "delivered", 3: "delivered", 4: "delivered"}


async def test_attempts_that_finish_together_are_recorded_in_one_write() -> None:
    outbox = InMemoryOutbox([delivery(n) for n in range(1, 11)])
    sender = GatedSender(held={f"msg_{n}" for n in range(1, 11)})
    dispatcher = dispatcher_for(outbox, sender)
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.05)
    for gate in sender.gates.values():
        gate.set()
    await asyncio.sleep(0.05)
    assert outbox.writes == [10]
    dispatcher.stop()
    await asyncio.wait_for(task, 5)


async def test_stop_lets_deliveries_in_flight_finish_and_records_them() -> None:
    outbox = InMemoryOutbox([delivery(1)])
    sender = GatedSender(held={"msg_1"})
    dispatcher = dispatcher_for(outbox, sender)
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.05)
    dispatcher.stop()
    await asyncio.sleep(0.05)
    assert not task.done()
    sender.gates["msg_1"].set()
    await asyncio.wait_for(task, 5)
    assert outbox.finished == {1: "delivered"}


class FlakyOutbox(InMemoryOutbox):
    """Refuses the first ``refusals`` writes of attempts, as a database that blinked."""

    refusals: int = 1

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        if self.refusals:
            self.refusals -= 1
            raise StoreUnavailable("database unavailable: connection refused")
        await super().record_attempts(attempts)


async def test_a_refused_write_of_attempts_leaves_the_rows_to_their_lease_and_goes_on() -> None:
    outbox = FlakyOutbox([delivery(1)])
    sender = GatedSender()
    dispatcher = dispatcher_for(outbox, sender)
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.1)
    assert sender.sent == ["msg_1"] and outbox.finished == {}  # sent, not recorded
    outbox.pending.append(delivery(2))
    dispatcher.wake()
    await asyncio.sleep(0.1)
    dispatcher.stop()
    await asyncio.wait_for(task, 5)
    assert outbox.finished == {2: "delivered"}


class BrokenOutbox(InMemoryOutbox):
    """Fails to record attempts with a bug (not an outage)."""

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        raise ValueError("a bug in the store")


async def test_a_recorder_bug_stops_the_dispatcher_loudly_instead_of_resending_forever(
) -> None:
    outbox = BrokenOutbox([delivery(1)])
    sender = GatedSender()
    dispatcher = OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=5, lease_s=0.05)
    with pytest.raises(ValueError, match="a bug in the store"):
        await asyncio.wait_for(dispatcher.run(), 5)
    assert sender.sent == ["msg_1"]


class RaisingSender:
    async def deliver(self, delivery: PendingDelivery) -> DeliveryResult:
        raise KeyError("a bug in the sender")


async def test_a_sender_bug_is_recorded_as_a_failed_attempt_so_the_row_backs_off() -> None:
    outbox = InMemoryOutbox([delivery(1)])
    await run_until(dispatcher_for(outbox, RaisingSender()))  # type: ignore[arg-type]
    [(_, result, retry_in_s)] = outbox.attempts
    assert not result.ok and result.error == "internal_error: KeyError"
    assert retry_in_s is not None  # retried later, with backoff, up to max attempts


def test_backoff_stays_capped_however_many_attempts_were_made() -> None:
    failed = DeliveryResult(ok=False, status_code=500)
    for attempts in (1024, 1025, 10**6):
        assert BACKOFF_MAX_S / 2 <= next_attempt_delay(attempts, failed) <= BACKOFF_MAX_S


async def test_a_row_past_a_thousand_attempts_is_scheduled_again_not_resent_every_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox_module, "POLL_INTERVAL_S", 0.02)  # several leases in the run
    outbox = InMemoryOutbox([delivery(1, attempts=1024)])
    sender = RecordingSender([DeliveryResult(ok=False, status_code=500)] * 10)
    dispatcher = OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=10**6,
                                  lease_s=0.05)
    await run_until(dispatcher)
    assert len(sender.sent) == 1
    [(_, _, retry_in_s)] = outbox.attempts
    assert retry_in_s is not None and retry_in_s >= BACKOFF_MAX_S / 2


async def test_a_bug_after_the_post_still_records_the_attempt_and_ends_the_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(attempts_made: int, result: DeliveryResult) -> float:
        raise ArithmeticError("a bug in the backoff")
    monkeypatch.setattr(outbox_module, "next_attempt_delay", broken)
    monkeypatch.setattr(outbox_module, "POLL_INTERVAL_S", 0.02)
    outbox = InMemoryOutbox([delivery(1)])
    sender = RecordingSender([DeliveryResult(ok=False, status_code=500)] * 10)
    dispatcher = OutboxDispatcher(outbox, sender, ChildStats(), max_attempts=5, lease_s=0.05)
    await run_until(dispatcher)
    assert len(sender.sent) == 1  # not once a lease
    assert outbox.finished == {1: "failed"}  # `alertd outbox list` shows it


async def test_cancelled_the_dispatcher_leaves_no_delivery_running() -> None:
    outbox = InMemoryOutbox([delivery(1), delivery(2)])
    sender = GatedSender(held={"msg_1", "msg_2"})
    dispatcher = dispatcher_for(outbox, sender)
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.05)
    in_flight = list(dispatcher._in_flight)
    assert len(in_flight) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(t.done() for t in in_flight)
    assert outbox.finished == {}  # unrecorded: their leases run out, same webhook-id
