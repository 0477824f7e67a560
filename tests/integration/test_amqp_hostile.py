"""Messages and broker states that used to cost alerts, against the real broker.

Each was found by a review of the consume and settle path: a header the
decoder cannot read closed the connection in a loop (and the delivery limit
dead-lettered valid alerts with it); a header that cannot be encoded again
left a delivery unsettled; producers sharing a message_id made a returned
(unroutable) copy count as confirmed; a deleted delay queue made a requeue
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import struct
from collections.abc import AsyncIterator, Callable

import orjson
import pika
import pytest

from alertd.adapters.amqp import (
    DROPPED_HEADERS_HEADER,
    ORIGINAL_MESSAGE_ID_HEADER,
    AmqpConsumer,
    retry_queue_name,
)
from alertd.config import Settings
from alertd.handler import Ack, DeadLetter, Disposition, InboundMessage, Requeue, Retry
from alertd.stats import ChildStats
from tests.e2e.harness import queue_counts, wait_until
from tests.integration.consumer import running_consumer

pytestmark = pytest.mark.integration

GOOD = orjson.dumps({"alert_id": "good", "video_url": "http://127.0.0.1/c.mp4"})


def publish_raw(amqp_url: str, body: bytes, *, headers: dict[str, object] | None = None,
                message_id: str | None = None, queue: str = "alerts") -> None:
    """Publish with pika, whose encoder takes what alertd's decoder may not read back."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, body, pika.BasicProperties(
            delivery_mode=2, headers=headers, message_id=message_id))
    finally:
        connection.close()


def take_all(amqp_url: str, queue: str) -> list[tuple[bytes, pika.BasicProperties]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    taken = []
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((body, props))
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def running(amqp_url: str, decide: Callable[[InboundMessage], Disposition],
                  ) -> AsyncIterator[tuple[list[InboundMessage], ChildStats]]:
    seen: list[InboundMessage] = []

    async def handler(message: InboundMessage, slot: int) -> Disposition:
        seen.append(message)
        return decide(message)

    settings = Settings(amqp_url=amqp_url, dsn="postgresql://unused", concurrency=4,
                        max_attempts=3, retry_delay=60.0)
    async with running_consumer(settings, handler) as (_, stats):
        yield seen, stats


def reconnects(stats: ChildStats) -> int:
    return stats.counters.get(("amqp_reconnects",), 0)


async def test_a_header_the_decoder_cannot_read_is_handled_without_closing_the_connection(
    fresh_vhost: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A table key that is not UTF-8 (pika sends bytes keys as they are) and a
    # timestamp of 2^62 (pika can only send datetimes, so its encoder is told
    # that this one is 2^62 s after the epoch).
    monkeypatch.setattr(pika.data.calendar, "timegm", lambda _: 2**62)
    poison = [b'{"alert_id": "bad-key"}', b'{"alert_id": "far-time"}']
    async with running(fresh_vhost, lambda m: Ack()) as (seen, stats):
        await asyncio.to_thread(publish_raw, fresh_vhost, poison[0], headers={b"\xff\xfe": 1})
        await asyncio.to_thread(publish_raw, fresh_vhost, poison[1], headers={
            "when": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)})
        await asyncio.to_thread(publish_raw, fresh_vhost, GOOD)
        await asyncio.to_thread(wait_until, lambda: len(seen) >= 3, 10, "all three handled")
        await asyncio.sleep(1)
        assert reconnects(stats) == 0
    by_body = {m.body: m.headers for m in seen}
    assert set(by_body) == {*poison, GOOD}
    assert by_body[poison[0]] == {"\ufffd\ufffd": 1}
    assert by_body[poison[1]] == {"when": 2**62}
    counts = await asyncio.to_thread(queue_counts, fresh_vhost)
    assert counts["alerts"] == 0 and counts["alerts.dlq"] == 0, counts


def test_the_lenient_decoder_keeps_what_pamqp_cannot_read() -> None:
    from pamqp import decode, encode

    from alertd.adapters.amqpcodec import make_decoding_lenient

    make_decoding_lenient()
    far = b"T" + (2**62).to_bytes(8, "big")
    assert decode.embedded_value(far) == (9, 2**62)
    key = b"\xff\xfe"
    table = (len(key) + 1 + 2).to_bytes(4, "big") + bytes([len(key)]) + key + b"b\x01"
    assert decode.field_table(table) == (len(table), {"\ufffd\ufffd": 1})
    assert decode.field_table(encode.field_table({"a": 1, "b": "x"}))[1] == {"a": 1, "b": "x"}


async def test_headers_that_cannot_be_sent_again_are_dropped_and_the_copy_still_goes_out(
    fresh_vhost: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A double ("d") beyond float32: pamqp decodes it to a float, and its
    # encoder writes floats as "f", so the copy's headers cannot be encoded
    # (OverflowError). pika has no floats: its encoder is taught this one.
    encode_value = pika.data.encode_value

    def with_doubles(pieces: list[bytes], value: object) -> int:
        if isinstance(value, float):
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        return encode_value(pieces, value)  # type: ignore[no-any-return]
    monkeypatch.setattr(pika.data, "encode_value", with_doubles)
    async with running(fresh_vhost, lambda m: DeadLetter("invalid_json: test")):
        await asyncio.to_thread(publish_raw, fresh_vhost, b"not json",
                                headers={"big": 1e300, "fine": "yes"}, message_id="m-1")
        await asyncio.to_thread(publish_raw, fresh_vhost, b"not json either")
        await asyncio.to_thread(
            wait_until, lambda: queue_counts(fresh_vhost)["alerts.dlq"] == 2, 10, "both DLQ'd")
        await asyncio.sleep(0.5)
    counts = await asyncio.to_thread(queue_counts, fresh_vhost)
    assert counts["alerts"] == 0, counts  # acked, nothing left unsettled
    letters = dict(await asyncio.to_thread(take_all, fresh_vhost, "alerts.dlq"))
    dropped = letters[b"not json"].headers
    assert "fine" not in dropped and "OverflowError" in dropped[DROPPED_HEADERS_HEADER]
    assert dropped["x-alertd-reason"] == "invalid_json: test"
    assert dropped[ORIGINAL_MESSAGE_ID_HEADER] == "m-1"
    assert DROPPED_HEADERS_HEADER not in letters[b"not json either"].headers


def ready(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


async def test_retries_sharing_a_message_id_into_a_deleted_delay_queue_are_all_kept(
    fresh_vhost: str,
) -> None:
    delay_queue = retry_queue_name("alerts", 60.0)  # the first of running()'s delay queues

    def retry(message: InboundMessage) -> Disposition:
        return Retry(2, 60.0, 0, "download_failed: test")

    async with running(fresh_vhost, lambda m: Ack()):
        pass  # declares the topology
    connection = pika.BlockingConnection(pika.URLParameters(fresh_vhost))
    connection.channel().queue_delete(delay_queue)
    connection.close()
    bodies = [orjson.dumps({"alert_id": f"r{i}"}) for i in range(4)]
    for body in bodies:
        await asyncio.to_thread(publish_raw, fresh_vhost, body, message_id="same-id")
    async with running(fresh_vhost, retry) as (seen, _):
        await asyncio.to_thread(
            wait_until, lambda: ready(fresh_vhost, delay_queue) == 4, 15,
            "all four copies in the delay queue declared again")
        await asyncio.sleep(0.5)
        assert len(seen) == 4  # each handled once: no requeue loop
    assert await asyncio.to_thread(ready, fresh_vhost, "alerts") == 0
    assert await asyncio.to_thread(ready, fresh_vhost, "alerts.dlq") == 0
    copies = await asyncio.to_thread(take_all, fresh_vhost, delay_queue)
    assert sorted(body for body, _ in copies) == sorted(bodies)
    assert len({props.message_id for _, props in copies}) == 4


async def test_a_delivery_waiting_for_a_slot_when_the_stop_comes_is_handed_back_not_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After a reconnect up to twice the prefetch can wait for a slot; a TERM
    # then must not start a full download for them during the drain.
    handled: list[bytes] = []

    async def handler(message: InboundMessage, slot: int) -> Disposition:
        handled.append(message.body)
        return Ack()

    consumer = AmqpConsumer(Settings(concurrency=1), handler, ChildStats())
    settled: list[Disposition] = []

    async def settle(message: object, disposition: Disposition) -> None:
        settled.append(disposition)
    monkeypatch.setattr(consumer, "_settle", settle)

    class Delivered:
        body = GOOD
        header = type("Header", (), {"properties": type("Props", (), {"headers": {}})()})()
        delivery = None

    async with consumer._slots:  # the one slot is busy
        waiting = asyncio.create_task(consumer._run_delivery(Delivered()))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        await consumer.stop_consuming()
    await asyncio.wait_for(waiting, 5)
    assert handled == [] and settled == [Requeue()]


def test_a_table_nested_deeper_than_the_stack_decodes_without_raising() -> None:
    from pamqp import decode

    from alertd.adapters.amqpcodec import make_decoding_lenient

    make_decoding_lenient()
    table = (0).to_bytes(4, "big")  # {}
    for _ in range(3000):  # RecursionError at ~500 levels before
        entry = bytes([1]) + b"a" + b"F" + table
        table = len(entry).to_bytes(4, "big") + entry
    outer = {"deep": None, "after": 1}
    entry = bytes([4]) + b"deep" + b"F" + table + bytes([5]) + b"after" + b"b\x01"
    consumed, decoded = decode.field_table(len(entry).to_bytes(4, "big") + entry)
    assert consumed == 4 + len(entry)
    assert decoded.keys() == outer.keys() and decoded["after"] == 1


class _Props:
    def __init__(self, headers: dict[str, object] | None, message_id: str | None) -> None:
        self.headers, self.message_id = headers, message_id
        self.content_type = self.correlation_id = self.app_id = None
        self.timestamp = None


class _Message:
    def __init__(self, headers: dict[str, object] | None, message_id: str | None) -> None:
        self.header = type("Header", (), {"properties": _Props(headers, message_id)})()


def test_every_copy_keeps_the_producers_message_id_and_small_frames_keep_headers() -> None:
    from alertd.adapters.amqp import _republished

    first = _republished(_Message({"p": 1}, "producer-42"), {"x-alertd-attempt": 2},
                         131072)  # type: ignore[arg-type]
    again = _republished(_Message(first.headers, first.message_id), {"x-alertd-attempt": 3},
                         131072)  # type: ignore[arg-type]
    assert first.headers[ORIGINAL_MESSAGE_ID_HEADER] == "producer-42"
    assert again.headers[ORIGINAL_MESSAGE_ID_HEADER] == "producer-42"
    assert again.message_id not in (first.message_id, "producer-42")
    # A producer's own x-alertd-message-id of another type cannot break the copy.
    odd = _republished(_Message({ORIGINAL_MESSAGE_ID_HEADER: {"a": 1}}, "m-7"), {},
                       131072)  # type: ignore[arg-type]
    assert odd.headers[ORIGINAL_MESSAGE_ID_HEADER] == "m-7"
    # RabbitMQ's smallest frame_max: nothing to drop when the producer sent no headers.
    small = _republished(_Message(None, None), {"x-alertd-reason": "x"},
                         4096)  # type: ignore[arg-type]
    assert DROPPED_HEADERS_HEADER not in small.headers
