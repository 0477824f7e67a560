"""Publishing with confirms: a closed loop for the measured runs, a fast prefill for the others.

An alert is outstanding from its publish until the sink has answered 200 to
its webhook. A window a little above the slot count keeps every slot busy
while the queue stays short, so the latency measured is that of a loaded
alertd and not the time spent behind a backlog the publisher made. The raw
consumer and the no-op runs consume a prefilled queue instead (:func:`prefill`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import aiormq
import orjson
import pika
import pika.exceptions
from pamqp import commands as spec

from alertd.adapters.amqp import declare_topology
from alertd.config import Settings
from alertd.publish import ensure_queue

PROGRESS_EVERY_S = 0.25
HEARTBEAT_SLICE_S = 1.0  # pika's blocking connection needs servicing while we wait


class Tracker:
    """Which alerts are published and which have their webhook; thread-safe."""

    def __init__(self) -> None:
        self.published: dict[str, float] = {}
        self.delivered: dict[str, float] = {}  # alert id -> receive time of the 200 attempt
        self._changed = threading.Condition()

    def add_published(self, alert_id: str, at: float) -> None:
        with self._changed:
            self.published[alert_id] = at

    def add_delivered(self, alert_id: str, at: float) -> None:
        with self._changed:
            if alert_id in self.published and alert_id not in self.delivered:
                self.delivered[alert_id] = at
                self._changed.notify_all()

    def outstanding(self) -> int:
        with self._changed:
            return len(self.published) - len(self.delivered)

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)


class Progress:
    """A one-line progress bar on stderr (tqdm's when it happens to be installed)."""

    def __init__(self, label: str, total: int) -> None:
        self._label, self._total, self._last = label, total, 0.0
        self._started = time.monotonic()
        self._bar: Any = None
        if importlib.util.find_spec("tqdm") is not None and sys.stderr.isatty():
            from tqdm import tqdm  # only if already installed
            self._bar = tqdm(total=total, desc=label, unit="alert", leave=False)

    def update(self, published: int, delivered: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        if self._bar is not None:
            self._bar.n = delivered
            self._bar.set_postfix(published=published, refresh=True)
            return
        width = 30
        filled = int(width * delivered / max(1, self._total))
        rate = delivered / max(1e-9, now - self._started)
        line = (f"\r  {self._label} [{'#' * filled}{'.' * (width - filled)}] "
                f"{delivered}/{self._total} webhooks, {published} published, {rate:6.1f}/s ")
        if sys.stderr.isatty() or force:
            sys.stderr.write(line)
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 100 + "\r")
        else:
            sys.stderr.write("\n")
        sys.stderr.flush()


class Publisher:
    """One pika connection with publisher confirms on ``settings.queue``."""

    def __init__(self, settings: Settings) -> None:
        self._queue = settings.queue
        self._connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        ensure_queue(self._connection, settings)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        self._props = pika.BasicProperties(delivery_mode=2, content_type="application/json")

    def publish(self, body: bytes) -> None:
        """Returns once the broker confirmed; raises if it refused."""
        self._channel.basic_publish("", self._queue, body, self._props, mandatory=True)

    def idle(self) -> None:
        self._connection.process_data_events(time_limit=0)

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()


def publish_closed_loop(publisher: Publisher, tracker: Tracker, *, ids: list[str],
                        body_for: Callable[[str, float], bytes], window: int,
                        deadline: float, progress: Progress | None = None) -> list[str]:
    """Publish ``ids`` in order, never more than ``window`` outstanding; stop at ``deadline``.

    ``deadline`` is a ``time.monotonic()`` value. Returns the ids published.
    """
    sent: list[str] = []
    for alert_id in ids:
        while tracker.outstanding() >= window:
            if time.monotonic() >= deadline:
                return sent
            tracker.wait(lambda: len(tracker.published) - len(tracker.delivered) < window,
                         min(HEARTBEAT_SLICE_S, PROGRESS_EVERY_S))
            publisher.idle()
            if progress is not None:
                progress.update(len(sent), len(tracker.delivered))
        if time.monotonic() >= deadline:
            return sent
        at = time.time()
        tracker.add_published(alert_id, at)
        publisher.publish(body_for(alert_id, at))
        sent.append(alert_id)
        if progress is not None:
            progress.update(len(sent), len(tracker.delivered))
    return sent


PREFILL_IN_FLIGHT = 500  # unconfirmed publishes at once: fast, and the broker keeps up


def prefill(amqp_url: str, bodies: list[bytes]) -> float:
    """Publish ``bodies`` to the alerts queue, every one confirmed; returns the seconds taken.

    Confirms are pipelined (``PREFILL_IN_FLIGHT`` outstanding) on one aiormq
    channel, so 10000 bodies take a second or two instead of the 10-20 s of
    one confirmed pika publish at a time: a paused alertd must not miss its
    AMQP heartbeats while the queue fills.
    """
    return asyncio.run(_prefill(amqp_url, bodies))


async def _prefill(amqp_url: str, bodies: list[bytes]) -> float:
    settings = Settings(amqp_url=amqp_url)
    props = spec.Basic.Properties(delivery_mode=2, content_type="application/json")
    started = time.monotonic()
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, settings)
        for first in range(0, len(bodies), PREFILL_IN_FLIGHT):
            confirms = await asyncio.gather(*(
                channel.basic_publish(body, exchange="", routing_key=settings.queue,
                                      properties=props, mandatory=True)
                for body in bodies[first:first + PREFILL_IN_FLIGHT]))
            refused = [c for c in confirms if not isinstance(c, spec.Basic.Ack)]
            if refused:
                raise RuntimeError(f"the broker refused {len(refused)} publishes: {refused[0]!r}")
    finally:
        await connection.close()
    return time.monotonic() - started


def alert_bodies(prefix: str, count: int, *, video_url: str, webhook_url: str) -> list[bytes]:
    """``count`` distinct alerts of the load test's shape (ids ``<prefix>-<i>``)."""
    return [orjson.dumps({"alert_id": f"{prefix}-{i}", "video_url": video_url,
                          "webhook_url": webhook_url, "source": "loadtest",
                          "attributes": {"published_at": time.time(), "run": prefix}})
            for i in range(count)]
