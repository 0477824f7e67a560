"""Ports: what the use case needs from the outside world, as Protocols.

Adapters do not inherit from these; mypy checks that they fit. Every contract
below is what callers may rely on and what an adapter must honour.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from alertd.domain import JSON, DownloadedVideo, Outcome, WebhookEvent


class VideoFetcher(Protocol):
    def fetch_video(self, url: str) -> AbstractAsyncContextManager[DownloadedVideo]:
        """Download ``url`` into a private temp file, yielded for the block's duration.

        The file is removed when the block exits, on every path. The size is
        capped, timeouts apply, every hop's address is checked. Raises
        ``PermanentError`` (not found, too large, forbidden address, too many
        redirects, 4xx) or ``TransientError`` (timeouts, connection errors, 5xx,
        local disk full); nothing else.
        """
        ...


class Prober(Protocol):
    async def probe(self, path: str) -> JSON:
        """Read a local file's media metadata; never opens anything but ``path``.

        Returns the normalized keys ``duration_s``, ``format_name``,
        ``bit_rate``, ``video``, ``audio`` and ``streams`` (the caller adds
        ``size_bytes`` and ``sha256``). Raises ``PermanentError`` with
        ``not_a_video`` when the file has no stream or cannot be parsed,
        ``probe_timeout`` when the prober had to be killed, ``probe_crashed``
        when it died.
        """
        ...


class ResultStore(Protocol):
    async def recorded_fingerprint(self, alert_id: str) -> str | None:
        """None when no outcome for ``alert_id`` is committed, else its request fingerprint.

        The fingerprint is the stored alert's ``Alert.fingerprint``, or ""
        when it was stored before fingerprints were kept. Raises
        ``StoreUnavailable`` when the store cannot answer.
        """
        ...

    async def record_outcome(self, outcome: Outcome, event: WebhookEvent | None) -> bool:
        """Commit the outcome and its webhook outbox row in one transaction.

        Idempotent by alert id: returns False, writing nothing, when an outcome
        for that alert is already stored (so a duplicate gets no second
        webhook). Returns True, writing nothing, when the stored outcome is
        this one (same request, status, attempt and ``processed_at``): an earlier call
        committed it and lost the reply with its connection, so this delivery
        recorded it. Returns only after the commit. Raises ``StoreUnavailable``
        when the commit did not happen or its reply was lost.
        """
        ...


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    """One outbox row claimed for delivery. ``webhook_id`` is stable across attempts."""

    delivery_id: int
    webhook_id: str
    alert_id: str
    url: str
    body: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What one POST attempt gave.

    ``ok``: a 2xx. ``gone``: 410, stop trying. ``permanent``: retrying cannot
    help (forbidden address, bad URL). ``retry_after``: seconds the receiver
    asked us to wait.
    """

    ok: bool
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None
    gone: bool = False
    permanent: bool = False
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One finished delivery attempt, to be written to the outbox.

    ``retry_in_s``: due again this many seconds after the outbox records it,
    by the outbox's clock (the one its leases and due checks use), not the
    dispatcher's host's, which may be set differently.
    """

    delivery: PendingDelivery
    result: DeliveryResult
    retry_in_s: float | None


class WebhookOutbox(Protocol):
    async def claim_due(
        self, limit: int, lease_s: float, *, skip_receivers: Collection[str] = (),
        only_receivers: Collection[str] | None = None,
    ) -> Sequence[PendingDelivery]:
        """Claim up to ``limit`` deliveries that are due, for ``lease_s`` seconds.

        A claimed row is not handed to anyone else until its lease runs out,
        so a process that dies mid-delivery delays it, never loses it.
        ``skip_receivers`` leaves out the rows of those receivers
        (``alertd.domain.webhook_receiver`` of their URL); ``only_receivers``
        takes only theirs. Raises ``StoreUnavailable``.
        """
        ...

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        """Record finished attempts. ``ok`` or ``gone`` or no ``retry_in_s``
        ends a row; otherwise it is due again that long after now (the
        outbox's now, as for leases). All or none, except that a
        batch holding the same row twice is written in several steps.

        Raises ``StoreUnavailable``; the leases then expire and the rows are
        tried again (the receiver deduplicates by ``webhook-id``).
        """
        ...

    async def count_pending(self) -> int:
        """How many deliveries are still pending (for the backlog metric)."""
        ...


class WebhookSender(Protocol):
    async def deliver(self, delivery: PendingDelivery) -> DeliveryResult:
        """POST the body, signed, to the delivery's URL; never raises for HTTP outcomes."""
        ...
