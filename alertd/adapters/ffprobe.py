"""The Prober port on an ffprobe subprocess: bounded in time and output, killed on cancel.

ffmpeg-python's ``ffmpeg.probe`` is not used here: it runs ffprobe with a
blocking ``subprocess`` call, which would stall the event loop, and it can
neither time out nor kill the child when the awaiting task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal

import orjson

from alertd.config import environment_without_settings
from alertd.domain import JSON
from alertd.errors import ConfigError, ErrorCode, PermanentError, TransientError
from alertd.exitcodes import signal_name
from alertd.media import normalize_probe

MAX_STDOUT_BYTES = 4 * 1024 * 1024
STDERR_TAIL_BYTES = 1024
_READ_CHUNK = 64 * 1024
_MAX_REASON_CHARS = 300

# Demuxers ffprobe may pick (it still detects the format; nothing is forced
# with -f). Each reads only its own file. Playlist and reference formats are
# left out on purpose: an HLS playlist or an IMF/concat list saved under an
# .mp4 name would make ffprobe open *other* local files, and the protocol
# whitelist cannot stop that because those are file: URLs too.
ACCEPTED_FORMATS = (
    "mov", "matroska", "avi", "mpegts", "flv", "asf", "mpeg", "ogg",
    "mp3", "aac", "wav", "flac", "h264", "hevc",
)

# Only what normalize_probe reads. Tags (a clip's comment can be megabytes)
# and everything else are left out, so that the output cap refuses only
# absurd files, not a valid clip with a big tag.
SHOW_ENTRIES = (
    "format=format_name,duration,bit_rate"
    ":stream=index,codec_type,codec_name,width,height,pix_fmt,avg_frame_rate,r_frame_rate,"
    "sample_rate,channels,duration"
    ":stream_disposition=attached_pic"
)

_ADDRESS = re.compile(r" @ 0x[0-9a-f]+")


class FfprobeProber:
    """Reads a local file's metadata with ffprobe (see ``alertd.ports.Prober``)."""

    def __init__(self, *, ffprobe: str = "ffprobe", timeout: float) -> None:
        resolved = shutil.which(ffprobe)
        if resolved is None:
            if ffprobe == "ffprobe":
                raise ConfigError("prober: ffprobe not found on PATH")
            raise ConfigError(f"prober: ffprobe {ffprobe!r} not found or not executable")
        if not timeout > 0:
            raise ConfigError(f"prober: timeout must be > 0 seconds, got {timeout}")
        self._ffprobe = resolved
        self._timeout = timeout

    async def probe(self, path: str) -> JSON:
        # "file:" makes a name like "http:x" or "concat:a|b" a local file, never a protocol.
        target = f"file:{path}"
        process = await self._start(target)
        try:
            async with asyncio.timeout(self._timeout):
                stdout, stderr, returncode = await _collect(process)
        except TimeoutError:
            raise PermanentError(
                ErrorCode.PROBE_TIMEOUT, f"ffprobe ran longer than {self._timeout:g}s; killed"
            ) from None
        finally:
            # On every way out (timeout, our task cancelled, an error), no child
            # is left running and none is left unreaped.
            await _kill_and_reap(process)

        if stdout is None:
            raise PermanentError(
                ErrorCode.NOT_A_VIDEO, f"ffprobe printed more than {MAX_STDOUT_BYTES} bytes"
            )
        if returncode < 0:
            name = signal_name(-returncode)
            raise PermanentError(ErrorCode.PROBE_CRASHED, f"ffprobe killed by {name}")
        if returncode != 0:
            raise PermanentError(ErrorCode.NOT_A_VIDEO, _reason(stderr, target))
        try:
            doc = orjson.loads(stdout)
        except orjson.JSONDecodeError:
            raise PermanentError(ErrorCode.NOT_A_VIDEO, "ffprobe printed invalid JSON") from None
        if not isinstance(doc, dict):
            raise PermanentError(ErrorCode.NOT_A_VIDEO, "ffprobe printed no JSON object")
        return normalize_probe(doc)

    async def _start(self, target: str) -> asyncio.subprocess.Process:
        argv = [
            self._ffprobe, "-v", "error", "-hide_banner",
            "-print_format", "json", "-show_entries", SHOW_ENTRIES,
            "-protocol_whitelist", "file", "-format_whitelist", ",".join(ACCEPTED_FORMATS),
            "-i", target,
        ]
        try:
            # A session of its own: a kill reaches the whole group (a wrapper
            # script's children too), and a terminal's Ctrl-C does not reach it.
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=environment_without_settings(),
            )
        except OSError as exc:
            # The binary was there at startup; fork/exec failing now (EAGAIN,
            # ENOMEM, a package upgrade) is the machine's state, not the clip's.
            raise TransientError(
                ErrorCode.PROBE_CRASHED, f"cannot start ffprobe: {exc.strerror or exc}"
            ) from None


async def _collect(process: asyncio.subprocess.Process) -> tuple[bytes | None, bytes, int]:
    """Drain both pipes together (so neither fills up and blocks ffprobe), then reap.

    stdout is None when ffprobe printed more than the cap; it is killed then.
    """
    assert process.stdout is not None and process.stderr is not None

    async def read_stdout(stream: asyncio.StreamReader) -> bytes | None:
        data = await _read_capped(stream, MAX_STDOUT_BYTES)
        if data is None:
            _kill(process)
        return data

    stdout, stderr = await asyncio.gather(
        read_stdout(process.stdout), _read_tail(process.stderr, STDERR_TAIL_BYTES)
    )
    return stdout, stderr, await process.wait()


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    tail = b""
    while chunk := await stream.read(_READ_CHUNK):
        tail = (tail + chunk)[-keep:]
    return tail


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    # The group id is ffprobe's pid, still ours: it is not reaped yet.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def _kill_and_reap(process: asyncio.subprocess.Process) -> None:
    _kill(process)
    await process.wait()


def _reason(stderr: bytes, target: str) -> str:
    """ffprobe's last words, short: without the temp file's name and heap addresses."""
    text = stderr.decode("utf-8", "replace").replace(f"{target}: ", "").replace(target, "input")
    lines = [_ADDRESS.sub("", line).strip() for line in text.splitlines()]
    reason = "; ".join(line for line in lines[-2:] if line)
    return reason[:_MAX_REASON_CHARS] or "ffprobe failed without a message"
