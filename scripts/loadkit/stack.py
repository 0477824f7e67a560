"""The system under test: a fresh vhost and database per run, and ``alertd start`` around them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pika
import pika.exceptions

from alertd.errors import AlertdError
from alertd.statusclient import fetch_status
from loadkit.proctree import TreeWatch
from tests.conftest import create_database, create_vhost, delete_vhost, drop_database

ALERTD = str(Path(sys.executable).with_name("alertd"))
STOP_TIMEOUT_S = 45.0
VHOST_DELETE_TRIES = 3


class Environment:
    """A vhost and a migrated database named after ``tag``; both dropped on exit, always.

    ``with_database=False`` (no-op adapters, the raw consumer): the vhost only.
    """

    def __init__(self, tag: str, *, with_database: bool = True) -> None:
        self.vhost = f"alertd-load-{tag}"
        self.database = f"alertd_load_{tag}".replace("-", "_")
        self.with_database = with_database
        self.amqp_url = ""
        self.dsn = ""

    def __enter__(self) -> Environment:
        try:
            self.amqp_url = create_vhost(self.vhost)
            if self.with_database:
                self.dsn = create_database(self.database)
                # The alertd that will run migrates, not the alertd this process
                # imported: the schema must be the one its children expect.
                subprocess.run([ALERTD, "db", "migrate", "--dsn", self.dsn], check=True,
                               capture_output=True, timeout=120)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # rabbitmqctl can fail on a loaded machine; a vhost left behind is checked for.
        for _ in range(VHOST_DELETE_TRIES):
            delete_vhost(self.vhost)
            listed = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True,
                                    text=True, timeout=60, check=False)
            if listed.returncode == 0 and self.vhost not in listed.stdout.split():
                break
        else:
            print(f"  warning: could not delete vhost {self.vhost}", flush=True)
        if self.with_database:
            with contextlib.suppress(Exception):
                drop_database(self.database)

    def ready_messages(self, queues: Sequence[str]) -> dict[str, int]:
        """Ready messages per queue (passive declares; a missing queue is left out)."""
        counts = {}
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            for name in queues:
                channel = connection.channel()
                try:
                    counts[name] = channel.queue_declare(name, passive=True).method.message_count
                    channel.close()
                except pika.exceptions.ChannelClosedByBroker:
                    continue
        finally:
            with contextlib.suppress(Exception):
                connection.close()
        return counts


class AlertdProcess:
    """``alertd start`` in a session of its own; :meth:`stop` leaves no process behind."""

    def __init__(self, argv: list[str], *, env: dict[str, str], log_path: Path,
                 control_socket: str) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.control_socket = control_socket
        self.proc: subprocess.Popen[bytes] | None = None
        self.watch: TreeWatch | None = None
        self.exit_code: int | None = None
        self.stop_s = 0.0
        self.killed: list[int] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> AlertdProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.watch = TreeWatch(self.proc.pid).start()
        return self

    def wait_consuming(self, workers: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertd exited with {self.proc.returncode} before "
                                   f"consuming:\n{self.log_tail()}")
            kids = []
            with contextlib.suppress(AlertdError, ValueError, OSError):
                kids = fetch_status(self.control_socket, timeout=2)["children"]
            if sum(1 for c in kids if c["state"] == "consuming") >= workers:
                return
            time.sleep(0.1)
        raise RuntimeError(f"alertd's children did not all consume within {timeout:.0f}s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        """TERM (graceful), SIGKILL the group after STOP_TIMEOUT_S, then any straggler by id."""
        if self.proc is None:
            return
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.stop_s = time.monotonic() - started
        self.exit_code = self.proc.returncode
        if self.watch is not None:
            self.watch.stop()
            for pid in self.watch.survivors():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
