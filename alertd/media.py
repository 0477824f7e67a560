"""Media metadata: normalize a prober's raw report into alertd's public metadata. No I/O.

The raw report has ffprobe's ``-show_format -show_streams`` JSON shape, which
every prober (the ffprobe subprocess today, an in-process one later) produces,
so they all return the same keys and apply the same "is it a video" rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from alertd.domain import JSON
from alertd.errors import ErrorCode, PermanentError

# The normalized keys, a public contract (the webhook body carries them).
METADATA_KEYS = ("duration_s", "format_name", "bit_rate", "video", "audio", "streams")


def normalize_probe(doc: Mapping[str, Any]) -> JSON:
    """Turn an ffprobe-shaped document into the metadata stored and sent by webhook.

    Keys: ``duration_s`` (seconds, 3 decimals, the container's duration or
    else the longest stream's; None if unknown), ``format_name``, ``bit_rate``,
    ``video`` (first video stream that is not an attached picture: codec,
    width, height, fps, pix_fmt; or None), ``audio`` (first audio stream:
    codec, sample_rate, channels; or None) and ``streams`` (index, codec_type,
    codec_name of every stream). Numbers that ffprobe prints as strings
    become numbers; values that cannot be read become None.

    Raises ``PermanentError(not_a_video)`` when there is neither a video nor
    an audio stream: a file of only subtitles, data or a cover picture is not
    a clip, whatever its container.
    """
    fmt = _mapping(doc.get("format"))
    raw_streams = doc.get("streams")
    streams = [_mapping(s) for s in raw_streams] if isinstance(raw_streams, list) else []

    video_stream = next((s for s in streams if _is_video(s)), None)
    audio_stream = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video_stream is None and audio_stream is None:
        found = ", ".join(str(s.get("codec_type")) for s in streams) or "none"
        raise PermanentError(ErrorCode.NOT_A_VIDEO, f"no audio or video stream (streams: {found})")

    return {
        "duration_s": _duration(fmt, streams),
        "format_name": _str(fmt.get("format_name")),
        "bit_rate": _int(fmt.get("bit_rate")),
        "video": _video(video_stream) if video_stream is not None else None,
        "audio": _audio(audio_stream) if audio_stream is not None else None,
        "streams": [
            {
                "index": _int(s.get("index")),
                "codec_type": _str(s.get("codec_type")),
                "codec_name": _str(s.get("codec_name")),
            }
            for s in streams
        ],
    }


def _is_video(stream: Mapping[str, Any]) -> bool:
    # A cover picture (an mp3's album art) is a video stream of one frame; not the clip.
    attached = _mapping(stream.get("disposition")).get("attached_pic")
    return stream.get("codec_type") == "video" and not attached


def _video(stream: Mapping[str, Any]) -> JSON:
    fps = _rate(stream.get("avg_frame_rate"))
    if fps is None:
        fps = _rate(stream.get("r_frame_rate"))
    return {
        "codec": _str(stream.get("codec_name")),
        "width": _int(stream.get("width")),
        "height": _int(stream.get("height")),
        "fps": fps,
        "pix_fmt": _str(stream.get("pix_fmt")),
    }


def _audio(stream: Mapping[str, Any]) -> JSON:
    return {
        "codec": _str(stream.get("codec_name")),
        "sample_rate": _int(stream.get("sample_rate")),
        "channels": _int(stream.get("channels")),
    }


def _duration(fmt: Mapping[str, Any], streams: list[Mapping[str, Any]]) -> float | None:
    seconds = _seconds(fmt.get("duration"))
    if seconds is None:
        known = [d for d in (_seconds(s.get("duration")) for s in streams) if d is not None]
        seconds = max(known, default=None)
    return round(seconds, 3) if seconds is not None else None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _seconds(value: object) -> float | None:
    """A non-negative finite number of seconds, from a number or a string like "2.000000"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except ValueError:  # "N/A"
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _rate(value: object) -> float | None:
    """A frame rate like "30000/1001" as 29.97; None for "0/0" or anything unreadable."""
    if not isinstance(value, str):
        return None
    try:
        fps = float(Fraction(value))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return round(fps, 3) if math.isfinite(fps) and fps > 0 else None
