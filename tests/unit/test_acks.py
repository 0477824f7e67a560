"""AckBatcher: slots that finish together share an ack frame; no ack covers an unfinished one."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from alertd.adapters.amqp import AckBatcher


class BrokerChannel:
    """A channel as RabbitMQ applies acks to it; records every frame and every wrong ack.

    An ack of a tag that is not outstanding is what the broker answers with
    PRECONDITION_FAILED ("unknown delivery tag"), closing the channel.
    """

    is_closed = False

    def __init__(self) -> None:
        self.outstanding: set[int] = set()
        self.finished: set[int] = set()  # tags whose slot is done and asked for an ack
        self.frames: list[tuple[str, int, bool]] = []
        self.errors: list[str] = []

    def deliver(self, tag: int) -> None:
        self.outstanding.add(tag)

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.frames.append(("ack", tag, multiple))
        if tag not in self.outstanding:
            self.errors.append(f"ack of unknown delivery tag {tag}")
            return
        acked = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        if unfinished := acked - self.finished:
            self.errors.append(f"ack {tag} multiple={multiple} covers unfinished {unfinished}")
        self.outstanding -= acked

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True,
                         wait: bool = True) -> None:
        self.frames.append(("nack", tag, multiple))
        if tag not in self.outstanding:
            self.errors.append(f"nack of unknown delivery tag {tag}")
        self.outstanding.discard(tag)


def batcher() -> tuple[AckBatcher, BrokerChannel]:
    channel = BrokerChannel()
    return AckBatcher(channel), channel  # type: ignore[arg-type]  # the methods used


async def finish(acks: AckBatcher, channel: BrokerChannel, tag: int) -> None:
    channel.finished.add(tag)
    await acks.ack(tag)


async def test_slots_finishing_in_one_pass_share_one_frame() -> None:
    acks, channel = batcher()
    for tag in range(1, 9):
        channel.deliver(tag)
        acks.received(tag)
    await asyncio.gather(*(finish(acks, channel, tag) for tag in (3, 1, 8, 2, 5, 4, 7, 6)))
    assert channel.frames == [("ack", 8, True)]
    assert not channel.outstanding and not channel.errors


async def test_a_delivery_still_in_its_slot_is_never_covered() -> None:
    acks, channel = batcher()
    for tag in range(1, 7):
        channel.deliver(tag)
        acks.received(tag)
    await asyncio.gather(*(finish(acks, channel, tag) for tag in (1, 2, 4, 6)))
    assert channel.frames == [("ack", 2, True), ("ack", 4, False), ("ack", 6, False)]
    assert channel.outstanding == {3, 5}
    await finish(acks, channel, 5)
    await finish(acks, channel, 3)
    assert channel.frames[3:] == [("ack", 5, False), ("ack", 3, False)]
    assert not channel.outstanding and not channel.errors


async def test_a_lone_ack_is_a_single_frame_sent_in_the_next_pass() -> None:
    acks, channel = batcher()
    channel.deliver(1)
    acks.received(1)
    await finish(acks, channel, 1)
    assert channel.frames == [("ack", 1, False)]


async def test_a_nacked_tag_no_longer_holds_back_the_ones_after_it() -> None:
    acks, channel = batcher()
    for tag in (1, 2, 3):
        channel.deliver(tag)
        acks.received(tag)
    await channel.basic_nack(1)
    acks.forget(1)
    await asyncio.gather(finish(acks, channel, 2), finish(acks, channel, 3))
    assert channel.frames == [("nack", 1, False), ("ack", 3, True)]
    assert not channel.errors


async def test_flush_sends_what_a_cancelled_gatherer_left() -> None:
    acks, channel = batcher()
    for tag in (1, 2):
        channel.deliver(tag)
        acks.received(tag)
    gatherer = asyncio.create_task(finish(acks, channel, 1))
    await asyncio.sleep(0)  # it is now waiting for the pass to end
    gatherer.cancel()
    await asyncio.gather(gatherer, return_exceptions=True)
    assert channel.frames == []
    await acks.flush()  # what closing the connection does
    assert channel.frames == [("ack", 1, False)]
    assert not channel.errors


STEPS = st.lists(st.tuples(st.sampled_from(["receive", "finish", "nack", "pass"]),
                           st.integers(0, 63)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 20), steps=STEPS)
def test_any_interleaving_acks_exactly_the_finished_deliveries(
    total: int, steps: list[tuple[str, int]],
) -> None:
    """Deliveries arrive in order while others finish (ack or nack) in any order, with
    loop passes in between; whatever is left finishes at the end."""

    async def scenario() -> BrokerChannel:
        acks, channel = batcher()
        received = 0
        in_slots: list[int] = []
        tasks: list[asyncio.Task[None]] = []

        def receive() -> None:
            nonlocal received
            received += 1
            channel.deliver(received)
            acks.received(received)
            in_slots.append(received)

        for step, pick in steps:
            if step == "receive" and received < total:
                receive()
            elif step in ("finish", "nack") and in_slots:
                tag = in_slots.pop(pick % len(in_slots))
                if step == "finish":
                    tasks.append(asyncio.create_task(finish(acks, channel, tag)))
                else:
                    await channel.basic_nack(tag)
                    acks.forget(tag)
            else:
                await asyncio.sleep(0)
        while received < total:
            receive()
        tasks.extend(asyncio.create_task(finish(acks, channel, tag)) for tag in in_slots)
        await asyncio.gather(*tasks)
        await acks.flush()
        return channel

    channel = asyncio.run(scenario())
    assert channel.errors == []
    assert channel.outstanding == set()
