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
        channel = connection.channel()
        channel.confirm_delivery()
        for name, arguments in topology(settings):
            channel.queue_declare(name, durable=True, arguments=arguments)
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
