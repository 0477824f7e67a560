"""The queue's depth, read by a short-lived forked process so the master never waits on it.

One :class:`DepthProbe` is one process: it opens its own AMQP connection,
does a passive ``queue.declare`` (which creates nothing and returns the ready
count) and writes one JSON line to a pipe that the master's selector watches,
then exits. The master's only costs are a ``fork()`` and reading that line.
A probe that has not answered within ``PROBE_TIMEOUT_S`` is SIGKILLed; a
broker that is down, slow or refusing makes a probe report an error, never
the master block or raise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable
from typing import Any

import orjson
import pika
import pika.exceptions

from alertd.config import Settings
from alertd.handle import MASTER_SIGNALS, fork_with_pipe

# pika's own limits keep a probe's answer well inside the master's deadline.
SOCKET_TIMEOUT_S = 2.0
STACK_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 5.0
MAX_ANSWER_BYTES = 4096


class DepthProbe:
    """One probe process as the master sees it: pid, pipe, deadline and its answer."""

    def __init__(self, pid: int, read_fd: int, started: float) -> None:
        self.pid = pid
        self.read_fd = read_fd
        self.started = started
        self.ready: int | None = None
        self.error: str | None = None
        self.done = False
        self.reaped = False
        self._buffer = bytearray()
        self._closed = False

    @classmethod
    def spawn(cls, settings: Settings, *, close_in_child: list[int]) -> DepthProbe:
        """Fork the probe. ``close_in_child``: the master's fds it must not hold on to."""
        # As for children: the master's handlers must not run in the probe.
        pid, read_fd, write_fd, mask = fork_with_pipe()
        if pid == 0:  # pragma: no cover - runs in the probe
            _become_probe(settings, write_fd, [read_fd, *close_in_child], mask)
        return cls(pid, read_fd, time.monotonic())

    def read(self) -> None:
        """Take what the pipe holds; at EOF the answer (or its absence) is final."""
        while not self.done and not self._closed:
            try:
                chunk = os.read(self.read_fd, MAX_ANSWER_BYTES)
            except BlockingIOError:
                return
            if not chunk:
                self._finish()
                return
            self._buffer += chunk
            if len(self._buffer) > MAX_ANSWER_BYTES:
                self._finish()

    def _finish(self) -> None:
        self.done = True
        try:
            answer = orjson.loads(bytes(self._buffer))
        except orjson.JSONDecodeError:
            answer = {}
        if isinstance(answer, dict) and isinstance(answer.get("ready"), int):
            self.ready = answer["ready"]
        else:
            why = answer.get("error") if isinstance(answer, dict) else None
            self.error = str(why or "the probe exited without an answer")

    def overdue(self, now: float) -> bool:
        return not self.done and now - self.started > PROBE_TIMEOUT_S

    def kill(self) -> None:
        """SIGKILL an unanswered probe, unless the master already reaped its pid."""
        if not self.reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if not self.done:
            self.done = True
            self.error = f"no answer within {PROBE_TIMEOUT_S:g}s"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:  # once: the fd number may belong to someone else after
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self.read_fd)


def _become_probe(settings: Settings, write_fd: int, close_fds: list[int],
                  mask: Iterable[int]) -> None:  # pragma: no cover - probe side
    code = 1
    try:
        # The master reports for the probe (pika would log every refused connect).
        logging.disable(logging.CRITICAL)
        for sig in MASTER_SIGNALS:
            # TERM/QUIT end it; group signals (Ctrl-C, TTIN...) are the master's.
            keep_default = sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD)
            signal.signal(sig, signal.SIG_DFL if keep_default else signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # Belt and braces: even a probe the master forgot ends by itself.
        signal.alarm(int(PROBE_TIMEOUT_S) * 2)
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            answer = read_depth(settings)
        except Exception as exc:
            answer = {"error": f"probe failed: {exc!r}"}
        os.write(write_fd, orjson.dumps(answer))
        code = 0
    finally:
        os._exit(code)


def read_depth(settings: Settings) -> dict[str, Any]:
    """``{"ready": N}`` from a passive declare of the main queue, or ``{"error": why}``."""
    params = pika.URLParameters(settings.amqp_url)
    params.connection_attempts = 1
    params.retry_delay = 0
    params.socket_timeout = SOCKET_TIMEOUT_S
    params.stack_timeout = STACK_TIMEOUT_S
    params.blocked_connection_timeout = SOCKET_TIMEOUT_S
    params.client_properties = {"connection_name": "alertd master queue-depth probe"}
    try:
        connection = pika.BlockingConnection(params)
    except Exception as exc:  # pika's connector errors are not all AMQPError
        return {"error": f"cannot connect to the broker: {exc!r}"}
    try:
        ok = connection.channel().queue_declare(settings.queue, passive=True)
        return {"ready": int(ok.method.message_count)}
    except pika.exceptions.ChannelClosedByBroker as exc:
        return {"error": f"queue {settings.queue!r}: {exc.reply_text}"}
    except (pika.exceptions.AMQPError, OSError) as exc:
        return {"error": f"passive declare failed: {exc!r}"}
    finally:
        with contextlib.suppress(Exception):
            connection.close()
