"""AckBatcher: slots that finish together share an ack frame; no ack covers an unfinished one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from alertd.adapters.amqp import AckBatcher

Frame = tuple[str, int, bool]


class BrokerChannel:
    """A channel as RabbitMQ applies acks and nacks to it, behind aiormq's write queue.

    Frames go through a bounded queue (aiormq's holds 10), so a sender can be
    suspended, cancelled while suspended, or overtaken by a later sender; a
    drainer applies them in queue order while ``flowing`` is set (cleared: a
    socket that does not drain). An ack or nack of a tag that is not
    outstanding is what the broker answers with PRECONDITION_FAILED ("unknown
    delivery tag"), closing the channel; a multiple ack covers every
    outstanding tag up to its own (checked against the real broker).
    """

    is_closed = False

    def __init__(self, room: int) -> None:
        self.queue: asyncio.Queue[Frame] = asyncio.Queue(maxsize=room)
        self.outstanding: set[int] = set()
        self.finished: set[int] = set()  # tags whose slot is done and asked for an ack
        self.frames: list[Frame] = []
        self.errors: list[str] = []
        self.flowing = asyncio.Event()
        self.flowing.set()

    def deliver(self, tag: int) -> None:
        self.outstanding.add(tag)

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await self.queue.put(("ack", tag, multiple))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True,
                         wait: bool = True) -> None:
        await self.queue.put(("nack", tag, multiple))

    async def apply_frames(self) -> None:
        while True:
            await self.flowing.wait()
            frame = await self.queue.get()
            self.apply(frame)
            self.queue.task_done()

    def apply(self, frame: Frame) -> None:
        self.frames.append(frame)
        kind, tag, multiple = frame
        if tag not in self.outstanding:
            self.errors.append(f"{kind} of unknown delivery tag {tag}")
            return
        settled = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        if kind == "ack" and (unfinished := settled - self.finished):
            self.errors.append(f"ack {tag} multiple={multiple} covers unfinished {unfinished}")
        self.outstanding -= settled


@asynccontextmanager
async def broker(room: int = 10) -> AsyncIterator[tuple[AckBatcher, BrokerChannel]]:
    channel = BrokerChannel(room)
    drainer = asyncio.create_task(channel.apply_frames())
    try:
        yield AckBatcher(channel), channel  # type: ignore[arg-type]  # the methods used
    finally:
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)


def deliver(acks: AckBatcher, channel: BrokerChannel, *tags: int) -> None:
    for tag in tags:
        channel.deliver(tag)
        acks.received(tag)


async def finish(acks: AckBatcher, channel: BrokerChannel, tag: int) -> None:
    channel.finished.add(tag)
    await acks.ack(tag)


async def test_slots_finishing_in_one_pass_share_one_frame() -> None:
    async with broker() as (acks, channel):
        deliver(acks, channel, *range(1, 9))
        await asyncio.gather(*(finish(acks, channel, tag) for tag in (3, 1, 8, 2, 5, 4, 7, 6)))
        await channel.queue.join()
    assert channel.frames == [("ack", 8, True)]
    assert not channel.outstanding and not channel.errors


async def test_a_delivery_still_in_its_slot_is_never_covered() -> None:
    async with broker() as (acks, channel):
        deliver(acks, channel, *range(1, 7))
        await asyncio.gather(*(finish(acks, channel, tag) for tag in (1, 2, 4, 6)))
        await channel.queue.join()
        assert channel.frames == [("ack", 2, True), ("ack", 4, False), ("ack", 6, False)]
        assert channel.outstanding == {3, 5}
        await finish(acks, channel, 5)
        await finish(acks, channel, 3)
        await channel.queue.join()
    assert channel.frames[3:] == [("ack", 5, False), ("ack", 3, False)]
    assert not channel.outstanding and not channel.errors


async def test_a_lone_ack_is_a_single_frame() -> None:
    async with broker() as (acks, channel):
        deliver(acks, channel, 1)
        await finish(acks, channel, 1)
        await channel.queue.join()
    assert channel.frames == [("ack", 1, False)]


async def test_a_nacked_tag_no_longer_holds_back_the_ones_after_it() -> None:
    async with broker() as (acks, channel):
        deliver(acks, channel, 1, 2, 3)
        await acks.nack(1)
        await asyncio.gather(finish(acks, channel, 2), finish(acks, channel, 3))
        await channel.queue.join()
    assert channel.frames == [("nack", 1, False), ("ack", 3, True)]
    assert not channel.errors


async def test_a_nack_cancelled_before_it_was_queued_still_holds_back_later_acks() -> None:
    """The nack never reached the broker: a multiple ack over its tag would ack an
    alert that was never handled (lost)."""
    async with broker(room=1) as (acks, channel):
        deliver(acks, channel, 1, 2, 3, 4)
        channel.flowing.clear()
        await asyncio.sleep(0)  # the drainer stops
        await finish(acks, channel, 4)  # fills the queue
        nacking = asyncio.create_task(acks.nack(1))
        await asyncio.sleep(0)  # suspended: no room for the nack
        nacking.cancel()
        await asyncio.gather(nacking, return_exceptions=True)
        channel.flowing.set()
        await asyncio.gather(finish(acks, channel, 2), finish(acks, channel, 3))
        await channel.queue.join()
    assert channel.frames == [("ack", 4, False), ("ack", 2, False), ("ack", 3, False)]
    assert channel.outstanding == {1}  # comes back to the broker when the channel closes
    assert not channel.errors


async def test_a_flush_waiting_for_room_is_not_overtaken_by_the_next() -> None:
    """asyncio.Queue lets a new put pass a putter that was just woken; two multiple
    acks queued out of order would ack a tag twice (PRECONDITION_FAILED)."""
    async with broker(room=1) as (acks, channel):
        deliver(acks, channel, *range(1, 6))
        channel.flowing.clear()
        await asyncio.sleep(0)  # the drainer stops
        await finish(acks, channel, 5)  # fills the queue
        first = asyncio.gather(finish(acks, channel, 1), finish(acks, channel, 2))
        for _ in range(3):
            await asyncio.sleep(0)  # waiting for room to queue ack(2, multiple)
        # Scheduled before the drainer frees room: without one flush at a time,
        # this one's ack(4, multiple) is queued first and ack(2, multiple) fails.
        second = asyncio.gather(finish(acks, channel, 3), finish(acks, channel, 4))
        channel.flowing.set()
        await asyncio.gather(first, second)
        await channel.queue.join()
    assert channel.frames == [("ack", 5, False), ("ack", 2, True), ("ack", 4, True)]
    assert not channel.outstanding and not channel.errors


async def test_acks_of_a_flush_cancelled_mid_way_are_sent_by_the_next() -> None:
    async with broker(room=1) as (acks, channel):
        deliver(acks, channel, 1, 2, 3, 4)
        channel.flowing.clear()
        await asyncio.sleep(0)  # the drainer stops
        await finish(acks, channel, 4)  # fills the queue
        flushing = asyncio.gather(*(finish(acks, channel, tag) for tag in (1, 2, 3)))
        for _ in range(3):
            await asyncio.sleep(0)  # the gatherer is now waiting to queue ack(3, multiple)
        flushing.cancel()
        await asyncio.gather(flushing, return_exceptions=True)
        channel.flowing.set()
        await acks.flush()  # what closing the connection does
        await channel.queue.join()
    assert channel.frames == [("ack", 4, False), ("ack", 3, True)]
    assert not channel.outstanding and not channel.errors


async def test_flush_sends_what_a_cancelled_gatherer_left() -> None:
    async with broker() as (acks, channel):
        deliver(acks, channel, 1, 2)
        gatherer = asyncio.create_task(finish(acks, channel, 1))
        await asyncio.sleep(0)  # it is now waiting for the pass to end
        gatherer.cancel()
        await asyncio.gather(gatherer, return_exceptions=True)
        await channel.queue.join()
        assert channel.frames == []
        await acks.flush()
        await channel.queue.join()
    assert channel.frames == [("ack", 1, False)]
    assert not channel.errors


STEPS = st.lists(st.tuples(st.sampled_from(["receive", "finish", "nack", "pass", "cancel",
                                            "stall", "flow"]),
                           st.integers(0, 63)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 20), room=st.integers(1, 4), steps=STEPS)
def test_any_interleaving_acks_exactly_the_finished_deliveries(
    total: int, room: int, steps: list[tuple[str, int]],
) -> None:
    """Deliveries arrive in order while others finish (ack) or are handed back (nack)
    in any order, through a write queue with little room that may stop draining, with
    loop passes between and any of those acks and nacks cancelled on the way; whatever
    is left finishes at the end, then the batcher is flushed as on close.

    Never an ack of an unfinished delivery, never a tag settled twice; every finished
    delivery acked; only a delivery whose settling was cancelled may stay out."""

    async def scenario() -> tuple[BrokerChannel, set[int]]:
        cancelled: set[int] = set()
        async with broker(room) as (acks, channel):
            received = 0
            in_slots: list[int] = []
            settling: dict[int, asyncio.Task[None]] = {}

            def receive() -> None:
                nonlocal received
                received += 1
                deliver(acks, channel, received)
                in_slots.append(received)

            for step, pick in steps:
                if step == "receive" and received < total:
                    receive()
                elif step in ("finish", "nack") and in_slots:
                    tag = in_slots.pop(pick % len(in_slots))
                    settling[tag] = asyncio.create_task(
                        finish(acks, channel, tag) if step == "finish" else acks.nack(tag))
                elif step == "stall":
                    channel.flowing.clear()
                elif step == "flow":
                    channel.flowing.set()
                elif step == "cancel" and settling:
                    tag = sorted(settling)[pick % len(settling)]
                    if not settling[tag].done():
                        settling[tag].cancel()
                        cancelled.add(tag)
                else:
                    await asyncio.sleep(0)
            channel.flowing.set()
            while received < total:
                receive()
            for tag in in_slots:
                settling[tag] = asyncio.create_task(finish(acks, channel, tag))
            await asyncio.gather(*settling.values(), return_exceptions=True)
            await acks.flush()
            await channel.queue.join()
        return channel, cancelled

    channel, cancelled = asyncio.run(scenario())
    assert channel.errors == []
    assert channel.outstanding <= cancelled
    assert not channel.outstanding & channel.finished
