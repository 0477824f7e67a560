"""End-to-end harness: ``alertd start`` as a subprocess, local servers, broker and DB probes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import orjson
import pika
import pika.exceptions
import psycopg
from aiohttp import web
from psycopg.rows import dict_row

from alertd.adapters.amqp import topology
from alertd.config import Settings
from alertd.errors import AlertdError
from alertd.publish import publish_bodies
from alertd.statusclient import fetch_status
from tests.conftest import rabbitmqctl
from tests.servers import ClipServer, Reply, SeenRequest, WebhookSink

ALERTD = str(Path(sys.executable).with_name("alertd"))
TEST_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    """Poll ``predicate`` until truthy; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


async def eventually(condition: Callable[[], object], within_s: float = 5.0,
                     what: str = "condition") -> None:
    """Poll ``condition`` from a coroutine until true, or fail the test with ``what``.

    For states with no event to wait on: a file appearing, a broker redelivering.
    """
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {within_s:g}s waiting for {what}")


class SlowClipServer(ClipServer):
    """A ClipServer whose ``/slow/<name>?delay=S`` waits S seconds before sending the clip."""

    def __init__(self, files: Mapping[str, str | Path], host: str = "127.0.0.1") -> None:
        super().__init__(files, host=host)
        self.app.router.add_get("/slow/{name}", self._slow)

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return await self._clip(request)


class Servers:
    """A clip server and a webhook sink on an event loop in a background thread."""

    def __init__(self, clips: Mapping[str, Path], sink_script: Sequence[int | Reply] = (200,)
                 ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.clips = SlowClipServer({name: str(path) for name, path in clips.items()})
        self.sink = WebhookSink(sink_script)

    def __enter__(self) -> Self:
        self._thread.start()
        self._run(self.clips.__aenter__())
        self._run(self.sink.__aenter__())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._run(self.sink.__aexit__(None, None, None))
        self._run(self.clips.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def clip_url(self, name: str) -> str:
        return self.clips.url(f"/clips/{name}")

    def hook_url(self, path: str = "/hook") -> str:
        return self.sink.url(path)

    def webhooks(self) -> list[SeenRequest]:
        return list(self.sink.requests)

    def webhooks_by_alert(self) -> dict[str, list[SeenRequest]]:
        by_alert: dict[str, list[SeenRequest]] = {}
        for request in self.webhooks():
            by_alert.setdefault(orjson.loads(request.body)["alert_id"], []).append(request)
        return by_alert


class Alertd:
    """``alertd start`` in a subprocess with its own control socket and log file."""

    def __init__(self, tmp_path: Path, amqp_url: str, dsn: str, *args: str, workers: int = 1,
                 concurrency: int = 4, env: Mapping[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.control = str(tmp_path / "control.sock")
        self.log_path = tmp_path / "alertd.log"
        self.workers = workers
        self.argv = [
            ALERTD, "start", "--workers", str(workers), "--concurrency", str(concurrency),
            "--amqp-url", amqp_url, "--dsn", dsn, "--control-socket", self.control,
            "--allow-network", "127.0.0.1/32", "--log-level", "debug", *args,
        ]
        self.env = {**os.environ, "ALERTD_WEBHOOK_SECRET": TEST_SECRET, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any] | None:
        try:
            return fetch_status(self.control, timeout=2)
        except (AlertdError, ValueError):
            return None

    def children(self) -> list[dict[str, Any]]:
        doc = self.status()
        return doc["children"] if doc else []

    def consuming(self, count: int | None = None) -> bool:
        kids = [c for c in self.children() if c["state"] == "consuming" and not c["retiring"]]
        return len(kids) >= (self.workers if count is None else count)

    def wait_consuming(self, timeout: float = 30, count: int | None = None) -> Self:
        def ready() -> bool:
            self.assert_running()
            return self.consuming(count)
        wait_until(ready, timeout, "every child to consume")
        return self

    def assert_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"alertd exited with {self.proc.returncode}:\n{self.log()}")

    def send(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is not None:
                self._log.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.send(signal.SIGTERM)
        try:
            self.wait(60)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def publish(amqp_url: str, bodies: Iterable[bytes | str | dict[str, Any]],
            queue: str = "alerts") -> int:
    encoded = [b if isinstance(b, bytes) else b.encode() if isinstance(b, str)
               else orjson.dumps(b) for b in bodies]
    return publish_bodies(Settings(amqp_url=amqp_url, queue=queue), encoded)


def rows(dsn: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return {r["alert_id"]: r for r in conn.execute("SELECT * FROM alerts")}


def outbox(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return list(conn.execute("SELECT * FROM webhook_outbox ORDER BY id"))


def vhost_of(amqp_url: str) -> str:
    return unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"


def close_broker_connections(amqp_url: str, why: str) -> None:
    """Make the broker close every connection of the URL's vhost, as an outage would."""
    rabbitmqctl("close_all_connections", "-p", vhost_of(amqp_url), why)


def queue_counts(amqp_url: str, queue: str = "alerts") -> dict[str, int]:
    """Ready messages per queue (main, DLQ, delay queues), live from passive declares.

    ``rabbitmqctl list_queues`` lags by its stats interval for quorum queues,
    so it is not used. Unacked messages are not counted here: stop alertd
    first and they come back as ready.
    """
    settings = Settings(amqp_url=amqp_url, queue=queue)
    names = [name for name, _ in topology(settings)]
    counts = {}
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for name in names:
            channel = connection.channel()
            try:
                ok = channel.queue_declare(name, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                continue  # not declared with these settings
            counts[name] = ok.method.message_count
            channel.close()
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return counts


def queue_settled(amqp_url: str, queue: str = "alerts") -> bool:
    """Nothing ready in the main queue and its delay queues."""
    return all(count == 0 for name, count in queue_counts(amqp_url, queue).items()
               if name != f"{queue}.dlq")


def take_dead_letters(amqp_url: str, queue: str = "alerts") -> list[tuple[bytes, dict[str, Any]]]:
    """Consume (and ack) everything in ``<queue>.dlq``: body and headers of each."""
    taken = []
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(f"{queue}.dlq", auto_ack=True)
            if method is None:
                break
            taken.append((body, dict(props.headers or {})))
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return taken


def alert(alert_id: str, video_url: str, webhook_url: str, **extra: Any) -> dict[str, Any]:
    return {"alert_id": alert_id, "video_url": video_url, "webhook_url": webhook_url, **extra}


def kill_quietly(pid: int, signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


# -- master supervision (tests/e2e/test_master.py) ----------------------------------------


@contextlib.contextmanager
def unmigrated_database() -> Iterator[str]:
    """A database that exists but was never migrated: children must refuse it (exit 3)."""
    from tests.conftest import RUN_ID, create_database, drop_database

    name = f"alertd_test_{RUN_ID}_raw_{uuid.uuid4().hex[:6]}"
    dsn = create_database(name)
    try:
        yield dsn
    finally:
        drop_database(name)


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of ``GET http://127.0.0.1:<port><path>`` (errors included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric_values(port: int) -> dict[str, float]:
    """The /metrics samples on ``port``, keyed by ``name{labels}`` as exposed."""
    status, body = http_get(port, "/metrics")
    assert status == 200, status
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def run_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """``alertd <args>`` in a subprocess, output captured as text."""
    return subprocess.run([ALERTD, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


SPAWNED = re.compile(r"spawned child (\d+) pid (\d+) \(generation (\d+)\)")


def spawned(log: str) -> list[tuple[int, int, int]]:
    """(index, pid, generation) of every child the master forked, in order."""
    return [(int(i), int(p), int(g)) for i, p, g in SPAWNED.findall(log)]


def lines_with(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


def webhook_ids_by_alert(srv: Servers) -> dict[str, set[str]]:
    """Distinct webhook-ids the sink got per alert (a repeat of one id is at-least-once)."""
    return {alert_id: {r.headers["webhook-id"] for r in requests}
            for alert_id, requests in srv.webhooks_by_alert().items()}


class ConfigFileAlertd(Alertd):
    """``alertd start --config FILE`` with workers and concurrency only in the file.

    The base class puts them on the command line, where they would outrank
    the file and a reload (HUP) could not change them.
    """

    def __init__(self, tmp_path: Path, amqp_url: str, dsn: str, config: Path, *args: str,
                 workers: int, env: Mapping[str, str] | None = None) -> None:
        super().__init__(tmp_path, amqp_url, dsn, *args, workers=workers, env=env)
        for flag in ("--workers", "--concurrency"):
            at = self.argv.index(flag)
            del self.argv[at:at + 2]
        self.argv[2:2] = ["--config", str(config)]


class SessionAlertd(Alertd):
    """An ``alertd start`` leading a process group of its own, as a terminal's job does."""

    def start(self) -> Self:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    def send_group(self, signum: int) -> None:
        """Signal the master and every child at once (Ctrl-C sends SIGINT like this)."""
        os.killpg(self.pid, signum)


@dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() when received
    pid: int  # sender, from SCM_CREDENTIALS
    text: str

    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text.splitlines() if "=" in line)


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: records each datagram and who sent it.

    ``on_datagram`` runs in the receiving thread as each one arrives, so a test
    can look at the world at that very moment (e.g. ask ``alertd status`` on READY=1).
    """

    def __init__(self, path: Path,
                 on_datagram: Callable[[Datagram], None] | None = None) -> None:
        self.path = str(path)
        self.received: list[Datagram] = []
        self._on_datagram = on_datagram
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _receive(self) -> None:
        creds_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self._sock.recvmsg(4096, creds_size)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
            datagram = Datagram(time.monotonic(), pid, data.decode("utf-8", "replace"))
            self.received.append(datagram)
            if self._on_datagram is not None:
                self._on_datagram(datagram)

    def with_field(self, name: str, value: str | None = None) -> list[Datagram]:
        return [d for d in list(self.received) if name in d.fields()
                and (value is None or d.fields()[name] == value)]


def forked_pids(pid: int) -> list[int]:
    """The live children of ``pid`` as the kernel lists them, at once after each fork."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
