"""scripts/bench-hotpath's body: the CPU of each step of one alert, measured alone.

Every step runs serially on a uvloop loop through alertd's real adapters,
against servers in other processes (so their CPU is not counted), and is
reported as user and system CPU milliseconds per call of this process (plus
the PyAV helpers' for the probe). Their sum is the floor of "CPU ms/alert" in
``scripts/loadtest``: what an alert costs with no contention for the cores.

Steps: downloading the clip with ``HttpVideoFetcher`` (broken down into
receiving the body, hashing it and writing it), probing it with
``PyAVProber``, the two statements of the store, claiming and recording a
webhook, signing and POSTing it with ``HttpWebhookSender``, and the handler,
use case and stats with adapters that do nothing (no AMQP). Network traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import ipaddress
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from loadkit.clips import SIZES, make_clips  # noqa: E402

from alertd.adapters.download import HttpVideoFetcher  # noqa: E402
from alertd.adapters.postgres import PostgresStore, open_pool  # noqa: E402
from alertd.adapters.pyav import PyAVProber  # noqa: E402
from alertd.adapters.webhook import HttpWebhookSender  # noqa: E402
from alertd.domain import Alert, Outcome, webhook_event  # noqa: E402
from alertd.heap import keep_freed_memory  # noqa: E402
from alertd.netguard import AddressGuard  # noqa: E402
from alertd.ports import AttemptRecord, DeliveryResult  # noqa: E402
from tests.conftest import create_database, drop_database  # noqa: E402
from tests.ports import free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOOPBACK = [ipaddress.ip_network("127.0.0.1/32")]

# A clip server and a webhook sink, each a separate process.
SERVER = """
import sys
from aiohttp import web
blob = open(sys.argv[2], "rb").read()
async def clip(request):
    return web.Response(body=blob, content_type="video/mp4")
async def hook(request):
    await request.read()
    return web.Response(status=204)
app = web.Application()
app.router.add_get("/clip", clip)
app.router.add_post("/hook", hook)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


@dataclass(frozen=True)
class Row:
    step: str
    calls: int
    user_ms: float
    sys_ms: float

    @property
    def total_ms(self) -> float:
        return self.user_ms + self.sys_ms


def cpu_of(pids: tuple[int, ...] = ()) -> tuple[float, float]:
    """(user, system) CPU seconds of this process and of ``pids`` (live processes)."""
    own = os.times()
    user, system = own.user, own.system
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11]) / CLOCK_TICKS
        system += int(fields[12]) / CLOCK_TICKS
    return user, system


async def timed(step: str, calls: int, call: Callable[[int], Awaitable[object]],
                pids: Callable[[], tuple[int, ...]] = tuple, warmup: int = 10) -> Row:
    for i in range(warmup):
        await call(i)
    before = cpu_of(pids())
    for i in range(calls):
        await call(warmup + i)
    return per_call(step, calls, before, cpu_of(pids()))


def per_call(step: str, calls: int, before: tuple[float, float],
             after: tuple[float, float]) -> Row:
    calls = max(1, calls)
    return Row(step, calls, 1000 * (after[0] - before[0]) / calls,
               1000 * (after[1] - before[1]) / calls)


@contextmanager
def server(port: int, clip: Path) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(clip)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


async def measure(clip: Path, port: int, dsn: str, calls: int) -> list[Row]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/clip"
    rows = []
    async with aiohttp.ClientSession() as session:
        async def receive(_: int) -> None:
            async with session.get(url) as response:
                async for _chunk in response.content.iter_any():
                    pass
        rows.append(await timed("download: receive the body only (aiohttp)", calls, receive))
    blob = await asyncio.to_thread(clip.read_bytes)
    rows.append(await timed("download: sha256 of the body", calls,
                            _async(lambda _: hashlib.sha256(blob).hexdigest())))
    with_write = await _write_cost(blob, calls)
    rows.append(with_write)

    fetcher = HttpVideoFetcher(guard=AddressGuard(LOOPBACK), max_bytes=200 * 2**20,
                               connect_timeout=5, read_timeout=30, total_timeout=60)
    await fetcher.open()
    try:
        async def fetch(_: int) -> None:
            async with fetcher.fetch_video(url):
                pass
        rows.append(await timed("download: HttpVideoFetcher (all of the above)", calls, fetch))
        async with PyAVProber(timeout=30, size=1) as prober, fetcher.fetch_video(url) as video:
            rows.append(await timed("probe: PyAVProber (this process + helper)", calls,
                                    lambda _: prober.probe(video.path),
                                    pids=prober.helper_pids))
    finally:
        await fetcher.close()

    rows.extend(await _store_and_webhook(dsn, port, calls))
    rows.append(await _handler_cost(calls))
    return rows


def _async(fn: Callable[[int], object]) -> Callable[[int], Awaitable[object]]:
    async def call(i: int) -> object:
        return fn(i)
    return call


async def _write_cost(blob: bytes, calls: int) -> Row:
    chunks = [blob[i:i + 65536] for i in range(0, len(blob), 65536)]
    directory = os.environ.get("TMPDIR", "/tmp")

    def write(i: int) -> None:
        path = os.path.join(directory, f"alertd-bench-{os.getpid()}-{i}.clip")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for chunk in chunks:
                os.write(fd, chunk)
        finally:
            os.close(fd)
            os.unlink(path)
    return await timed("download: write to a new file, delete it", calls, _async(write))


async def _store_and_webhook(dsn: str, port: int, calls: int) -> list[Row]:
    pool = await open_pool(dsn, 4, application_name="alertd-bench")
    await pool.wait()
    store = PostgresStore(pool)
    now = dt.datetime.now(dt.UTC)
    hook = f"http://127.0.0.1:{port}/hook"
    outcomes = [
        Outcome.done(Alert(alert_id=f"bench-{uuid.uuid4().hex}", video_url="http://127.0.0.1/c",
                           webhook_url=hook, occurred_at=now, source="bench",
                           attributes={"n": i}),
                     {"duration_s": 4.0, "size_bytes": 2_000_000, "sha256": "0" * 64},
                     attempts=1, received_at=now, processed_at=now)
        for i in range(calls + 10)
    ]
    sender = HttpWebhookSender(guard=AddressGuard(LOOPBACK), secrets=(os.urandom(32),),
                               timeout=10, connect_timeout=5)
    await sender.open()
    try:
        rows = [
            await timed("store: dedup query (recorded_fingerprint)", calls,
                        lambda i: store.recorded_fingerprint(outcomes[i].alert.alert_id)),
            await timed("store: outcome + outbox row (record_outcome)", calls,
                        lambda i: store.record_outcome(
                            outcomes[i], webhook_event(outcomes[i], default_url=None))),
        ]
        claimed = []
        before = cpu_of()
        while batch := await store.claim_due(16, 60):
            claimed.extend(batch)
        rows.append(per_call("outbox: claim (16 per statement)", len(claimed), before,
                             cpu_of()))
        results: list[DeliveryResult] = []

        async def deliver(i: int) -> None:
            results.append(await sender.deliver(claimed[i]))
        rows.append(await timed("webhook: sign + POST (HttpWebhookSender)", calls, deliver))
        pairs = zip(claimed[10:], results[10:], strict=False)
        records = [AttemptRecord(d, r, None) for d, r in pairs]
        before = cpu_of()
        for at in range(0, len(records), 8):
            await store.record_attempts(records[at:at + 8])
        rows.append(per_call("outbox: record attempts (8 per statement)", len(records),
                             before, cpu_of()))
        return rows
    finally:
        await sender.close()
        await pool.close()


async def _handler_cost(calls: int) -> Row:
    from loadkit.noopalertd import NoopFetcher, NoopProber, NoopStore

    from alertd.config import Settings
    from alertd.handler import AlertHandler, InboundMessage
    from alertd.stats import ChildStats

    stats = ChildStats()
    handler = AlertHandler(Settings(amqp_url="amqp://127.0.0.1/", dsn="postgresql://x"),
                           fetcher=NoopFetcher(), prober=NoopProber(), store=NoopStore(),
                           stats=stats)
    bodies = [orjson.dumps({
        "alert_id": f"bench-{uuid.uuid4().hex}", "video_url": "http://127.0.0.1/load/tiny",
        "webhook_url": "http://127.0.0.1/hook", "occurred_at": "2026-11-29T02:00:00Z",
        "source": "bench", "attributes": {"n": i}}) for i in range(calls + 10)]

    async def handle(i: int) -> None:
        slot = stats.open_slot()
        await handler(InboundMessage(body=bodies[i], headers={}, redelivered=False), slot)
        stats.close_slot(slot)
    return await timed("handler + use case + stats (no-op adapters, no AMQP)", calls, handle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per step")
    parser.add_argument("--clip", default="large", choices=sorted(SIZES),
                        help="clip size, as scripts/loadtest's (default large, ~2 MB)")
    args = parser.parse_args(argv)
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "alertd-loadtest-clips"
    clip = make_clips(cache, (args.clip,))[args.clip]
    name = f"alertd_bench_{uuid.uuid4().hex[:8]}"
    dsn = create_database(name)
    try:
        subprocess.run([str(Path(sys.executable).with_name("alertd")), "db", "migrate",
                        "--dsn", dsn], check=True, capture_output=True, timeout=120)
        port = free_port()
        keep_freed_memory()  # as alertd's children do (alertd/heap.py)
        with server(port, clip):
            rows = uvloop.run(measure(clip, port, dsn, args.calls))
    finally:
        drop_database(name)
    print(f"clip {args.clip}: {clip.stat().st_size} bytes; {args.calls} calls per step, "
          "CPU ms per call (this process; the probe adds its helper)")
    print(f"{'step':58} {'user':>7} {'sys':>7} {'total':>7}")
    for row in rows:
        print(f"{row.step:58} {row.user_ms:7.3f} {row.sys_ms:7.3f} {row.total_ms:7.3f}")
    steps = [r for r in rows if not r.step.startswith("download: ") or "Fetcher" in r.step]
    print(f"{'sum per alert (fetcher, probe, store, outbox, webhook, handler)':58} "
          f"{'':7} {'':7} {sum(r.total_ms for r in steps):7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
