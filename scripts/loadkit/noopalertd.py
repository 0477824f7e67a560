"""``python -m loadkit.noopalertd start ...``: the real alertd with adapters that do nothing.

For ``scripts/loadtest --noop-adapters`` only: it measures what the framework
(master, children, AMQP consumer, handler, use case, stats, /metrics) costs
per message, with nothing behind it. alertd itself has no such mode on
purpose: an alertd that acks without storing loses alerts.

The wrapper replaces ``alertd.bootstrap.open_world`` and then runs alertd's
own command line unchanged. Children are forked from this process after the
replacement, so every child opens the no-op world. The adapters are
stateless and allocate nothing per call beyond what the ports return, so
their own cost is as close to zero as Python allows.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Collection, Sequence
from types import TracebackType

from alertd import bootstrap
from alertd.config import Settings
from alertd.domain import JSON, DownloadedVideo, Outcome, WebhookEvent
from alertd.ports import AttemptRecord, DeliveryResult, PendingDelivery
from tests.fakes import VIDEO_METADATA

VIDEO = DownloadedVideo("/nonexistent/alertd-noop.mp4", 20_000, "0" * 64)
DELIVERED = DeliveryResult(ok=True, status_code=200)


class _FixedVideo:
    """An async context manager yielding the same video; reusable, since it holds no state."""

    async def __aenter__(self) -> DownloadedVideo:
        return VIDEO

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


class NoopFetcher:
    """A VideoFetcher that downloads nothing: every URL is the same fixed video."""

    _video = _FixedVideo()

    def fetch_video(self, url: str) -> _FixedVideo:
        return self._video


class NoopProber:
    """A Prober that reads nothing: every file has the same metadata."""

    async def probe(self, path: str) -> JSON:
        return VIDEO_METADATA  # the use case copies it, never changes it


class NoopStore:
    """ResultStore and WebhookOutbox without a database: nothing stored, nothing ever due."""

    async def check_schema(self) -> None:
        return None

    async def recorded_fingerprint(self, alert_id: str) -> str | None:
        return None

    async def record_outcome(self, outcome: Outcome, event: WebhookEvent | None) -> bool:
        return True

    async def claim_due(
        self, limit: int, lease_s: float, *, skip_receivers: Collection[str] = (),
        only_receivers: Collection[str] | None = None,
    ) -> Sequence[PendingDelivery]:
        return ()

    async def count_pending(self) -> int:
        return 0

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        return None  # never reached: nothing is claimed


class NoopSender:
    """A WebhookSender that posts nothing."""

    async def deliver(self, delivery: PendingDelivery) -> DeliveryResult:
        return DELIVERED


async def open_noop_world(settings: Settings) -> bootstrap.World:
    """What ``bootstrap.open_world`` returns, with no I/O behind any port."""
    store = NoopStore()
    return bootstrap.World(fetcher=NoopFetcher(), prober=NoopProber(), store=store,
                           outbox=store, sender=NoopSender(),
                           postgres=store,  # type: ignore[arg-type]  # only check_schema
                           closers=contextlib.AsyncExitStack())


def main() -> None:
    from alertd.cli import main as alertd_main

    bootstrap.open_world = open_noop_world
    print("alertd with no-op adapters (load test only): nothing is downloaded, probed, "
          "stored or delivered", file=sys.stderr, flush=True)
    alertd_main()


if __name__ == "__main__":
    main()
