"""AMQP adapter: the topology, a reconnecting aiormq consumer, and the one place that acks."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import aiormq.abc
from pamqp import commands as spec
from pamqp import encode
from yarl import URL

from alertd.adapters.amqpcodec import make_decoding_lenient
from alertd.config import Settings, mask_url
from alertd.handler import (
    ATTEMPT_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    RECEIVED_AT_HEADER,
    Ack,
    DeadLetter,
    Disposition,
    InboundMessage,
    Requeue,
    Retry,
    attempt_number,
)
from alertd.stats import ChildStats

log = logging.getLogger(__name__)
# Before any connection: a producer's undecodable header must not close it.
make_decoding_lenient()

Handler = Callable[[InboundMessage, int], Awaitable[Disposition]]

DEFAULT_HEARTBEAT_S = 15
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 30.0
REQUEUE_AFTER_REFUSAL_S = 1.0
PUBLISH_CONFIRM_TIMEOUT_S = 15.0
ACK_FLUSH_TIMEOUT_S = 5.0
# A connection that stayed up this long was good: only then does the
# reconnect backoff start over (a message that makes the broker or the
# decoder close it at once must not make a 0.5 s reconnect storm).
HEALTHY_CONNECTION_S = 10.0
# Room kept in a content-header frame for the properties other than the
# headers (content type, ids of at most 255 bytes each, timestamp...) when a
# producer's headers are copied onto a republished message.
PROPERTIES_ROOM_BYTES = 1024
DROPPED_HEADERS_HEADER = "x-alertd-dropped-headers"
ORIGINAL_MESSAGE_ID_HEADER = "x-alertd-message-id"


class PublishRefused(Exception):
    """The broker nacked a publish (e.g. a full queue with reject-publish)."""


# Failures that mean "this message could not be settled over this channel".
AMQP_FAILURES = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError,
                 ConnectionError, OSError, PublishRefused, TimeoutError)


class ReconnectNeeded(Exception):
    """The connection looks open but cannot serve us (e.g. our consumer was cancelled)."""



class AckBatcher:
    """The acks of one consuming channel, sent together when slots finish together.

    Slots that finish in the same pass of the event loop share one frame:
    ``basic.ack(multiple=True)`` up to the highest finished tag that is below
    every delivery still unsettled, then single acks for finished tags above
    it. A multiple ack can only cover what is done because every delivery is
    registered (:meth:`received`) before anything can ack, tags grow with
    each delivery, and a nacked tag leaves the unsettled set only once its
    nack is queued (:meth:`nack`), so no later frame overtakes it.

    Frames are queued in order (one flush at a time) and not waited for: an
    ack lost with its connection means a redelivery, deduplicated by alert
    id, exactly as an ack lost in flight always did. :meth:`flush` before
    closing the connection sends what is left.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._unsettled: set[int] = set()
        self._done: list[int] = []
        self._gathering = False
        self._sending = asyncio.Lock()

    def received(self, tag: int) -> None:
        self._unsettled.add(tag)

    async def nack(self, tag: int) -> None:
        """Hand ``tag`` back to the broker (requeue).

        It leaves the unsettled set only once its frame is queued: a nack
        cancelled while waiting for room in the write queue was never sent,
        and a multiple ack must not cover its delivery.
        """
        await self.channel.basic_nack(tag, requeue=True, wait=False)
        self._unsettled.discard(tag)

    async def ack(self, tag: int) -> None:
        self._unsettled.discard(tag)
        self._done.append(tag)
        if self._gathering:
            return  # the slot gathering this pass's acks sends this one too
        self._gathering = True
        try:
            await asyncio.sleep(0)  # one pass: the slots finishing with this one join in
        finally:
            self._gathering = False
        await self.flush()

    async def flush(self) -> None:
        async with self._sending:
            done, self._done = self._done, []
            if not done:
                return
            floor = min(self._unsettled, default=None)
            covered = done if floor is None else [tag for tag in done if tag < floor]
            # With wait=False a basic_ack returns once its frame is queued and
            # raises only before that: what is not sent goes back, so a
            # cancelled flush loses no ack (and none is sent twice).
            unsent = done
            try:
                if covered:
                    await self.channel.basic_ack(max(covered), multiple=len(covered) > 1,
                                                 wait=False)
                    unsent = [tag for tag in done if floor is not None and tag > floor]
                for tag in list(unsent):
                    await self.channel.basic_ack(tag, wait=False)
                    unsent.remove(tag)
            except BaseException:
                self._done[:0] = unsent
                raise


def dlq_name(queue: str) -> str:
    return f"{queue}.dlq"


def retry_queue_name(queue: str, delay_s: float) -> str:
    # The delay is in the name: a queue's TTL cannot change once declared, so
    # a new --retry-delay gets new queues instead of PRECONDITION_FAILED.
    return f"{queue}.retry.{round(delay_s * 1000)}ms"


def amqp_url(settings: Settings) -> URL:
    url = URL(settings.amqp_url)
    if "heartbeat" not in url.query:
        url = url.update_query(heartbeat=DEFAULT_HEARTBEAT_S)
    return url


def topology(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """The queues alertd needs, with their arguments: main queue, DLQ, delay queues.

    Shared by the consumer (aiormq) and ``alertd publish`` (pika) so both
    declare exactly the same arguments.
    """
    queue, dlq = settings.queue, dlq_name(settings.queue)
    main_args: dict[str, Any] = {
        "x-queue-type": settings.queue_type,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dlq,
    }
    if settings.queue_type == "quorum":
        # Backstop against a message that kills its child every time: after
        # this many deliveries the broker itself dead-letters it.
        main_args.update({
            "x-delivery-limit": settings.delivery_limit,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        })
    queues = [(dlq, {"x-queue-type": settings.queue_type}), (queue, main_args)]
    for attempt in range(1, settings.max_attempts):
        delay = settings.retry_delay_for(attempt)
        queues.append((retry_queue_name(queue, delay), {
            "x-queue-type": "classic",
            "x-message-ttl": round(delay * 1000),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        }))
    return queues


async def declare_topology(channel: aiormq.abc.AbstractChannel, settings: Settings) -> None:
    """Declare every queue of :func:`topology` (idempotent, durable)."""
    for name, arguments in topology(settings):
        await channel.queue_declare(name, durable=True, arguments=arguments)


async def publish_confirmed(
    channel: aiormq.abc.AbstractChannel, queue: str, body: bytes,
    properties: spec.Basic.Properties,
) -> None:
    """Publish persistently and wait for the broker's confirm; raise if it says no.

    The wait is bounded: a confirm that never comes (seen with a full quorum
    queue under ``reject-publish``) would otherwise hold the slot forever.
    """
    confirm = await channel.basic_publish(
        body, exchange="", routing_key=queue, properties=properties, mandatory=True,
        timeout=PUBLISH_CONFIRM_TIMEOUT_S,
    )
    if not isinstance(confirm, spec.Basic.Ack):
        raise PublishRefused(f"broker refused the publish to {queue!r}: {confirm!r}")


class AmqpConsumer:
    """Consumes ``settings.queue`` with ``concurrency`` slots, reconnecting forever.

    Each delivery runs in a task of ``tasks`` bounded by a semaphore of
    ``concurrency`` (= prefetch), so slots stay bounded even while tasks from
    a lost connection are still finishing.
    """

    def __init__(self, settings: Settings, handler: Handler, stats: ChildStats,
                 *, name: str = "alertd") -> None:
        self._settings = settings
        self._handler = handler
        self._stats = stats
        self._name = name
        self._slots = asyncio.Semaphore(settings.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.consuming = asyncio.Event()
        self._stopping = asyncio.Event()
        self._broker_cancelled = asyncio.Event()
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._publisher: aiormq.abc.AbstractChannel | None = None
        self._publisher_connection: aiormq.abc.AbstractConnection | None = None
        self._consumer_tag: str | None = None
        self._acks: AckBatcher | None = None

    async def run(self) -> None:
        """Connect, consume, and reconnect with backoff until :meth:`stop_consuming`."""
        delay = RECONNECT_FIRST_S
        while not self._stopping.is_set():
            connected_at: float | None = None
            try:
                await self._connect_and_consume()
                connected_at = time.monotonic()
                await self._wait_for_trouble()
            except (*AMQP_FAILURES, ReconnectNeeded, RuntimeError) as exc:
                # RuntimeError: aiormq's "connection closed" while opening a channel.
                log.warning("AMQP %s: %s", mask_url(self._settings.amqp_url), exc or type(exc))
            finally:
                self.consuming.clear()
            if self._stopping.is_set():
                break
            if connected_at is not None and time.monotonic() - connected_at >= HEALTHY_CONNECTION_S:
                delay = RECONNECT_FIRST_S
            await self._close_connection()
            self._stats.count("amqp_reconnects")
            log.info("AMQP reconnecting in %.1fs", delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _connect_and_consume(self) -> None:
        self._broker_cancelled.clear()
        async with asyncio.timeout(self._settings.connect_timeout):
            self._connection = await aiormq.connect(
                amqp_url(self._settings),
                client_properties={"connection_name": f"{self._name} pid {os.getpid()}"},
            )
            channel = await self._connection.channel(publisher_confirms=True)
            self._channel = channel
            channel.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            await declare_topology(channel, self._settings)
            await channel.basic_qos(prefetch_count=self._settings.concurrency)
            self._acks = AckBatcher(channel)
            ok = await channel.basic_consume(self._settings.queue, self._on_message, no_ack=False)
        self._consumer_tag = tag = ok.consumer_tag
        if self._stopping.is_set():
            # stop_consuming() ran during the (re)connect, before this consumer
            # existed: cancel it now, or the broker keeps delivering to a
            # consumer that nacks everything back, each nack counting toward
            # the queue's delivery limit, until the child exits.
            if tag is not None:
                with contextlib.suppress(*AMQP_FAILURES):
                    await asyncio.wait_for(channel.basic_cancel(tag), 5)
            return
        self.consuming.set()
        log.info("consuming %r with %d slots", self._settings.queue, self._settings.concurrency)

    async def _wait_for_trouble(self) -> None:
        assert self._connection is not None and self._channel is not None
        waiters = [
            asyncio.ensure_future(self._connection.closing),
            asyncio.ensure_future(self._channel.closing),
            asyncio.ensure_future(self._stopping.wait()),
            asyncio.ensure_future(self._broker_cancelled.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._broker_cancelled.is_set() and not self._stopping.is_set():
            # A connection with zero consumers looks healthy and does nothing:
            # start over so the consumer comes back.
            raise ReconnectNeeded("the broker cancelled our consumer")
        if not self._stopping.is_set():
            raise ReconnectNeeded("connection or channel closed")

    async def _on_broker_cancel(self, frame: Any) -> None:
        self._broker_cancelled.set()

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        # aiormq runs this callback in a task it cancels when the channel
        # closes; the work goes to a task of ours so a lost connection does
        # not cancel an alert halfway through a commit.
        if acks := self._batcher_for(message):
            assert message.delivery_tag is not None
            acks.received(message.delivery_tag)
        task = asyncio.create_task(self._run_delivery(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_delivery(self, message: aiormq.abc.DeliveredMessage) -> None:
        if self._stopping.is_set():
            await self._settle(message, Requeue())
            return
        props = message.header.properties
        inbound = InboundMessage(
            body=message.body,
            headers=dict(props.headers or {}),
            redelivered=bool(getattr(message.delivery, "redelivered", False)),
        )
        async with self._slots:
            if self._stopping.is_set():
                # Stopped while waiting for a slot (after a reconnect up to
                # twice the prefetch waits here): hand it back, don't start it.
                disposition: Disposition = Requeue()
            else:
                disposition = await self._handle_in_slot(message, inbound)
        await self._settle(message, disposition)

    async def _handle_in_slot(self, message: aiormq.abc.DeliveredMessage,
                              inbound: InboundMessage) -> Disposition:
        slot = self._stats.open_slot()
        try:
            return await self._handler(inbound, slot)
        except asyncio.CancelledError:
            await self._settle(message, Requeue())
            raise
        except Exception as exc:
            log.exception("unexpected error while handling a message")
            return self._after_bug(inbound, exc)
        finally:
            self._stats.close_slot(slot)

    def _after_bug(self, inbound: InboundMessage, exc: Exception) -> Disposition:
        """An unexpected exception is retried like a transient error, then dead-lettered.

        Requeueing it would spin on the same message forever.
        """
        self._stats.count("internal_errors")
        number = attempt_number(inbound.headers, self._settings.max_attempts)
        if number >= self._settings.max_attempts:
            return DeadLetter(f"internal_error: {type(exc).__name__}: {exc}"[:500])
        received = inbound.headers.get(RECEIVED_AT_HEADER)
        received_ms = received if isinstance(received, int) else int(
            dt.datetime.now(dt.UTC).timestamp() * 1000)
        return Retry(number + 1, self._settings.retry_delay_for(number), received_ms,
                     f"internal_error: {type(exc).__name__}")

    async def _settle(self, message: aiormq.abc.DeliveredMessage, disposition: Disposition) -> None:
        """Apply a disposition: the only place alertd acks, nacks or republishes."""
        channel, tag = message.channel, message.delivery_tag
        assert tag is not None
        if channel.is_closed:
            # Its connection is gone: the broker has requeued this delivery
            # already, so a copy republished now would only be a duplicate.
            log.warning("delivery's channel closed before settling; the broker redelivers it")
            return
        try:
            match disposition:
                case Ack():
                    await self._ack(message)
                case Requeue():
                    await self._nack(message)
                case DeadLetter(reason):
                    await self._republish(message, dlq_name(self._settings.queue), {
                        REASON_HEADER: reason,
                        "x-alertd-dead-lettered-at": dt.datetime.now(dt.UTC).isoformat(),
                        "x-alertd-queue": self._settings.queue,
                    })
                    self._stats.count("dead_lettered")
                case Retry(attempt, delay_s, received_at_ms, error):
                    await self._republish(
                        message, retry_queue_name(self._settings.queue, delay_s), {
                            ATTEMPT_HEADER: attempt,
                            RECEIVED_AT_HEADER: received_at_ms,
                            ERROR_HEADER: error[:500],
                        })
        except Exception as exc:
            if not isinstance(exc, AMQP_FAILURES):
                # A bug, not the broker: the delivery must still be settled,
                # or it stays unacked until the consumer timeout (30 min)
                # and its tag blocks every multiple ack after it.
                log.exception("could not settle delivery")
            if channel.is_closed:
                # The broker requeues everything unacked on a closed channel,
                # so this delivery comes back (and is deduplicated by id).
                log.warning("could not settle delivery (%s); the broker will redeliver it", exc)
                return
            # The channel lives (e.g. the DLQ or a delay queue refused the
            # publish): hand the message back instead of leaving it unacked
            # until the broker's consumer timeout. The pause keeps a queue
            # that keeps refusing from turning this into a hot loop.
            log.error("could not settle delivery (%s); requeueing it in %.0fs", exc,
                      REQUEUE_AFTER_REFUSAL_S)
            await asyncio.sleep(REQUEUE_AFTER_REFUSAL_S)
            with contextlib.suppress(*AMQP_FAILURES):
                await self._nack(message)

    def _batcher_for(self, message: aiormq.abc.DeliveredMessage) -> AckBatcher | None:
        """The consuming channel's batcher; None for a delivery of an older channel."""
        acks = self._acks
        return acks if acks is not None and acks.channel is message.channel else None

    async def _ack(self, message: aiormq.abc.DeliveredMessage) -> None:
        assert message.delivery_tag is not None
        if acks := self._batcher_for(message):
            await acks.ack(message.delivery_tag)
        else:
            await message.channel.basic_ack(message.delivery_tag)

    async def _nack(self, message: aiormq.abc.DeliveredMessage) -> None:
        assert message.delivery_tag is not None
        if acks := self._batcher_for(message):
            await acks.nack(message.delivery_tag)
        else:
            await message.channel.basic_nack(message.delivery_tag, requeue=True)

    async def _republish(self, message: aiormq.abc.DeliveredMessage, queue: str,
                         headers: dict[str, Any]) -> None:
        """Publish a copy to ``queue`` (confirmed), then ack the original.

        Crash in between: the original comes back and is handled again, so a
        copy may be duplicated, never lost.
        """
        properties = _republished(message, headers, self._frame_max())
        publisher = await self._publisher_channel()
        try:
            try:
                await publish_confirmed(publisher, queue, message.body, properties)
            except aiormq.exceptions.PublishError:
                # Returned unroutable: the delay queue or the DLQ was deleted
                # while alertd ran. Declared again, the copy goes out once
                # more, instead of a requeue every second until the main
                # queue's delivery limit dead-letters the alert unprocessed.
                log.warning("queue %r is gone; declaring the topology again", queue)
                await self._drop_publisher(publisher)
                publisher = await self._publisher_channel()
                await declare_topology(publisher, self._settings)
                await publish_confirmed(publisher, queue, message.body, properties)
        except AMQP_FAILURES:
            # RabbitMQ 3.10 keeps refusing publishes on a channel that a full
            # quorum queue once rejected, even after the queue has room
            # again: the next publish goes out on a fresh channel.
            await self._drop_publisher(publisher)
            raise
        await self._ack(message)

    async def _drop_publisher(self, publisher: aiormq.abc.AbstractChannel) -> None:
        if self._publisher is publisher:
            self._publisher = None
        with contextlib.suppress(*AMQP_FAILURES):
            await asyncio.wait_for(publisher.close(), 5)

    def _frame_max(self) -> int:
        tune = getattr(self._connection, "connection_tune", None)
        return int(getattr(tune, "frame_max", 0) or 131072)

    async def _publisher_channel(self) -> aiormq.abc.AbstractChannel:
        """A confirm-mode channel for republishing, on a connection of its own.

        Of its own because RabbitMQ blocks a connection that publishes during
        a memory or disk alarm, reading nothing more from it: on the
        consuming connection one retry would stop every ack of the child
        until the alarm clears. This way the child keeps acking (which frees
        the broker's memory) while its retries and dead letters wait for
        the alarm to end, each in its slot.
        """
        if self._publisher is None or self._publisher.is_closed:
            if self._connection is None or self._connection.is_closed:
                raise ConnectionError("no broker connection to publish on")
            async with asyncio.timeout(self._settings.connect_timeout):
                connection = self._publisher_connection
                if connection is None or connection.is_closed:
                    connection = self._publisher_connection = await aiormq.connect(
                        amqp_url(self._settings), client_properties={
                            "connection_name": f"{self._name} pid {os.getpid()} publisher"})
                self._publisher = await connection.channel(publisher_confirms=True)
        if self._publisher_connection is not None:
            await self._publisher_connection.ready()  # not blocked by an alarm
        return self._publisher

    async def stop_consuming(self) -> None:
        """Stop intake at once (basic.cancel); acks still flow for in-flight alerts."""
        self._stopping.set()
        self.consuming.clear()
        channel, tag = self._channel, self._consumer_tag
        if channel is not None and tag is not None and not channel.is_closed:
            with contextlib.suppress(*AMQP_FAILURES):
                await asyncio.wait_for(channel.basic_cancel(tag), 5)

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for in-flight alerts; requeue the rest. Returns how many."""
        pending: set[asyncio.Task[None]] = set()
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
        return len(pending)

    async def close(self) -> None:
        await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._consumer_tag = None  # it named a consumer on the channel just dropped
        acks, self._acks = self._acks, None
        self._publisher = None
        publisher, self._publisher_connection = self._publisher_connection, None
        if publisher is not None and not publisher.is_closed:
            with contextlib.suppress(*AMQP_FAILURES):
                await asyncio.wait_for(publisher.close(), 5)
        if connection is not None and not connection.is_closed:
            if acks is not None and not acks.channel.is_closed:
                # Acks are queued, not waited for: send them before the close
                # frame, or their alerts come back as redeliveries.
                with contextlib.suppress(*AMQP_FAILURES):
                    async with asyncio.timeout(ACK_FLUSH_TIMEOUT_S):
                        await acks.flush()
                        await connection.write_queue.join()
            with contextlib.suppress(*AMQP_FAILURES):
                await asyncio.wait_for(connection.close(), 5)


def _republished(message: aiormq.abc.DeliveredMessage, extra_headers: dict[str, Any],
                 frame_max: int) -> spec.Basic.Properties:
    """The properties of a copy for a delay queue or the DLQ.

    The producer's headers are kept when they can be sent again: what the
    decoder read may not encode back (a string that was not UTF-8, a double
    beyond float32), or may fill the frame once alertd's headers are added,
    and either would fail the publish every time (or close the connection).
    Then they are dropped, and a header says why. The copy gets a message
    id of its own: aiormq matches a returned publish to its confirm by
    message id, so two copies in flight with a producer's shared id could
    take each other's return, and an unroutable copy count as confirmed.
    """
    props = message.header.properties
    producer = props.headers or {}
    ours = dict(extra_headers)
    # The producer's id: set on the first copy, kept on the next ones.
    original_id = producer.get(ORIGINAL_MESSAGE_ID_HEADER)
    if not isinstance(original_id, str) or len(original_id) > 255:  # ours, or a producer's
        original_id = props.message_id
    if original_id:
        ours[ORIGINAL_MESSAGE_ID_HEADER] = original_id
    headers = {**producer, **ours}
    try:
        if producer:
            room = frame_max - PROPERTIES_ROOM_BYTES - len(encode.field_table(ours))
            if len(encode.field_table(producer)) > room:
                raise ValueError(f"over {room} bytes with alertd's")
    except (TypeError, ValueError, OverflowError, UnicodeError) as exc:
        headers = {**ours, DROPPED_HEADERS_HEADER: f"cannot copy the producer's headers: "
                                                   f"{type(exc).__name__}: {exc}"[:300]}
    timestamp = props.timestamp if isinstance(props.timestamp, dt.datetime) else None
    return spec.Basic.Properties(
        content_type=_short(props.content_type) or "application/json",
        delivery_mode=2,
        headers=headers,
        message_id=uuid.uuid4().hex,
        correlation_id=_short(props.correlation_id),
        timestamp=timestamp,
        app_id=_short(props.app_id),
    )


def _short(value: str | None) -> str | None:
    """A short-string property that encodes back into its 255 bytes, else None."""
    return value if value is None or len(value.encode("utf-8", "replace")) <= 255 else None
