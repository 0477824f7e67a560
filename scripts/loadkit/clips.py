"""Clips of a few sizes made with ffmpeg's lavfi sources, cached between runs.

alertd.samples makes a corpus for correctness tests; a load test needs sizes
instead, so these are encoded at a fixed bit rate (testsrc2 compresses so
well that only a fixed rate gives a predictable size).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClipSpec:
    size: str  # WxH
    seconds: float
    video_bitrate: str
    audio_bitrate: str = "128k"


SIZES = {
    "tiny": ClipSpec("320x240", 1, "100k", "32k"),  # ~20 KB
    "small": ClipSpec("320x240", 2, "400k"),  # ~150 KB
    "medium": ClipSpec("640x480", 2, "2M"),  # ~600 KB
    "large": ClipSpec("640x480", 4, "4M"),  # ~2 MB
}
FFMPEG_TIMEOUT_S = 120.0


def make_clips(directory: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The clips ``names`` (keys of SIZES) in ``directory``, encoded once and then reused."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        if name not in SIZES:
            raise ValueError(f"unknown clip size {name!r}; choose from {', '.join(SIZES)}")
        path = directory / f"{name}.mp4"
        if not (path.is_file() and path.stat().st_size > 0):
            _encode(SIZES[name], path)
        paths[name] = path
    return paths


def _encode(spec: ClipSpec, path: Path) -> None:
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.mp4")
    seconds = f"{spec.seconds:g}"
    argv = [
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={spec.size}:rate=25:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-b:v", spec.video_bitrate, "-c:a", "aac", "-b:a", spec.audio_bitrate, "-ac", "2",
        "-movflags", "+faststart",
        "-f", "mp4", str(partial),
    ]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=FFMPEG_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ffmpeg failed for {path.name}: "
                               f"{done.stderr.decode(errors='replace')[-500:]}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
