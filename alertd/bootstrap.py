"""The composition root: the only module that imports both the adapters and the use case."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from alertd.adapters.download import HttpVideoFetcher
from alertd.adapters.ffprobe import FfprobeProber
from alertd.adapters.postgres import PostgresStore, open_pool
from alertd.adapters.pyav import PyAVProber
from alertd.adapters.webhook import HttpWebhookSender
from alertd.config import Settings
from alertd.handler import AlertHandler
from alertd.netguard import AddressGuard
from alertd.outbox import OutboxDispatcher
from alertd.ports import Prober, ResultStore, VideoFetcher, WebhookOutbox, WebhookSender
from alertd.stats import ChildStats


@dataclass
class World:
    """Everything one child talks to, opened inside its event loop."""

    fetcher: VideoFetcher
    prober: Prober
    store: ResultStore
    outbox: WebhookOutbox
    sender: WebhookSender
    postgres: PostgresStore
    closers: contextlib.AsyncExitStack

    async def close(self) -> None:
        await self.closers.aclose()


async def open_world(settings: Settings) -> World:
    """Open the pool and the HTTP sessions. Call only inside a running loop, after fork."""
    stack = contextlib.AsyncExitStack()
    try:
        guard = AddressGuard(settings.allow_networks)
        pool = await open_pool(settings.dsn, settings.db_pool_size, statement_limits=True)
        stack.push_async_callback(pool.close)
        store = PostgresStore(pool)
        fetcher = HttpVideoFetcher.from_settings(settings, guard)
        await fetcher.open()
        stack.push_async_callback(fetcher.close)
        sender = HttpWebhookSender.from_settings(settings, guard)
        await sender.open()
        stack.push_async_callback(sender.close)
        prober = await open_prober(settings, stack)
    except BaseException:
        await stack.aclose()
        raise
    return World(fetcher=fetcher, prober=prober, store=store, outbox=store, sender=sender,
                 postgres=store, closers=stack)


async def open_prober(settings: Settings, closers: contextlib.AsyncExitStack) -> Prober:
    """The prober ``settings.prober`` names; a PyAV helper pool is closed with ``closers``."""
    if settings.prober == "pyav":
        pool = PyAVProber(timeout=settings.probe_timeout, size=settings.probe_helpers)
        return await closers.enter_async_context(pool)
    return FfprobeProber(timeout=settings.probe_timeout)


def alert_handler(settings: Settings, world: World, stats: ChildStats,
                  dispatcher: OutboxDispatcher) -> AlertHandler:
    return AlertHandler(settings, fetcher=world.fetcher, prober=world.prober,
                        store=world.store, stats=stats, on_committed=dispatcher.wake)


def outbox_dispatcher(settings: Settings, world: World, stats: ChildStats) -> OutboxDispatcher:
    # The lease outlives one delivery attempt by a wide margin, so a row is
    # only handed to another dispatcher when its claimer is really gone.
    lease = settings.webhook_timeout * 3 + 30
    return OutboxDispatcher(world.outbox, world.sender, stats,
                            max_attempts=settings.webhook_max_attempts, lease_s=lease)
