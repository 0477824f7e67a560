"""Publishing alerts with pika and publisher confirms: the operators' and tests' tool."""

from __future__ import annotations

from collections.abc import Iterable

import pika
import pika.exceptions

from alertd.adapters.amqp import topology
from alertd.config import Settings
from alertd.errors import AlertdError


def publish_bodies(settings: Settings, bodies: Iterable[bytes]) -> int:
    """Declare the topology, publish each body persistently, wait for every confirm."""
    params = pika.URLParameters(settings.amqp_url)
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        raise AlertdError(f"cannot connect to the broker: {exc!r}") from None
    count = 0
    try:
        ensure_queue(connection, settings)
        channel = connection.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        for body in bodies:
            # With confirms on, basic_publish returns once the broker has the
            # message and raises if it was refused or unroutable.
            channel.basic_publish("", settings.queue, body, props, mandatory=True)
            count += 1
    except (pika.exceptions.AMQPError, pika.exceptions.UnroutableError) as exc:
        raise AlertdError(f"publish failed after {count} messages: {exc!r}") from None
    finally:
        if connection.is_open:
            connection.close()
    return count


def ensure_queue(connection: pika.BlockingConnection, settings: Settings) -> None:
    """Declare the main queue and its DLQ only if missing.

    A running alertd owns the arguments (delivery limit, retry queues); a
    passive declare first means the publisher never clashes with them.
    """
    channel = connection.channel()
    try:
        channel.queue_declare(settings.queue, passive=True)
        channel.close()
        return
    except pika.exceptions.ChannelClosedByBroker:
        pass  # 404: not declared yet; the passive declare closed the channel
    channel = connection.channel()
    wanted = {settings.queue, f"{settings.queue}.dlq"}
    for name, arguments in topology(settings):
        if name in wanted:
            channel.queue_declare(name, durable=True, arguments=arguments)
    channel.close()
