"""A RabbitMQ memory alarm while a child retries one alert and finishes others.

RabbitMQ stops reading a connection that publishes during an alarm. When the
retries and dead letters went out on the consuming connection, one retry
stopped every ack of the child until the alarm cleared (found by a review).
They now go out on a connection of their own: the acks keep flowing, and only
the retry waits, in its slot.

This test raises a broker-wide alarm (the memory watermark set near zero) for
a few seconds and always sets the watermark back to what it was.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from alertd.config import Settings
from alertd.handler import Ack, Disposition, InboundMessage, Retry
from tests.conftest import rabbitmqctl
from tests.e2e.harness import publish, vhost_of, wait_until
from tests.integration.consumer import running_consumer

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def memory_alarm() -> Iterator[None]:
    before = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    rabbitmqctl("eval", "vm_memory_monitor:set_vm_memory_high_watermark(0.0001).")
    try:
        wait_until(lambda: "memory" in rabbitmqctl("eval", "rabbit_alarm:get_alarms()."), 30,
                   "the memory alarm")
        yield
    finally:
        rabbitmqctl("eval", f"vm_memory_monitor:set_vm_memory_high_watermark({before}).")
        wait_until(lambda: rabbitmqctl("eval", "rabbit_alarm:get_alarms().") == "[]", 30,
                   "the alarm to clear")


def unacked(amqp_url: str, queue: str = "alerts") -> int:
    # rabbitmqctl's counts for a quorum queue lag by its stats interval (~5 s).
    for line in rabbitmqctl("list_queues", "-p", vhost_of(amqp_url), "--no-table-headers",
                            "name", "messages_unacknowledged").splitlines():
        name, count = line.split()
        if name == queue:
            return int(count)
    raise AssertionError(f"no queue {queue}")


async def test_a_retry_during_a_memory_alarm_does_not_hold_back_the_acks_of_other_alerts(
    fresh_vhost: str,
) -> None:
    retry_may_go, retry_done, acks_may_go = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(message: InboundMessage, slot: int) -> Disposition:
        if b"retry" in message.body:
            await retry_may_go.wait()
            retry_done.set()
            return Retry(2, 5.0, 0, "download_failed: test")
        await acks_may_go.wait()
        return Ack()

    settings = Settings(amqp_url=fresh_vhost, dsn="postgresql://unused", concurrency=4)
    async with running_consumer(settings, handler):
        await asyncio.to_thread(publish, fresh_vhost, [b'{"alert_id": "retry"}'] + [
            b'{"alert_id": "a%d"}' % i for i in range(3)])
        await asyncio.to_thread(wait_until, lambda: unacked(fresh_vhost) == 4, 30,
                                "all four in slots")
        with memory_alarm():
            # The retry's copy is published (and blocked) first; then the
            # other three finish and ack.
            retry_may_go.set()
            await asyncio.wait_for(retry_done.wait(), 10)
            await asyncio.sleep(1)
            acks_may_go.set()
            await asyncio.to_thread(wait_until, lambda: unacked(fresh_vhost) == 1, 30,
                                    "the three acks through while the alarm lasts")
        await asyncio.to_thread(wait_until, lambda: unacked(fresh_vhost) == 0, 30,
                                "the retry published and acked once the alarm cleared")
