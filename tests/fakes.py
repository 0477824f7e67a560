"""Recording fakes of the ports (and a stub DNS), shared by the tests."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from alertd.domain import JSON, DownloadedVideo, Outcome, WebhookEvent, webhook_receiver
from alertd.errors import ProcessingError, StoreUnavailable
from alertd.ports import AttemptRecord, DeliveryResult, PendingDelivery

VIDEO_METADATA: JSON = {
    "duration_s": 2.0,
    "format_name": "mov,mp4,m4a,3gp,3g2,mj2",
    "bit_rate": 123456,
    "video": {"codec": "h264", "width": 320, "height": 240, "fps": 25.0, "pix_fmt": "yuv420p"},
    "audio": {"codec": "aac", "sample_rate": 44100, "channels": 1},
    "streams": [
        {"index": 0, "codec_type": "video", "codec_name": "h264"},
        {"index": 1, "codec_type": "audio", "codec_name": "aac"},
    ],
}


@dataclass
class FakeFetcher:
    """Serves ``videos`` by URL; a URL mapped to an error raises it."""

    videos: dict[str, DownloadedVideo | ProcessingError] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)
    open_files: int = 0

    @asynccontextmanager
    async def fetch_video(self, url: str) -> AsyncIterator[DownloadedVideo]:
        self.fetched.append(url)
        default = DownloadedVideo(f"/tmp/fake/{len(self.fetched)}", 1000, "ab" * 32)
        found = self.videos.get(url, default)
        if isinstance(found, ProcessingError):
            raise found
        self.open_files += 1
        try:
            yield found
        finally:
            self.open_files -= 1


@dataclass
class FakeProber:
    metadata: JSON = field(default_factory=lambda: dict(VIDEO_METADATA))
    errors: dict[str, ProcessingError] = field(default_factory=dict)
    probed: list[str] = field(default_factory=list)

    async def probe(self, path: str) -> JSON:
        self.probed.append(path)
        if path in self.errors:
            raise self.errors[path]
        return dict(self.metadata)


@dataclass
class InMemoryStore:
    """Rows and outbox by alert id; ``outages`` calls fail with StoreUnavailable first;
    the first ``lost_replies`` outcomes recorded commit, then fail the same way (a
    reply lost with the connection after COMMIT)."""

    rows: dict[str, Outcome] = field(default_factory=dict)
    outbox: list[WebhookEvent] = field(default_factory=list)
    outages: int = 0
    lost_replies: int = 0
    calls: int = 0

    def _maybe_unavailable(self) -> None:
        self.calls += 1
        if self.outages > 0:
            self.outages -= 1
            raise StoreUnavailable("fake outage")

    async def recorded_fingerprint(self, alert_id: str) -> str | None:
        self._maybe_unavailable()
        row = self.rows.get(alert_id)
        return None if row is None else row.alert.fingerprint

    async def record_outcome(self, outcome: Outcome, event: WebhookEvent | None) -> bool:
        self._maybe_unavailable()
        if (stored := self.rows.get(outcome.alert.alert_id)) is not None:
            return ((stored.processed_at, stored.status, stored.attempts,
                     stored.alert.fingerprint) == (outcome.processed_at, outcome.status,
                                                   outcome.attempts, outcome.alert.fingerprint))
        self.rows[outcome.alert.alert_id] = outcome
        if event is not None:
            self.outbox.append(event)
        if self.lost_replies > 0:
            self.lost_replies -= 1
            raise StoreUnavailable("fake lost reply")
        return True


@dataclass
class InMemoryOutbox:
    """A WebhookOutbox: ``pending`` rows, ``attempts`` recorded (with their
    ``retry_in_s``), ``finished`` rows; due times by this fake's clock."""

    pending: list[PendingDelivery] = field(default_factory=list)
    attempts: list[tuple[PendingDelivery, DeliveryResult, float | None]] = field(
        default_factory=list)
    due_at: dict[int, dt.datetime] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)
    writes: list[int] = field(default_factory=list)  # attempts per record_attempts call

    async def claim_due(
        self, limit: int, lease_s: float, *, skip_receivers: Collection[str] = (),
        only_receivers: Collection[str] | None = None,
    ) -> Sequence[PendingDelivery]:
        now = dt.datetime.now(dt.UTC)
        due = [d for d in self.pending
               if d.delivery_id not in self.finished
               and self.due_at.get(d.delivery_id, now) <= now
               and webhook_receiver(d.url) not in skip_receivers
               and (only_receivers is None or webhook_receiver(d.url) in only_receivers)][:limit]
        for d in due:
            self.due_at[d.delivery_id] = now + dt.timedelta(seconds=lease_s)
        return due

    async def count_pending(self) -> int:
        return len([d for d in self.pending if d.delivery_id not in self.finished])

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        self.writes.append(len(attempts))
        for record in attempts:
            self._record(record.delivery, record.result, record.retry_in_s)

    def _record(
        self, delivery: PendingDelivery, result: DeliveryResult, retry_in_s: float | None,
    ) -> None:
        self.attempts.append((delivery, result, retry_in_s))
        index = self.pending.index(next(p for p in self.pending
                                         if p.delivery_id == delivery.delivery_id))
        if delivery.delivery_id in self.finished and not result.ok:
            return  # an ended row stays ended; only a delivery turns it delivered
        if result.ok or result.gone or retry_in_s is None:
            self.finished[delivery.delivery_id] = (
                "delivered" if result.ok else "gone" if result.gone else "failed")
            return
        self.pending[index] = PendingDelivery(
            delivery.delivery_id, delivery.webhook_id, delivery.alert_id, delivery.url,
            delivery.body, delivery.attempts + 1)
        self.due_at[delivery.delivery_id] = (
            dt.datetime.now(dt.UTC) + dt.timedelta(seconds=retry_in_s))


@dataclass
class RecordingSender:
    """A WebhookSender answering from ``script`` (then ok); ``sent`` records every call."""

    script: list[DeliveryResult] = field(default_factory=list)
    sent: list[PendingDelivery] = field(default_factory=list)

    async def deliver(self, delivery: PendingDelivery) -> DeliveryResult:
        self.sent.append(delivery)
        if self.script:
            return self.script.pop(0)
        return DeliveryResult(ok=True, status_code=200)


async def no_sleep(seconds: float) -> None:
    """A Sleep that returns at once, for the service's store waits."""


@dataclass
class FakeDns:
    """Stands in for ``loop.getaddrinfo``: answers from ``answers``; any other lookup fails.

    Install with ``monkeypatch.setattr(loop, "getaddrinfo", dns)``: no name is
    resolved for real, so no query can leave the machine. A numeric-only
    lookup (``AI_NUMERICHOST``) of another host fails as glibc's does.
    """

    answers: dict[str, list[str]]
    lookups: list[str] = field(default_factory=list)
    numeric_lookups: list[str] = field(default_factory=list)

    async def __call__(
        self, host: str, port: int, *, family: int = socket.AF_UNSPEC, flags: int = 0,
        **_: Any,
    ) -> list[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]]:
        numeric = bool(flags & socket.AI_NUMERICHOST)
        (self.numeric_lookups if numeric else self.lookups).append(host)
        if host not in self.answers:
            if numeric:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            raise AssertionError(f"unexpected lookup of {host!r}")
        infos: list[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]] = []
        for address in self.answers[host]:
            v6 = ":" in address
            fam = socket.AF_INET6 if v6 else socket.AF_INET
            if family in (socket.AF_UNSPEC, fam):
                sockaddr = (address, port, 0, 0) if v6 else (address, port)
                infos.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return infos
