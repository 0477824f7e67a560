"""One child as the master sees it: pid, slot, pipe, last heartbeat; spawn and signal."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

import orjson

from alertd.config import Settings
from alertd.exitcodes import EXIT_CRASH

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 4 << 20


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
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(read_fd)
            _become_child(settings, index, generation, write_fd, close_in_child)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
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

    def consumed_for(self) -> float:
        if self.consuming_since is None:
            return 0.0
        return time.monotonic() - self.consuming_since

    def in_flight_alert_ids(self) -> list[str]:
        return [s["alert_id"] for s in self.last_report.get("slots", []) if s.get("alert_id")]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self.read_fd)


def _become_child(settings: Settings, index: int, generation: int, write_fd: int,
                  close_in_child: list[int]) -> None:  # pragma: no cover - child side
    code = EXIT_CRASH
    try:
        from alertd.child import Child
        from alertd.logs import set_role

        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for fd in close_in_child:
            with contextlib.suppress(OSError):
                os.close(fd)
        # systemd talks to the master only (NotifyAccess=main).
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        set_role(f"child {index}")
        code = Child(settings, index=index, report_fd=write_fd, generation=generation).run()
    except BaseException:
        log.exception("child %d failed", index)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
