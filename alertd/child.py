"""One child: builds its world after fork, consumes on uvloop, reports, shuts down in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from typing import Any

import orjson
import uvloop

from alertd import bootstrap
from alertd.adapters.amqp import AmqpConsumer
from alertd.config import Settings
from alertd.errors import ConfigError, StoreUnavailable
from alertd.exitcodes import EXIT_CONFIG, EXIT_CRASH, EXIT_OK, EXIT_RECYCLED
from alertd.handle import reopen_log_files
from alertd.heap import keep_freed_memory
from alertd.outbox import OutboxDispatcher
from alertd.stats import ChildStats

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
# A pipe the master stops reading must not grow our memory without bound.
MAX_REPORT_BACKLOG = 1 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def live_children_cpu_s() -> float:
    """CPU of this process's live children (PyAV helpers).

    ``os.times()`` counts a child only once it is reaped; long-lived helpers
    would otherwise never show up in the CPU a child reports.
    """
    total = 0.0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as fh:
                pids = fh.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{int(pid)}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError, ValueError):
                continue
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


class Child:
    """Lifecycle: startup -> main loop -> shutdown, each a method of its own."""

    def __init__(self, settings: Settings, *, index: int = 0, report_fd: int | None = None,
                 generation: int = 0, master_pid: int | None = None) -> None:
        self.settings = settings
        self.index = index
        self.generation = generation
        self._report_fd = report_fd
        self.stats = ChildStats()
        self.state = "booting"
        self._stop = asyncio.Event()
        self._graceful = True
        self._exit_reason = "stopped"
        self._world: bootstrap.World | None = None
        self._consumer: AmqpConsumer | None = None
        self._dispatcher: OutboxDispatcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._report: asyncio.WriteTransport | None = None
        self._loop_lag = 0.0
        # The master that forked us (its pid taken before the fork: it may have
        # died since); a different parent means it died and we were adopted.
        self._master_pid = (master_pid or os.getppid()) if report_fd is not None else None
        # Jitter so that children started together do not all recycle together.
        self._max_alerts = 0
        if settings.max_alerts_per_child:
            jitter = random.randint(0, max(1, settings.max_alerts_per_child // 10))
            self._max_alerts = settings.max_alerts_per_child + jitter

    def run(self) -> int:
        """Run on a fresh uvloop loop; returns the process exit code."""
        # Every download allocates and frees the same body buffers.
        keep_freed_memory()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(self.serve())

    async def serve(self) -> int:
        self._install_signals()
        await self._open_report_pipe()
        self._heartbeat = asyncio.create_task(self._beat())
        try:
            if not await self.startup():
                return EXIT_OK
            await self.main_loop()
        except ConfigError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_CONFIG
        except Exception:
            log.exception("child crashed")
            return EXIT_CRASH
        finally:
            await self.shutdown()
        return EXIT_RECYCLED if self._exit_reason == "recycle" else EXIT_OK

    async def startup(self) -> bool:
        """Open the world and start consuming; False when a stop came first."""
        self._world = await bootstrap.open_world(self.settings)
        if not await self._wait_for_schema(self._world):
            return False
        self._dispatcher = bootstrap.outbox_dispatcher(self.settings, self._world, self.stats)
        handler = bootstrap.alert_handler(self.settings, self._world, self.stats,
                                          self._dispatcher)
        self._consumer = AmqpConsumer(self.settings, handler, self.stats,
                                      name=f"alertd child {self.index}")
        self._tasks = [asyncio.create_task(self._consumer.run(), name="consumer"),
                       asyncio.create_task(self._dispatcher.run(), name="outbox")]
        return True

    async def _wait_for_schema(self, world: bootstrap.World) -> bool:
        """Wait for the database at boot; a wrong schema is a config error (no retry)."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                await world.postgres.check_schema()
                return True
            except StoreUnavailable as exc:
                log.warning("database unavailable at start (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 30.0)
        return False

    async def main_loop(self) -> None:
        stop = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                assert self._consumer is not None
                self.state = "consuming" if self._consumer.consuming.is_set() else "connecting"
                done, _ = await asyncio.wait([stop, *self._tasks], timeout=1.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done - {stop}:
                    # consumer.run and dispatcher.run only return when told to.
                    task.result()
                    raise RuntimeError(f"{task.get_name()} stopped unexpectedly")
                if self._should_recycle():
                    self._exit_reason = "recycle"
                    break
        finally:
            stop.cancel()

    def _should_recycle(self) -> bool:
        s = self.settings
        processed = sum(v for k, v in self.stats.counters.items() if k[0] == "alerts")
        if self._max_alerts and processed >= self._max_alerts:
            log.info("recycling after %d alerts", processed)
            return True
        if s.max_memory_per_child and (rss := rss_bytes()) > s.max_memory_per_child:
            if processed:
                log.info("recycling: RSS %d > %d bytes", rss, s.max_memory_per_child)
            else:  # a limit meant in MB, given in bytes: the fleet churns through forks
                log.warning("recycling: RSS %d > %d bytes before a single alert: "
                            "max_memory_per_child (bytes) is below a child's own size, so "
                            "every child will; the master replaces them with backoff", rss,
                            s.max_memory_per_child)
            return True
        return False

    async def shutdown(self) -> None:
        """Stop intake, drain, requeue the rest, close the pool, the connection last."""
        self.state = "draining"
        self._send_heartbeat()
        consumer, dispatcher, world = self._consumer, self._dispatcher, self._world
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.graceful_timeout if self._graceful else 0.0)
        if consumer is not None:
            # basic.cancel first: no new deliveries while we finish the old ones.
            await consumer.stop_consuming()
            requeued = await consumer.drain(max(0.0, deadline - loop.time()))
            if requeued:
                log.warning("graceful timeout: %d in-flight alerts requeued", requeued)
        if dispatcher is not None:
            # A delivery cut short here is only retried once its claim's lease
            # runs out (a minute by default), so on a graceful stop the
            # deliveries in flight may finish and record their attempts first,
            # within what is left of the graceful timeout.
            dispatcher.stop()
            outbox = [t for t in self._tasks if t.get_name() == "outbox"]
            # The slowest delivery in flight, then the write of its attempt
            # (which may wait for a pooled connection: the checkout timeout).
            budget = min(self.settings.webhook_timeout + 6, deadline - loop.time())
            if outbox and self._graceful and budget > 0:
                await asyncio.wait(outbox, timeout=budget)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if world is not None:
            await world.close()
        if consumer is not None:
            # Last, so acks of drained alerts got out over a live connection.
            await consumer.close()
        self.state = "stopped"
        self._send_heartbeat()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._report is not None:
            self._report.close()

    def request_stop(self, *, graceful: bool) -> None:
        if self._stop.is_set():
            graceful = False  # a second signal means: stop now
        self._graceful = self._graceful and graceful
        if not graceful and self._consumer is not None:
            for task in list(self._consumer.tasks):
                task.cancel()
        self._stop.set()

    def _install_signals(self) -> None:
        """TERM drains, QUIT stops now, USR1 reopens log files; the rest is the master's.

        SIGINT is ignored (``_become_child``): Ctrl-C in a terminal reaches the
        whole process group, and the master relays it as TERM; had we acted on
        it too, the relayed TERM would count as a second signal and turn a
        graceful stop into a fast one. HUP, TTIN and TTOU are ignored as well,
        since their default actions would end or stop us.
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: self.request_stop(graceful=True))
        loop.add_signal_handler(signal.SIGQUIT, lambda: self.request_stop(graceful=False))
        loop.add_signal_handler(signal.SIGUSR1, reopen_log_files)

    async def _open_report_pipe(self) -> None:
        if self._report_fd is None:
            return
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(self._report_fd, "wb", buffering=0)
        self._report, _ = await loop.connect_write_pipe(asyncio.Protocol, pipe)

    async def _beat(self) -> None:
        """Heartbeat from a coroutine on our own loop: a blocked loop stops it."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            self._loop_lag = max(0.0, loop.time() - before - HEARTBEAT_INTERVAL_S)
            self._send_heartbeat()
            orphaned = self._master_pid is not None and os.getppid() != self._master_pid
            if orphaned and not self._stop.is_set():
                log.warning("master pid %s is gone; stopping", self._master_pid)
                self.request_stop(graceful=True)

    def heartbeat(self) -> dict[str, Any]:
        times = os.times()
        return {
            "type": "heartbeat",
            "pid": os.getpid(),
            "index": self.index,
            "generation": self.generation,
            "state": self.state,
            "ts": time.time(),
            "loop_lag_s": round(self._loop_lag, 4),
            "rss_bytes": rss_bytes(),
            "cpu_s": times.user + times.system,
            "children_cpu_s": times.children_user + times.children_system,
            "helpers_cpu_s": live_children_cpu_s(),
            "concurrency": self.settings.concurrency,
            # Draining on purpose, to exit EXIT_RECYCLED: the master may start
            # the replacement now instead of after the drain.
            "recycling": self._exit_reason == "recycle",
            **self.stats.snapshot(),
        }

    def _send_heartbeat(self) -> None:
        report = self._report
        if report is None or report.is_closing():
            return
        if report.get_write_buffer_size() > MAX_REPORT_BACKLOG:
            return
        report.write(orjson.dumps(self.heartbeat()) + b"\n")
