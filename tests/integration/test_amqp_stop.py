"""A stop (TERM, QUIT, a recycle, a HUP or TTOU replacement) that lands while the
consumer is still connecting, against the real broker.

stop_consuming() can only cancel a consumer that exists. One that basic.consume
creates after the stop used to stay live until the child closed its connection:
every delivery to it was nacked back and redelivered at once, and on the quorum
queue each nack counts toward x-delivery-limit, so the backlog was dead-lettered
without being processed (found by a review).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest

import alertd.adapters.amqp as amqp_adapter
from alertd.adapters.amqp import AmqpConsumer
from alertd.config import Settings
from alertd.handler import Ack, Disposition, InboundMessage
from alertd.stats import ChildStats
from tests.e2e.harness import publish, queue_counts

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("when", ["connect", "declare"])
async def test_a_stop_during_the_connect_leaves_no_consumer_and_moves_nothing(
    fresh_vhost: str, monkeypatch: pytest.MonkeyPatch, when: str,
) -> None:
    count = 40
    publish(fresh_vhost, [{"alert_id": f"r{i}"} for i in range(count)])
    handled: list[bytes] = []

    async def handler(message: InboundMessage, slot: int) -> Disposition:
        handled.append(message.body)
        return Ack()

    settings = Settings(amqp_url=fresh_vhost, dsn="postgresql://unused", concurrency=8)
    consumer = AmqpConsumer(settings, handler, ChildStats())

    def stop_after(step: Any) -> Any:
        async def step_then_stop(*args: Any, **kwargs: Any) -> Any:
            result = await step(*args, **kwargs)
            await consumer.stop_consuming()  # as Child.shutdown does on TERM
            return result
        return step_then_stop

    if when == "connect":  # no channel yet
        monkeypatch.setattr(amqp_adapter.aiormq, "connect", stop_after(aiormq.connect))
    else:  # the channel exists, its consumer does not
        monkeypatch.setattr(amqp_adapter, "declare_topology",
                            stop_after(amqp_adapter.declare_topology))
    await asyncio.wait_for(consumer.run(), 10)  # run() returns: it saw the stop
    assert not consumer.consuming.is_set()
    # The child drains and flushes its outbox before it closes the connection;
    # a live consumer would cycle the whole queue through nacks meanwhile.
    await asyncio.sleep(2)
    await consumer.drain(5)
    await consumer.close()
    await asyncio.sleep(0.5)
    assert handled == []
    counts = await asyncio.to_thread(queue_counts, fresh_vhost)
    assert counts["alerts"] == count and counts["alerts.dlq"] == 0, counts
