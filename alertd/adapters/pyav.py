"""The Prober port on PyAV: libav in a small pool of long-lived helper processes.

libav never runs in the child. Each ``PyAVProber`` keeps ``size`` helpers
(``python -m alertd.probehelper``) that read one clip's headers at a time. A
clip that makes libav crash or hang takes down or stalls one helper only: it
is killed, its slot gets a fresh helper on the next probe, and only the alert
it was probing fails (``probe_crashed`` / ``probe_timeout``). Helpers are
started with exec (an asyncio subprocess), never a bare fork, so nothing of
the child's running event loop is copied into them.

Wire protocol, on the helper's stdin and stdout: a frame is a 4-byte
big-endian length and that many bytes of orjson. Once it has loaded libav the
helper sends ``{"ready": true, ...}``; then, for each request ``{"path": ...}``,
one reply: ``{"report": <ffprobe -show_format -show_streams shape>}`` or
``{"error": <ErrorCode value>, "reason": <text>}``. It exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import struct
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import orjson

from alertd.config import environment_without_settings
from alertd.domain import JSON
from alertd.errors import ConfigError, ErrorCode, PermanentError, TransientError
from alertd.exitcodes import signal_name
from alertd.media import normalize_probe

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 4 * 1024 * 1024
START_TIMEOUT_S = 30.0
MAX_POOL_SIZE = 64
# A helper that closed its stdout is dying; this long it may take to exit on its own.
_EXIT_GRACE_S = 1.0
_MAX_REASON_CHARS = 300


def helper_command() -> tuple[str, ...]:
    """The default helper: this interpreter running ``alertd.probehelper``.

    ``-P``: the working directory is not put on ``sys.path``, so an ``av.py``
    or ``alertd/`` in the directory alertd was started from is never imported.
    """
    return (sys.executable, "-P", "-m", "alertd.probehelper")


class _HelperGone(Exception):
    """The helper closed its pipes: it died, or is dying."""


class HelperStartFailed(TransientError):
    """A helper did not start. ``lasting`` when starting again cannot help: it
    exited on its own (PyAV missing or broken), its command cannot be run, or it
    does not speak the protocol. Otherwise (killed, by the OOM killer say; not
    ready in time; fork refused for lack of memory) a later start may succeed."""

    def __init__(self, cause: str, *, lasting: bool) -> None:
        super().__init__(ErrorCode.PROBE_CRASHED, f"pyav helper did not start: {cause}")
        self.lasting = lasting


class PyAVProber:
    """Reads a local file's metadata with PyAV in helper processes (see ``alertd.ports.Prober``).

    Use as ``async with PyAVProber(...) as prober`` (or ``open()``/``close()``)
    inside the child's running loop. At most ``size`` probes run at once; more
    wait for a free helper, and ``timeout`` starts once a helper has the path.
    """

    def __init__(
        self, *, timeout: float, size: int = 2, command: Sequence[str] | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        if not timeout > 0:
            raise ConfigError(f"prober: timeout must be > 0 seconds, got {timeout}")
        if not 1 <= size <= MAX_POOL_SIZE:
            raise ConfigError(f"prober: pool size must be 1..{MAX_POOL_SIZE}, got {size}")
        self._timeout = timeout
        self._size = size
        self._command = tuple(command) if command is not None else helper_command()
        self._start_timeout = start_timeout
        # One token per slot: an idle helper, or None for a slot whose helper
        # died (its replacement is started by the probe that takes the token,
        # so a clip that always crashes libav costs one restart per alert,
        # never a restart loop).
        self._slots: asyncio.Queue[_Helper | None] = asyncio.Queue()
        self._live: set[_Helper] = set()
        self._closed = False

    async def __aenter__(self) -> PyAVProber:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Start every helper and wait until each has loaded libav.

        A child that cannot probe should not start consuming. Raises
        ``ConfigError`` when a helper can never start (PyAV missing, a broken
        install), and ``HelperStartFailed`` when this start failed but a later
        one may not (a helper OOM-killed while loading libav): the child then
        exits as crashed and is restarted with backoff, where a config error
        would halt the master for good.
        """
        started = await asyncio.gather(
            *(self._start_helper() for _ in range(self._size)), return_exceptions=True
        )
        failures = [r for r in started if isinstance(r, BaseException)]
        if failures:
            await self.close()
            lasting = [f for f in failures if isinstance(f, HelperStartFailed) and f.lasting]
            if lasting:
                raise ConfigError(f"prober: {lasting[0].message}") from None
            raise failures[0]
        for helper in started:
            assert isinstance(helper, _Helper)
            self._slots.put_nowait(helper)

    async def close(self) -> None:
        """Kill and reap every helper. Probes still running or waiting get ``TransientError``."""
        self._closed = True
        # Wakes the probes waiting for a slot; each passes its token on (probe()).
        self._slots.put_nowait(None)
        helpers, self._live = list(self._live), set()
        await asyncio.gather(*(helper.kill() for helper in helpers))

    def helper_pids(self) -> tuple[int, ...]:
        """Process ids of the helpers running now (for tests and diagnostics)."""
        return tuple(sorted(h.pid for h in self._live if h.running))

    async def probe(self, path: str) -> JSON:
        helper = await self._slots.get()
        reply: Mapping[str, Any] | None = None
        try:
            if self._closed:
                raise TransientError(ErrorCode.PROBE_CRASHED, "pyav prober is closed")
            if helper is not None and not helper.alive:
                # Killed while idle (the OOM killer, an operator): not this
                # clip's doing, so it must not fail this alert.
                self._live.discard(helper)
                cause = await helper.death_cause()
                await helper.kill()  # reaped; its pipes closed
                log.warning("pyav helper pid %d died while idle (%s); starting another",
                            helper.pid, cause)
                helper = None
            if helper is None:
                helper = await self._start_helper()
            reply = await helper.ask(_absolute(path), self._timeout)
        except PermanentError:
            if self._closed:
                # Killed by close(), not by the clip: let the alert be tried again.
                raise TransientError(
                    ErrorCode.PROBE_CRASHED, "pyav prober closed during the probe"
                ) from None
            raise
        finally:
            # A helper that did not answer has been killed (ask); its slot comes
            # back empty. Put back with no await before it, so that even a
            # second cancellation cannot lose a slot.
            if reply is None and helper is not None:
                self._live.discard(helper)
            self._slots.put_nowait(helper if reply is not None else None)
        return _metadata(reply)

    async def _start_helper(self) -> _Helper:
        try:
            # A session of its own: a terminal's Ctrl-C or the master's signals
            # to the child's group do not reach the helpers; the child decides.
            process = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=environment_without_settings(),
            )
        except OSError as exc:
            # ENOENT, EACCES: the command is wrong. EAGAIN, ENOMEM: for now.
            raise HelperStartFailed(
                f"cannot run {self._command[0]}: {exc.strerror or exc}",
                lasting=exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR),
            ) from None
        helper = _Helper(process)
        self._live.add(helper)
        try:
            await helper.wait_ready(self._start_timeout)
            if self._closed:
                raise TransientError(ErrorCode.PROBE_CRASHED, "pyav prober is closed")
        except BaseException:
            self._live.discard(helper)
            await helper.kill()
            raise
        return helper


class _Helper:
    """One helper process and its pipes; one request at a time, killed on any doubt."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._stdout = process.stdout

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.returncode is None

    @property
    def alive(self) -> bool:
        """Not exited, and its output not closed (seen before the exit is reaped)."""
        return self.running and not self._stdout.at_eof()

    async def wait_ready(self, within_s: float) -> None:
        """Wait for the helper's ready frame; ``HelperStartFailed`` if it never comes."""
        try:
            async with asyncio.timeout(within_s):
                hello = await self._receive()
        except TimeoutError:
            raise HelperStartFailed(f"not ready after {within_s:g}s", lasting=False) from None
        except _HelperGone:
            cause = await self.death_cause()
            # Killed by a signal: not its own doing. Exited: it refused to run.
            raise HelperStartFailed(cause, lasting=(self._process.returncode or 0) >= 0) from None
        except PermanentError as exc:
            raise HelperStartFailed(exc.message, lasting=True) from None
        if hello.get("ready") is not True:
            raise HelperStartFailed("its first frame was not a ready frame", lasting=True)

    async def ask(self, path: str, within_s: float) -> Mapping[str, Any]:
        """Send one path, return the reply; on any failure the helper is killed and reaped."""
        try:
            try:
                async with asyncio.timeout(within_s):
                    await self._send({"path": path})
                    return await self._receive()
            except TimeoutError:
                raise PermanentError(
                    ErrorCode.PROBE_TIMEOUT, f"pyav helper ran longer than {within_s:g}s; killed"
                ) from None
            except _HelperGone:
                raise PermanentError(ErrorCode.PROBE_CRASHED, await self.death_cause()) from None
        except BaseException:
            # Timeout, crash, a broken frame or our task cancelled: a reply may
            # still be on its way, so this helper can never be trusted again.
            await self.kill()
            raise

    async def kill(self) -> None:
        """SIGKILL the helper's process group and reap it; no-op once it is reaped."""
        if self._process.returncode is None:
            # The group id is the helper's pid, still ours: it is not reaped yet.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        self._stdin.close()
        await self._process.wait()

    async def _send(self, message: Mapping[str, Any]) -> None:
        body = orjson.dumps(message)
        try:
            self._stdin.write(FRAME_HEADER.pack(len(body)) + body)
            await self._stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise _HelperGone from None

    async def _receive(self) -> Mapping[str, Any]:
        try:
            header = await self._stdout.readexactly(FRAME_HEADER.size)
            (length,) = FRAME_HEADER.unpack(header)
            if length > MAX_FRAME_BYTES:
                raise PermanentError(
                    ErrorCode.PROBE_CRASHED, f"pyav helper sent a {length}-byte frame; killed"
                )
            body = await self._stdout.readexactly(length)
        except asyncio.IncompleteReadError:
            raise _HelperGone from None
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            raise PermanentError(ErrorCode.PROBE_CRASHED, "pyav helper sent a broken frame; killed")
        return message

    async def death_cause(self) -> str:
        """Why the helper closed its output, once it has exited (killed if it lingers)."""
        try:
            async with asyncio.timeout(_EXIT_GRACE_S):
                returncode = await self._process.wait()
        except TimeoutError:
            await self.kill()
            return "pyav helper closed its output without exiting; killed"
        if returncode < 0:
            return f"pyav helper killed by {signal_name(-returncode)}"
        return f"pyav helper exited with status {returncode}"


def _absolute(path: str) -> str:
    # A relative path is the caller's; the helper's working directory is the
    # one it was started in. (getcwd only, no disk access.)
    return os.path.abspath(path)


def _metadata(reply: Mapping[str, Any]) -> JSON:
    report = reply.get("report")
    if isinstance(report, dict):
        return normalize_probe(report)
    reason = str(reply.get("reason") or "pyav helper failed without a message")
    reason = reason[:_MAX_REASON_CHARS]
    if reply.get("error") == ErrorCode.NOT_A_VIDEO:
        raise PermanentError(ErrorCode.NOT_A_VIDEO, reason)
    raise PermanentError(ErrorCode.PROBE_CRASHED, reason)
