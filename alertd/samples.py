"""A small corpus of sample clips made from ffmpeg's lavfi sources, for tests and benchmarks.

The ffmpeg command lines are built with ffmpeg-python (its only use in alertd)
and run with a timeout, so a hung ffmpeg cannot block a test run forever.

The keys of :func:`make_sample_clips` are a contract the tests and benchmarks
rely on. ``truncated`` is the ``mp4`` clip (moov atom first, "faststart") cut
to its first 30% of bytes: ffprobe *accepts* it, because it reads only the
header and the first packets, and reports the header's full duration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ffmpeg

FFMPEG_TIMEOUT_S = 60.0
TRUNCATED_FRACTION = 0.3
# An .mp4 name on text: the extension must not be what makes a file a video.
NOT_A_VIDEO_BYTES = b"this is not a video, only text with an .mp4 name\n" * 64

_H264 = {"c:v": "libx264", "preset": "ultrafast", "pix_fmt": "yuv420p"}
_AAC = {"c:a": "aac", "ac": 2, "ar": 44100}
_FASTSTART = {"movflags": "+faststart"}


def ffmpeg_available() -> bool:
    """True when an ``ffmpeg`` binary is on PATH (needed to make the corpus)."""
    return shutil.which("ffmpeg") is not None


def make_sample_clips(directory: Path) -> dict[str, Path]:
    """Create the sample corpus in ``directory`` and return its paths by name.

    A file that already exists with a non-zero size is kept, so ``directory``
    can be a cache shared across runs; each file is written under a temporary
    name and renamed into place, so an interrupted run never leaves a partial
    clip that a later run would take as cached.
    """
    directory.mkdir(parents=True, exist_ok=True)
    clips: dict[str, Path] = {}
    for name, (filename, build) in _ENCODED.items():
        path = directory / filename
        if not _is_cached(path):
            _encode(name, build, path)
        clips[name] = path

    clips["truncated"] = _write_if_missing(
        directory / "truncated.mp4", lambda: _head(clips["mp4"], TRUNCATED_FRACTION)
    )
    clips["not_a_video"] = _write_if_missing(
        directory / "not_a_video.mp4", lambda: NOT_A_VIDEO_BYTES
    )
    empty = directory / "empty.mp4"
    empty.write_bytes(b"")
    clips["empty"] = empty
    return clips


def _video(size: str, rate: str, seconds: float, source: str = "testsrc") -> Any:
    spec = f"{source}=size={size}:rate={rate}:duration={seconds}"
    return ffmpeg.input(spec, f="lavfi").video


def _tone(seconds: float, sample_rate: int = 44100) -> Any:
    spec = f"sine=frequency=440:sample_rate={sample_rate}:duration={seconds}"
    return ffmpeg.input(spec, f="lavfi").audio


def _mp4(out: str) -> Any:
    return ffmpeg.output(
        _video("320x240", "25", 2), _tone(2), out, f="mp4", **_H264, **_AAC, **_FASTSTART
    )


def _mp4_not_faststart(out: str) -> Any:
    return ffmpeg.output(_video("320x240", "25", 2), _tone(2), out, f="mp4", **_H264, **_AAC)


def _webm(out: str) -> Any:
    return ffmpeg.output(
        _video("320x240", "25", 1, "testsrc2"), _tone(1, 48000), out, f="webm",
        **{"c:v": "libvpx", "deadline": "realtime", "cpu-used": 8, "b:v": "300k"},
        **{"c:a": "libopus", "ac": 2},
    )


def _mkv(out: str) -> Any:
    return ffmpeg.output(
        _video("320x240", "25", 1, "testsrc2"), _tone(1, 48000), out, f="matroska",
        **_H264, **{"c:a": "libvorbis", "ac": 2},
    )


def _mov(out: str) -> Any:
    # NTSC rate, so the corpus has a fractional frame rate (29.97).
    return ffmpeg.output(
        _video("320x240", "30000/1001", 1), _tone(1), out, f="mov",
        **_H264, **_AAC, **_FASTSTART,
    )


def _audio_only(out: str) -> Any:
    return ffmpeg.output(_tone(1), out, f="ipod", **{"c:a": "aac", "ac": 1}, **_FASTSTART)


def _video_only(out: str) -> Any:
    return ffmpeg.output(_video("320x240", "25", 1), out, f="mp4", **_H264, **_FASTSTART)


def _large(out: str) -> Any:
    # testsrc2 compresses well: a fixed 4 Mb/s for 4 s is what makes ~2 MB.
    return ffmpeg.output(
        _video("640x480", "25", 4, "testsrc2"), _tone(4), out, f="mp4",
        **{**_H264, "b:v": "4M"}, **_AAC, **_FASTSTART,
    )


_ENCODED: dict[str, tuple[str, Callable[[str], Any]]] = {
    "mp4": ("clip.mp4", _mp4),
    "mp4_not_faststart": ("clip_not_faststart.mp4", _mp4_not_faststart),
    "webm": ("clip.webm", _webm),
    "mkv": ("clip.mkv", _mkv),
    "mov": ("clip.mov", _mov),
    "audio_only": ("audio_only.m4a", _audio_only),
    "video_only": ("video_only.mp4", _video_only),
    "large": ("large.mp4", _large),
}


def _is_cached(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _partial_path(path: Path) -> Path:
    # The pid keeps parallel test workers that share a cache off each other's files.
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


def _encode(name: str, build: Callable[[str], Any], path: Path) -> None:
    partial = _partial_path(path)
    stream = build(str(partial)).global_args("-nostdin", "-loglevel", "error")
    argv: list[str] = stream.compile(cmd="ffmpeg", overwrite_output=True)
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=FFMPEG_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            stderr = result.stderr.decode("utf-8", "replace").strip()[-1000:]
            raise RuntimeError(f"ffmpeg failed to make sample {name!r}: {stderr}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _head(source: Path, fraction: float) -> bytes:
    data = source.read_bytes()
    return data[: int(len(data) * fraction)]


def _write_if_missing(path: Path, content: Callable[[], bytes]) -> Path:
    if not _is_cached(path):
        partial = _partial_path(path)
        partial.write_bytes(content())
        os.replace(partial, path)
    return path
