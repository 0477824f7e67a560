"""The Prober contract, held by both adapters: the same metadata and the same errors on every clip.

FfprobeProber runs the system's ffprobe; PyAVProber runs the libav that PyAV
bundles, in helper processes. Both build an ffprobe-shaped report and pass it
through ``alertd.media.normalize_probe``, so on the sample corpus they must
agree exactly, not approximately.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from alertd.adapters.ffprobe import FfprobeProber
from alertd.adapters.pyav import PyAVProber
from alertd.domain import JSON
from alertd.errors import ErrorCode, PermanentError
from alertd.ports import Prober

pytestmark = pytest.mark.integration

VALID = ("mp4", "mp4_not_faststart", "webm", "mkv", "mov", "audio_only", "video_only", "large",
         "truncated")
INVALID = ("not_a_video", "empty")
PROBERS = ("ffprobe", "pyav")


@pytest_asyncio.fixture(scope="module")
async def pyav_prober() -> AsyncIterator[PyAVProber]:
    async with PyAVProber(timeout=20, size=2) as prober:
        yield prober


@pytest.fixture()
def probers(pyav_prober: PyAVProber) -> dict[str, Prober]:
    return {"ffprobe": FfprobeProber(timeout=20), "pyav": pyav_prober}


@pytest.fixture(params=PROBERS)
def prober(request: pytest.FixtureRequest, probers: dict[str, Prober]) -> Prober:
    """Each adapter in turn, for what the contract asks of every one."""
    return probers[request.param]


async def outcome(prober: Prober, path: str) -> JSON | ErrorCode:
    """The metadata, or the error code: what the contract compares."""
    try:
        return await prober.probe(path)
    except PermanentError as exc:
        assert path not in exc.message
        return exc.code


def test_the_contract_covers_the_whole_sample_corpus(clips: dict[str, Path]) -> None:
    assert set(clips) == {*VALID, *INVALID}


@pytest.mark.parametrize("name", VALID)
async def test_a_valid_clip_gives_metadata(
    prober: Prober, clips: dict[str, Path], name: str
) -> None:
    metadata = await prober.probe(str(clips[name]))

    assert metadata["video"] is not None or metadata["audio"] is not None
    assert isinstance(metadata["duration_s"], float) and metadata["duration_s"] > 0
    assert isinstance(metadata["bit_rate"], int) and metadata["bit_rate"] > 0


@pytest.mark.parametrize("name", INVALID)
async def test_a_file_that_is_no_clip_is_not_a_video(
    prober: Prober, clips: dict[str, Path], name: str
) -> None:
    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(clips[name]))

    assert raised.value.code is ErrorCode.NOT_A_VIDEO
    assert "Invalid data found" in raised.value.message


@pytest.mark.parametrize("name", [*VALID, *INVALID])
async def test_both_probers_give_the_same_normalized_metadata_or_error_code(
    probers: dict[str, Prober], clips: dict[str, Path], name: str
) -> None:
    path = str(clips[name])

    assert await outcome(probers["pyav"], path) == await outcome(probers["ffprobe"], path)


@pytest.mark.parametrize("name", ["http:evil", "concat:a|b", "pipe:0"])
async def test_a_protocol_looking_file_name_is_read_as_a_local_file(
    prober: Prober, clips: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, name: str,
) -> None:
    shutil.copyfile(clips["mp4"], tmp_path / name)
    expected = await prober.probe(str(clips["mp4"]))
    # Relative, as given: the PyAV helpers started in another directory.
    monkeypatch.chdir(tmp_path)

    assert await prober.probe(name) == expected


@pytest.mark.parametrize(
    "body",
    [
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\n{clip}\n#EXT-X-ENDLIST\n",
        "ffconcat version 1.0\nfile '{clip}'\n",
    ],
    ids=["hls-playlist", "ffconcat-list"],
)
async def test_a_list_pointing_at_another_local_file_is_refused(
    prober: Prober, clips: dict[str, Path], tmp_path: Path, body: str
) -> None:
    listing = tmp_path / "alert.mp4"
    listing.write_text(body.format(clip=clips["mp4"]))

    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(listing))

    # ffprobe 5.1 detects the playlist and refuses it by the whitelist; the
    # libav in PyAV no longer detects HLS under a .mp4 name at all. Either
    # way nothing but the named file is read.
    assert raised.value.code is ErrorCode.NOT_A_VIDEO


async def test_a_missing_file_is_not_a_video(prober: Prober, tmp_path: Path) -> None:
    assert await outcome(prober, str(tmp_path / "gone.mp4")) is ErrorCode.NOT_A_VIDEO


# Beyond the corpus: one file per accepted demuxer, plus the two cases where
# the probers are known to differ. name -> ffmpeg arguments after the inputs.
_TONE = ["-f", "lavfi", "-i", "sine=frequency=440:duration=1"]
_BARS = ["-f", "lavfi", "-i", "testsrc=size=160x120:rate=25:duration=1"]
MORE_FORMATS: dict[str, list[str]] = {
    "avi.avi": [*_BARS, *_TONE, "-c:v", "mpeg4", "-c:a", "pcm_s16le"],
    "mpegts.ts": [*_BARS, *_TONE, "-c:v", "libx264", "-c:a", "aac", "-f", "mpegts"],
    "flv.flv": [*_BARS, *_TONE, "-c:v", "flv", "-c:a", "aac"],
    "asf.wmv": [*_BARS, *_TONE, "-c:v", "wmv2", "-c:a", "wmav2"],
    "mpeg.mpg": [*_BARS, *_TONE, "-c:v", "mpeg2video", "-c:a", "mp2", "-f", "vob"],
    "ogg.ogv": [*_BARS, *_TONE, "-c:v", "libtheora", "-c:a", "libvorbis"],
    "aac.aac": [*_TONE, "-c:a", "aac", "-f", "adts"],
    "wav.wav": [*_TONE],
    "flac.flac": [*_TONE, "-c:a", "flac"],
    "h264.h264": [*_BARS, "-c:v", "libx264", "-f", "h264"],
    "hevc.hevc": [*_BARS, "-c:v", "libx265", "-f", "hevc"],
    "piped.webm": [*_BARS, *_TONE, "-c:v", "libvpx", "-c:a", "libopus", "-f", "webm"],
    "mp3.mp3": [*_TONE, "-c:a", "libmp3lame"],
    "fonts.mkv": [*_BARS, "-c:v", "libx264", "-attach", "{font}",
                  "-metadata:s:t", "mimetype=application/x-truetype-font"],
    # A 5 MiB comment tag: ffprobe printing every tag once passed its 4 MiB
    # output cap and called a valid clip not_a_video (found by a review).
    "bigtag.mkv": [*_BARS, "-f", "ffmetadata", "-i", "{tags}", "-map", "0", "-map_metadata", "1",
                   "-c:v", "libx264"],
}
KNOWN_DIFFERENCES = ("mp3.mp3", "fonts.mkv")


@pytest.fixture(scope="module")
def more_formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("formats")
    font = directory / "font.ttf"
    font.write_bytes(b"\x00\x01\x00\x00 not really a font")
    tags = directory / "tags.txt"
    tags.write_text(";FFMETADATA1\ncomment=" + "A" * (5 * 1024 * 1024) + "\n")
    made = {}
    for name, args in MORE_FORMATS.items():
        # piped.webm goes through a pipe: no duration in its header.
        out = "pipe:1" if name == "piped.webm" else str(directory / name)
        argv = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y",
                *(a.format(font=font, tags=tags) for a in args), out]
        result = subprocess.run(argv, capture_output=True, timeout=60, check=True)
        if name == "piped.webm":
            (directory / name).write_bytes(result.stdout)
        made[name] = directory / name
    return made


@pytest.mark.parametrize("name", [n for n in MORE_FORMATS if n not in KNOWN_DIFFERENCES])
async def test_both_probers_agree_on_every_accepted_demuxer(
    probers: dict[str, Prober], more_formats: dict[str, Path], name: str
) -> None:
    path = str(more_formats[name])

    pyav = await outcome(probers["pyav"], path)

    assert pyav == await outcome(probers["ffprobe"], path)
    assert isinstance(pyav, dict)


async def test_known_difference_mp3_duration_depends_on_the_libav_version(
    probers: dict[str, Prober], more_formats: dict[str, Path]
) -> None:
    # Not the prober's doing: libavformat 62 (FFmpeg 8, bundled by PyAV >= 16)
    # subtracts the encoder delay and padding of the LAME header (1.000 s);
    # ffprobe 5.1, like FFmpeg 7 in PyAV 15, does not (1.045 s). bit_rate,
    # size / duration when the header has none, follows.
    path = str(more_formats["mp3.mp3"])
    pyav, ffprobe = await probers["pyav"].probe(path), await probers["ffprobe"].probe(path)

    assert pyav["duration_s"] == pytest.approx(1.0, abs=0.05)
    assert ffprobe["duration_s"] == pytest.approx(1.0, abs=0.05)
    assert {**pyav, "duration_s": None, "bit_rate": None} == {
        **ffprobe, "duration_s": None, "bit_rate": None}


async def test_known_difference_a_stream_without_decoder_has_no_codec_name_with_pyav(
    probers: dict[str, Prober], more_formats: dict[str, Path]
) -> None:
    # PyAV reads a stream's codec parameters only through a decoder; a font
    # attachment has none. The clip's video and audio are unaffected.
    path = str(more_formats["fonts.mkv"])
    pyav, ffprobe = await probers["pyav"].probe(path), await probers["ffprobe"].probe(path)

    assert ffprobe["streams"][-1] == {"index": 1, "codec_type": "attachment", "codec_name": "ttf"}
    assert pyav["streams"][-1] == {"index": 1, "codec_type": "attachment", "codec_name": None}
    assert pyav["video"] == ffprobe["video"]
    assert pyav["streams"][:-1] == ffprobe["streams"][:-1]
