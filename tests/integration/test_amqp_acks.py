"""The consumer's coalesced acks against the real broker: what is acked is exactly what is done."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
import pytest

from alertd.adapters.amqp import AmqpConsumer
from alertd.config import Settings
from alertd.handler import Ack, Disposition, InboundMessage
from alertd.stats import ChildStats
from tests.e2e.harness import close_broker_connections, eventually, publish, queue_settled

pytestmark = pytest.mark.integration


def consumer_for(amqp_url: str, handler: Callable[[InboundMessage, int], Awaitable[Disposition]],
                 concurrency: int = 8) -> tuple[AmqpConsumer, ChildStats]:
    settings = Settings(amqp_url=amqp_url, dsn="postgresql://unused", concurrency=concurrency)
    stats = ChildStats()
    return AmqpConsumer(settings, handler, stats), stats


async def test_only_the_delivery_still_in_its_slot_comes_back_after_a_connection_loss(
    fresh_vhost: str,
) -> None:
    """Seven of eight finish together while one is held: their acks (coalesced) must
    reach the broker and must not cover the held one, so a connection loss brings
    back exactly that one."""
    publish(fresh_vhost, [{"alert_id": f"a{i}"} for i in range(8)])
    release = asyncio.Event()
    deliveries: list[tuple[str, bool]] = []

    async def handler(message: InboundMessage, slot: int) -> Disposition:
        alert_id = orjson.loads(message.body)["alert_id"]
        deliveries.append((alert_id, message.redelivered))
        if alert_id == "a2":
            await release.wait()
        return Ack()

    consumer, stats = consumer_for(fresh_vhost, handler)
    runner = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: len(deliveries) == 8 and len(consumer.tasks) == 1, 20,
                         "seven deliveries done, one held")
        await asyncio.sleep(0.5)  # the acks are on the wire well before this
        await asyncio.to_thread(close_broker_connections, fresh_vhost, "test: connection loss")
        await eventually(lambda: len(deliveries) > 8, 20, "a redelivery after the reconnect")
        await asyncio.sleep(1.0)  # anything wrongly left unacked would come back too
        assert deliveries[8:] == [("a2", True)]
        release.set()
        await eventually(lambda: not consumer.tasks, 20, "the held deliveries to finish")
    finally:
        release.set()
        await consumer.stop_consuming()
        await consumer.drain(5)
        await consumer.close()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert stats.counters[("amqp_reconnects",)] == 1  # the loss we caused, no channel error
    assert await asyncio.to_thread(queue_settled, fresh_vhost)


async def test_closing_right_after_the_last_slot_finishes_hands_nothing_back(
    fresh_vhost: str,
) -> None:
    """Acks are queued without waiting for the socket; a close the moment the last
    slot is done must not leave any to come back as redeliveries. (Acks left by a
    cancelled flush and sent at close: tests/unit/test_acks.py.)"""
    count = 64
    publish(fresh_vhost, [{"alert_id": f"s{i}"} for i in range(count)])
    handled: list[str] = []

    async def handler(message: InboundMessage, slot: int) -> Disposition:
        handled.append(orjson.loads(message.body)["alert_id"])
        return Ack()

    consumer, _ = consumer_for(fresh_vhost, handler, concurrency=16)
    runner = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: len(handled) >= count, 20, "every delivery handled")
        # Close the moment the last slot is done, while its ack may still be queued.
        await consumer.drain(5)
        await consumer.close()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert sorted(handled) == sorted(f"s{i}" for i in range(count))
    await asyncio.sleep(1.0)  # what was left unacked is requeued once the broker sees the close
    assert await asyncio.to_thread(queue_settled, fresh_vhost)
