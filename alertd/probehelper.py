"""The PyAV probe helper process: reads clip headers with libav on behalf of ``PyAVProber``.

Started by ``alertd.adapters.pyav`` as ``python -m alertd.probehelper``, never
by hand; it speaks that module's frame protocol on stdin/stdout and exits when
stdin closes. The report has the shape of ``ffprobe -print_format json
-show_format -show_streams`` for every key ``alertd.media.normalize_probe``
reads, each value computed and formatted the way ffprobe does it, so both
probers give identical metadata.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import IO, Any

import av
import av.logging
import orjson
from av.audio.stream import AudioStream
from av.container import InputContainer
from av.stream import DataStream, Disposition, Stream
from av.video.stream import VideoStream

from alertd.adapters.ffprobe import ACCEPTED_FORMATS
from alertd.adapters.pyav import FRAME_HEADER, MAX_FRAME_BYTES
from alertd.errors import ErrorCode
from alertd.heap import keep_freed_memory

Reply = dict[str, Any]
ProbeFunction = Callable[[str], Reply]

# What the ffprobe adapter passes, plus what ffprobe sets by itself
# (scan_all_pmts), so libav opens and detects files exactly as it does there:
# the file protocol only, and only demuxers that read nothing but their own file.
OPEN_OPTIONS = {
    "protocol_whitelist": "file",
    "format_whitelist": ",".join(ACCEPTED_FORMATS),
    "scan_all_pmts": "1",
}
_AV_TIME_BASE = Fraction(1, 1_000_000)
_MAX_REASON_CHARS = 300
_PR_SET_PDEATHSIG = 1


def probe_path(path: str) -> Reply:
    """Read ``path``'s container and stream headers; the content of one reply frame."""
    # "file:" makes a name like "http:x" or "concat:a|b" a local file, never a protocol.
    target = f"file:{path}"
    with av.logging.Capture() as logs:
        try:
            # find_stream_info (inside open) reads and, where a header lacks
            # them, decodes the first packets, as ffprobe does; nothing more.
            with av.open(target, container_options=OPEN_OPTIONS,
                         metadata_errors="replace") as container:
                return {"report": ffprobe_report(container)}
        except av.FFmpegError as exc:
            return {"error": ErrorCode.NOT_A_VIDEO.value,
                    "reason": _reason(logs, exc.strerror, target)}


def ffprobe_report(container: InputContainer) -> dict[str, Any]:
    """The ffprobe JSON fields normalize_probe reads; absent where ffprobe omits them."""
    fmt: dict[str, Any] = {"format_name": container.format.name}
    if container.duration is not None:
        _put_duration(fmt, container.duration, _AV_TIME_BASE)
    if container.bit_rate > 0:
        fmt["bit_rate"] = str(container.bit_rate)
    return {"format": fmt, "streams": [_stream_report(s) for s in container.streams]}


def _stream_report(stream: Stream) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "index": stream.index,
        "disposition": {"attached_pic": int(bool(stream.disposition & Disposition.attached_pic))},
    }
    if stream.type != "unknown":
        doc["codec_type"] = stream.type
    # ffprobe names the codec of the stream's parameters; PyAV reaches them
    # only through a decoder, so a stream libav cannot decode (a font
    # attachment, a codec missing from PyAV's build) has no codec_name here.
    context = stream.codec_context
    if isinstance(stream, DataStream):
        codec_name = stream.name
    else:
        codec_name = context.codec.canonical_name if context is not None else None
    if codec_name:
        doc["codec_name"] = codec_name
    if isinstance(stream, VideoStream):
        doc["avg_frame_rate"] = _ratio(stream.average_rate)
        doc["r_frame_rate"] = _ratio(stream.base_rate)
        if context is not None:
            doc["width"], doc["height"] = stream.codec_context.width, stream.codec_context.height
            if stream.codec_context.pix_fmt:
                doc["pix_fmt"] = stream.codec_context.pix_fmt
    elif isinstance(stream, AudioStream) and context is not None:
        doc["sample_rate"] = str(stream.codec_context.sample_rate)
        doc["channels"] = stream.codec_context.channels
    if stream.duration is not None and stream.time_base is not None:
        _put_duration(doc, stream.duration, stream.time_base)
    return doc


def _put_duration(doc: dict[str, Any], ticks: int, time_base: Fraction) -> None:
    # ffprobe: "N/A" (left out of JSON) for 0, else ticks * av_q2d(time_base)
    # printed with "%f"; the same double arithmetic, so the same text.
    if ticks != 0:
        doc["duration"] = "%f" % (ticks * (time_base.numerator / time_base.denominator))


def _ratio(rate: Fraction | None) -> str:
    return f"{rate.numerator}/{rate.denominator}" if rate is not None else "0/0"


def _reason(logs: list[tuple[int, str, str]], error: str | None, target: str) -> str:
    """libav's last words, short, like ffprobe's stderr tail: no file name, no addresses."""
    lines = [f"[{name}] {message.strip()}" if name else message.strip()
             for _level, name, message in logs]
    lines.append(error or "libav failed without a message")
    text = "; ".join(line for line in lines[-2:] if line)
    return text.replace(target, "input").replace(target[len("file:"):], "input")[
        :_MAX_REASON_CHARS
    ]


def serve(requests: IO[bytes], replies: IO[bytes], probe: ProbeFunction = probe_path) -> None:
    """Say ready, then answer one frame per request frame until ``requests`` ends."""
    _write_frame(replies, {"ready": True, "pyav": av.__version__})
    while (request := _read_frame(requests)) is not None:
        path = request.get("path")
        try:
            if not isinstance(path, str):
                raise TypeError("request without a path")
            reply = probe(path)
        except Exception as exc:  # our bug, not the clip's: say so, stay up
            reply = {"error": ErrorCode.PROBE_CRASHED.value,
                     "reason": f"pyav helper failed: {type(exc).__name__}: {exc}"}
        _write_frame(replies, reply)


def _read_frame(stream: IO[bytes]) -> dict[str, Any] | None:
    header = stream.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None  # the parent closed our stdin, or died
    (length,) = FRAME_HEADER.unpack(header)
    body = stream.read(length)
    if len(body) < length:
        return None
    message = orjson.loads(body)
    return message if isinstance(message, dict) else {}


def _write_frame(stream: IO[bytes], message: Reply) -> None:
    body = orjson.dumps(message)
    if len(body) > MAX_FRAME_BYTES:
        body = orjson.dumps({"error": ErrorCode.NOT_A_VIDEO.value,
                             "reason": f"report larger than {MAX_FRAME_BYTES} bytes"})
    stream.write(FRAME_HEADER.pack(len(body)) + body)
    stream.flush()


def _die_with_parent() -> None:
    # A helper stuck inside libav never reads its closed stdin; this way it
    # dies with the child even when the child is SIGKILLed (Linux only).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main(probe: ProbeFunction = probe_path) -> None:
    _die_with_parent()
    # A crash is an expected outcome here (hostile input) and is reported by
    # the parent; a core file per crafted clip would only fill the disk.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # libav allocates and frees the same frame buffers on every probe.
    keep_freed_memory()
    # The frames get a private copy of stdout; fd 1 then points at stderr, so
    # anything a library prints cannot corrupt them.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # ERROR and worse, captured per probe for the reason; repeats kept, since
    # the next clip's identical message is not a repeat to its reader.
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    serve(sys.stdin.buffer, replies, probe)


if __name__ == "__main__":
    main()
