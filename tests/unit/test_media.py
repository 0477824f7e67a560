"""normalize_probe on hand-written ffprobe documents."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from alertd.errors import ErrorCode, PermanentError
from alertd.media import METADATA_KEYS, normalize_probe


def video_stream(index: int = 0, **overrides: Any) -> dict[str, Any]:
    stream: dict[str, Any] = {
        "index": index, "codec_name": "h264", "codec_type": "video",
        "width": 320, "height": 240, "pix_fmt": "yuv420p",
        "r_frame_rate": "25/1", "avg_frame_rate": "25/1", "duration": "2.000000",
        "disposition": {"default": 1, "attached_pic": 0},
    }
    stream.update(overrides)
    return stream


def audio_stream(index: int = 1, **overrides: Any) -> dict[str, Any]:
    stream: dict[str, Any] = {
        "index": index, "codec_name": "aac", "codec_type": "audio",
        "sample_rate": "44100", "channels": 2,
        "r_frame_rate": "0/0", "avg_frame_rate": "0/0", "duration": "2.020000",
        "disposition": {"default": 1, "attached_pic": 0},
    }
    stream.update(overrides)
    return stream


def cover_stream(index: int) -> dict[str, Any]:
    return video_stream(
        index, codec_name="mjpeg", width=500, height=500, pix_fmt="yuvj420p",
        r_frame_rate="90000/1", avg_frame_rate="0/0",
        disposition={"default": 0, "attached_pic": 1},
    )


def doc(*streams: dict[str, Any], **fmt: Any) -> dict[str, Any]:
    fmt_doc = {"format_name": "mov,mp4,m4a,3gp,3g2,mj2", "duration": "2.000000",
               "bit_rate": "278184"}
    fmt_doc.update(fmt)
    return {"streams": list(streams), "format": {k: v for k, v in fmt_doc.items() if v is not None}}


def test_a_clip_with_video_and_audio_gives_the_full_metadata() -> None:
    metadata = normalize_probe(doc(video_stream(), audio_stream()))

    assert metadata == {
        "duration_s": 2.0,
        "format_name": "mov,mp4,m4a,3gp,3g2,mj2",
        "bit_rate": 278184,
        "video": {"codec": "h264", "width": 320, "height": 240, "fps": 25.0,
                  "pix_fmt": "yuv420p"},
        "audio": {"codec": "aac", "sample_rate": 44100, "channels": 2},
        "streams": [
            {"index": 0, "codec_type": "video", "codec_name": "h264"},
            {"index": 1, "codec_type": "audio", "codec_name": "aac"},
        ],
    }


def test_metadata_has_exactly_the_public_keys_and_is_json() -> None:
    metadata = normalize_probe(doc(video_stream()))

    assert tuple(metadata) == METADATA_KEYS
    assert orjson.loads(orjson.dumps(metadata)) == metadata


def test_ntsc_frame_rate_is_a_float_rounded_to_three_decimals() -> None:
    metadata = normalize_probe(doc(video_stream(avg_frame_rate="30000/1001")))

    assert metadata["video"]["fps"] == 29.97


def test_unknown_average_frame_rate_falls_back_to_the_real_base_rate() -> None:
    metadata = normalize_probe(doc(video_stream(avg_frame_rate="0/0", r_frame_rate="15/1")))

    assert metadata["video"]["fps"] == 15.0


def test_frame_rate_is_null_when_neither_rate_is_known() -> None:
    metadata = normalize_probe(doc(video_stream(avg_frame_rate="0/0", r_frame_rate="0/0")))

    assert metadata["video"]["fps"] is None


@pytest.mark.parametrize("rate", ["abc", "1/0", "-25/1", "1e400/1", ""])
def test_unreadable_frame_rates_are_null(rate: str) -> None:
    metadata = normalize_probe(doc(video_stream(avg_frame_rate=rate, r_frame_rate=rate)))

    assert metadata["video"]["fps"] is None


def test_a_cover_picture_is_not_taken_as_the_video() -> None:
    metadata = normalize_probe(doc(audio_stream(0, codec_name="mp3"), cover_stream(1)))

    assert metadata["video"] is None
    assert metadata["audio"]["codec"] == "mp3"
    assert [s["codec_name"] for s in metadata["streams"]] == ["mp3", "mjpeg"]


def test_the_first_real_video_after_a_cover_picture_is_the_video() -> None:
    metadata = normalize_probe(doc(cover_stream(0), video_stream(1, codec_name="hevc")))

    assert metadata["video"]["codec"] == "hevc"


def test_the_first_of_several_audio_streams_is_the_audio() -> None:
    metadata = normalize_probe(
        doc(video_stream(), audio_stream(1, codec_name="opus"), audio_stream(2))
    )

    assert metadata["audio"]["codec"] == "opus"


def test_an_audio_only_file_has_null_video() -> None:
    metadata = normalize_probe(doc(audio_stream(0, sample_rate="22050", channels=1)))

    assert metadata["video"] is None
    assert metadata["audio"] == {"codec": "aac", "sample_rate": 22050, "channels": 1}


def test_missing_container_duration_falls_back_to_the_longest_stream() -> None:
    metadata = normalize_probe(
        doc(video_stream(duration="1.5"), audio_stream(duration="1.75049"), duration=None)
    )

    assert metadata["duration_s"] == 1.75


def test_duration_is_null_when_no_duration_is_known() -> None:
    metadata = normalize_probe(
        doc(video_stream(duration="N/A"), audio_stream(duration=None), duration=None)
    )

    assert metadata["duration_s"] is None


def test_duration_is_rounded_to_three_decimals() -> None:
    metadata = normalize_probe(doc(video_stream(), duration="1.0016666"))

    assert metadata["duration_s"] == 1.002


@pytest.mark.parametrize("duration", ["nan", "inf", "-1.0", True])
def test_impossible_durations_are_unknown(duration: object) -> None:
    metadata = normalize_probe(doc(video_stream(duration=None), duration=duration))

    assert metadata["duration_s"] is None


def test_numbers_printed_as_strings_become_ints() -> None:
    metadata = normalize_probe(
        doc(video_stream(width="640", height="480"), audio_stream(sample_rate="48000",
                                                                  channels="6"))
    )

    assert metadata["bit_rate"] == 278184
    assert (metadata["video"]["width"], metadata["video"]["height"]) == (640, 480)
    assert metadata["audio"] == {"codec": "aac", "sample_rate": 48000, "channels": 6}


def test_unreadable_numbers_become_null() -> None:
    metadata = normalize_probe(
        doc(video_stream(width="wide", height=None), audio_stream(sample_rate="N/A"),
            bit_rate="N/A")
    )

    assert metadata["bit_rate"] is None
    assert metadata["video"]["width"] is None
    assert metadata["video"]["height"] is None
    assert metadata["audio"]["sample_rate"] is None


def test_streams_lists_every_stream_including_subtitles_and_data() -> None:
    subtitle = {"index": 2, "codec_type": "subtitle", "codec_name": "mov_text"}
    data = {"index": 3, "codec_type": "data"}

    metadata = normalize_probe(doc(video_stream(), audio_stream(), subtitle, data))

    assert metadata["streams"][2:] == [
        {"index": 2, "codec_type": "subtitle", "codec_name": "mov_text"},
        {"index": 3, "codec_type": "data", "codec_name": None},
    ]


def test_missing_format_section_gives_null_container_fields() -> None:
    metadata = normalize_probe({"streams": [video_stream()]})

    assert metadata["format_name"] is None
    assert metadata["bit_rate"] is None
    assert metadata["duration_s"] == 2.0


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"streams": []},
        {"streams": "nonsense", "format": {"format_name": "mov"}},
        doc({"index": 0, "codec_type": "subtitle", "codec_name": "subrip"}),
        doc(cover_stream(0)),
    ],
    ids=["nothing", "no-streams", "streams-not-a-list", "subtitles-only", "cover-only"],
)
def test_a_document_without_audio_or_video_is_not_a_video(document: dict[str, Any]) -> None:
    with pytest.raises(PermanentError) as raised:
        normalize_probe(document)

    assert raised.value.code is ErrorCode.NOT_A_VIDEO
