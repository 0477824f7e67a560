"""An AmqpConsumer running against the real broker for the length of a block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from alertd.adapters.amqp import AmqpConsumer
from alertd.config import Settings
from alertd.handler import Disposition, InboundMessage
from alertd.stats import ChildStats

Handler = Callable[[InboundMessage, int], Awaitable[Disposition]]


@contextlib.asynccontextmanager
async def running_consumer(settings: Settings, handler: Handler,
                           ) -> AsyncIterator[tuple[AmqpConsumer, ChildStats]]:
    """Consuming when the block starts; stopped, drained and closed as a child does after."""
    stats = ChildStats()
    consumer = AmqpConsumer(settings, handler, stats)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.consuming.wait(), 10)
        yield consumer, stats
    finally:
        await consumer.stop_consuming()
        await consumer.drain(5)
        await consumer.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
