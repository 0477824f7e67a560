"""One child as the master sees it: pid, slot, pipe, last heartbeat; spawn and signal."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

from alertd.config import Settings
from alertd.exitcodes import EXIT_CRASH

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 4 << 20
# The signals the master handles. They are blocked across fork(): until the
# child has reset them, the master's handler (inherited) would run in the
# child and swallow e.g. the TERM of a stop that came while the child boots.
MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                  signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)


def fork_with_pipe() -> tuple[int, int, int, set[int | signal.Signals]]:
    """fork() with the master's signals blocked across it, and a pipe to report on.

    Returns ``(pid, read_fd, write_fd, mask)``. In the parent (pid > 0) the
    mask is already restored, the write end closed and the read end
    non-blocking. In the forked process (pid == 0) the master's signals are
    still blocked, so a signal cannot run the master's handler there before
    it installs its own; it must restore ``mask`` itself, then never return.
    """
    read_fd, write_fd = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # pragma: no cover - the forked process
        return pid, read_fd, write_fd, mask
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    return pid, read_fd, write_fd, mask


class ChildHandle:
    def __init__(self, pid: int, index: int, generation: int, read_fd: int) -> None:
        self.pid = pid
        self.index = index
        self.generation = generation
        self.read_fd = read_fd
        self.started = time.monotonic()
        self.last_beat = self.started
        self.consuming_since: float | None = None
        self.state = "booting"
        self.last_report: dict[str, Any] = {}
        self.retiring = False
        self.killed_at: float | None = None
        self.eof = False
        self._pending = bytearray()
        self._closed = False

    @classmethod
    def spawn(cls, settings: Settings, index: int, generation: int,
              *, close_in_child: list[int]) -> ChildHandle:
        """Fork a child; the child builds its own world and never returns from here."""
        master_pid = os.getpid()  # before the fork: the master may die before the child asks
        pid, read_fd, write_fd, mask = fork_with_pipe()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(read_fd)
            _become_child(settings, index, generation, write_fd, master_pid,
                          close_in_child=close_in_child, mask=mask)
        return cls(pid, index, generation, read_fd)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def read_heartbeats(self) -> list[dict[str, Any]]:
        """Read what the pipe holds; return complete heartbeats, newest last."""
        beats: list[dict[str, Any]] = []
        while not self._closed:
            try:
                chunk = os.read(self.read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._pending += chunk
        if len(self._pending) > MAX_PENDING_BYTES:  # a line that never ends: drop it
            self._pending.clear()
        *lines, rest = self._pending.split(b"\n")
        self._pending = bytearray(rest)
        for line in lines:
            try:
                beat = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            beats.append(beat)
            self._apply(beat)
        return beats

    def _apply(self, beat: dict[str, Any]) -> None:
        self.last_beat = time.monotonic()
        self.last_report = beat
        self.state = str(beat.get("state", self.state))
        if self.state == "consuming" and self.consuming_since is None:
            self.consuming_since = self.last_beat

    @property
    def recycling(self) -> bool:
        """The child said it is draining on purpose, to exit EXIT_RECYCLED."""
        return bool(self.last_report.get("recycling"))

    @property
    def processed(self) -> int:
        """Alerts it has finished (stored or failed), from its last heartbeat."""
        return sum(int(row[-1]) for row in self.last_report.get("counters", [])
                   if row[0] == "alerts")

    def consumed_for(self) -> float:
        if self.consuming_since is None:
            return 0.0
        return time.monotonic() - self.consuming_since

    def in_flight_alert_ids(self) -> list[str]:
        return [s["alert_id"] for s in self.last_report.get("slots", []) if s.get("alert_id")]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self.read_fd)


def _become_child(settings: Settings, index: int, generation: int, write_fd: int,
                  master_pid: int, *, close_in_child: list[int], mask: Iterable[int],
                  ) -> None:  # pragma: no cover - child side
    code = EXIT_CRASH
    try:
        # First, with the master's signals still blocked: our own dispositions.
        # A TERM or QUIT from now until Child.serve installs its handlers ends
        # the child at once, which is all a stop asks of one with nothing in flight.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # Signals meant for the master only. Their default actions would end
        # (INT, HUP, USR1) or stop (TTIN, TTOU) a child that gets one, e.g.
        # sent to the whole process group; INT comes back relayed as TERM.
        # Child.serve installs its own USR1 handler once its loop runs.
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                    signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # The master's SIGABRT for a hung child then shows where its loop is stuck.
        faulthandler.enable(all_threads=True)

        from alertd.child import Child
        from alertd.logs import set_role

        for fd in close_in_child:
            with contextlib.suppress(OSError):
                os.close(fd)
        # systemd talks to the master only (NotifyAccess=main).
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        set_role(f"child {index}")
        code = Child(settings, index=index, report_fd=write_fd, generation=generation,
                     master_pid=master_pid).run()
    except BaseException:
        log.exception("child %d failed", index)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def reopen_log_files() -> None:
    """USR1: reopen every log file handler (a no-op for the default stderr handler).

    A ``FileHandler`` without a stream opens its file again at the next
    record, so a log rotated away by an operator is followed by a fresh file.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                    handler.stream = None
            finally:
                handler.release()
