"""Operator tools for the dead-letter queue: list, show, replay, purge, losing nothing.

Listing takes messages with ``basic.get`` without acking and gives every one
back (``basic.nack`` with requeue) before returning, so looking at the DLQ
never consumes it. Replay publishes to the main queue with a confirm first
and only then acks the dead letter: a crash in between duplicates, never loses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from alertd.adapters.amqp import dlq_name
from alertd.config import Settings
from alertd.errors import AlertdError
from alertd.handler import ATTEMPT_HEADER, REASON_HEADER

# Headers a replayed message must not carry: it starts over as a fresh alert.
RESET_ON_REPLAY = (ATTEMPT_HEADER, REASON_HEADER, "x-alertd-dead-lettered-at", "x-alertd-queue",
                   "x-alertd-received-at", "x-alertd-last-error",
                   "x-delivery-count", "x-death", "x-first-death-exchange",
                   "x-first-death-queue", "x-first-death-reason", "x-last-death-exchange",
                   "x-last-death-queue", "x-last-death-reason")


@dataclass(frozen=True)
class DeadLetter:
    position: int
    body: bytes
    headers: dict[str, Any]

    @property
    def alert_id(self) -> str | None:
        try:
            doc = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            # Valid JSON orjson refuses (1e400, a lone surrogate in another
            # field) still names its alert, as parse_alert reads it.
            try:
                doc = json.loads(self.body)
            except (ValueError, RecursionError):
                return None
        value = doc.get("alert_id") if isinstance(doc, dict) else None
        return value if isinstance(value, str) else None

    @property
    def reason(self) -> str:
        reason = self.headers.get(REASON_HEADER)
        if reason is not None:
            return _text(reason)
        # Dead-lettered by the broker itself (quorum delivery limit).
        return _text(self.headers.get("x-first-death-reason", "unknown"))

    def summary(self) -> dict[str, Any]:
        return {"position": self.position, "alert_id": self.alert_id, "reason": self.reason,
                "dead_lettered_at": _text(self.headers.get("x-alertd-dead-lettered-at", "")),
                "bytes": len(self.body)}


@contextmanager
def _channel(settings: Settings) -> Iterator[BlockingChannel]:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    except pika.exceptions.AMQPError as exc:
        raise AlertdError(f"cannot connect to the broker: {exc!r}") from None
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise AlertdError(f"broker refused: {exc.reply_text}") from None
    except pika.exceptions.UnroutableError:
        # Not acked, so the dead letter stays where it was.
        raise AlertdError(f"queue {settings.queue!r} does not exist: nothing more was "
                          "replayed; start alertd (or 'alertd publish') to declare it, "
                          "then run this again") from None
    except pika.exceptions.AMQPError as exc:
        raise AlertdError(f"broker error: {exc!r}") from None
    finally:
        if connection.is_open:
            connection.close()


@dataclass(frozen=True)
class Walked:
    letters: list[DeadLetter]
    left: int  # dead letters that were in the DLQ at the start and were not looked at


def _walk(settings: Settings, limit: int,
          decide: Callable[[BlockingChannel, DeadLetter], bool]) -> Walked:
    """Get up to ``limit`` dead letters; ack those ``decide`` says True to, requeue the rest.

    Only as many as the DLQ held at the start: a replayed letter that a
    running alertd dead-letters again lands behind them and must not be
    taken (and replayed) again in the same walk.
    """
    seen: list[DeadLetter] = []
    with _channel(settings) as channel:
        ok = channel.queue_declare(dlq_name(settings.queue), passive=True)
        there = int(ok.method.message_count)
        tags_back = []
        try:
            for position in range(1, min(limit, there) + 1):
                method, props, body = channel.basic_get(dlq_name(settings.queue))
                if method is None:
                    break
                letter = DeadLetter(position, body, dict(props.headers or {}))
                seen.append(letter)
                if decide(channel, letter):
                    channel.basic_ack(method.delivery_tag)
                else:
                    tags_back.append(method.delivery_tag)
        finally:
            for tag in tags_back:
                channel.basic_nack(tag, requeue=True)
    return Walked(seen, max(0, there - len(seen)))


def list_dead_letters(settings: Settings, limit: int = 100) -> list[DeadLetter]:
    return _walk(settings, limit, lambda channel, letter: False).letters


def replay(settings: Settings, *, alert_ids: set[str] | None, limit: int = 10_000
           ) -> Walked:
    """Republish the chosen dead letters (all when ``alert_ids`` is None) to the main queue.

    ``letters`` are the replayed ones; ``left`` the letters not looked at."""
    replayed: list[DeadLetter] = []

    def republish(channel: BlockingChannel, letter: DeadLetter) -> bool:
        if alert_ids is not None and letter.alert_id not in alert_ids:
            return False
        headers = {k: v for k, v in letter.headers.items() if k not in RESET_ON_REPLAY}
        headers["x-alertd-replayed-from"] = letter.reason[:200]
        channel.basic_publish("", settings.queue, letter.body, pika.BasicProperties(
            delivery_mode=2, content_type="application/json", headers=headers),
            mandatory=True)
        replayed.append(letter)
        return True

    walked = _walk(settings, limit, republish)
    return Walked(replayed, walked.left)


def purge(settings: Settings) -> int:
    with _channel(settings) as channel:
        ok = channel.queue_purge(dlq_name(settings.queue))
        return int(ok.method.message_count)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
