"""FfprobeProber against the real ffprobe on the sample clips, and against misbehaving fakes."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from alertd.adapters.ffprobe import FfprobeProber
from alertd.errors import ConfigError, ErrorCode, PermanentError
from tests.processes import is_alive, is_reaped

pytestmark = pytest.mark.integration

# name -> (video codec, width, height, fps, duration_s, audio codec or None)
VALID_CLIPS = {
    "mp4": ("h264", 320, 240, 25.0, 2.0, "aac"),
    "mp4_not_faststart": ("h264", 320, 240, 25.0, 2.0, "aac"),
    "webm": ("vp8", 320, 240, 25.0, 1.0, "opus"),
    "mkv": ("h264", 320, 240, 25.0, 1.0, "vorbis"),
    "mov": ("h264", 320, 240, 29.97, 1.0, "aac"),
    "video_only": ("h264", 320, 240, 25.0, 1.0, None),
    "large": ("h264", 640, 480, 25.0, 4.0, "aac"),
}


@pytest.fixture()
def prober() -> FfprobeProber:
    return FfprobeProber(timeout=20)


def fake_ffprobe(directory: Path, body: str) -> Path:
    """An executable shell script standing in for ffprobe; ``body`` is its script."""
    script = directory / "fake-ffprobe"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def sleeping_ffprobe(directory: Path) -> tuple[Path, Path, Path]:
    """A fake that hangs, with its sleep as a *child* (so killing only the shell leaks it)."""
    shell_pid, sleep_pid = directory / "shell.pid", directory / "sleep.pid"
    script = fake_ffprobe(
        directory, f'echo $$ > "{shell_pid}"\nsleep 30 &\necho $! > "{sleep_pid}"\nwait'
    )
    return script, shell_pid, sleep_pid


def read_pid(pid_file: Path) -> int | None:
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    return int(text) if text else None


async def wait_for_pid(pid_file: Path) -> int:
    for _ in range(500):
        pid = read_pid(pid_file)
        if pid is not None:
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError(f"{pid_file} was never written")


async def wait_until_gone(pid: int) -> bool:
    for _ in range(200):
        if not is_alive(pid):
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("name", sorted(VALID_CLIPS))
async def test_valid_clip_gives_its_codecs_resolution_fps_and_duration(
    prober: FfprobeProber, clips: dict[str, Path], name: str
) -> None:
    codec, width, height, fps, duration, audio_codec = VALID_CLIPS[name]

    metadata = await prober.probe(str(clips[name]))

    video = metadata["video"]
    assert (video["codec"], video["width"], video["height"], video["fps"]) == (
        codec, width, height, fps,
    )
    assert video["pix_fmt"] == "yuv420p"
    assert metadata["duration_s"] == pytest.approx(duration, abs=0.05)
    assert isinstance(metadata["bit_rate"], int) and metadata["bit_rate"] > 0
    audio_codecs = [s["codec_name"] for s in metadata["streams"] if s["codec_type"] == "audio"]
    assert audio_codecs == ([audio_codec] if audio_codec else [])
    assert (metadata["audio"] or {}).get("codec") == audio_codec


async def test_webm_and_mkv_report_the_matroska_format(
    prober: FfprobeProber, clips: dict[str, Path]
) -> None:
    for name in ("webm", "mkv"):
        metadata = await prober.probe(str(clips[name]))
        assert metadata["format_name"] == "matroska,webm"


async def test_audio_only_clip_has_null_video_and_its_audio(
    prober: FfprobeProber, clips: dict[str, Path]
) -> None:
    metadata = await prober.probe(str(clips["audio_only"]))

    assert metadata["video"] is None
    assert metadata["audio"] == {"codec": "aac", "sample_rate": 44100, "channels": 1}
    assert metadata["duration_s"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name", ["not_a_video", "empty"])
async def test_text_and_empty_files_are_not_a_video(
    prober: FfprobeProber, clips: dict[str, Path], name: str
) -> None:
    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(clips[name]))

    assert raised.value.code is ErrorCode.NOT_A_VIDEO
    assert str(clips[name]) not in raised.value.message
    assert "Invalid data found" in raised.value.message


async def test_truncated_faststart_mp4_is_accepted_with_the_header_duration(
    prober: FfprobeProber, clips: dict[str, Path]
) -> None:
    # Documented in alertd.samples: the moov header is intact, so ffprobe
    # reports the full clip although 70% of the payload is missing.
    metadata = await prober.probe(str(clips["truncated"]))

    assert metadata["duration_s"] == pytest.approx(2.0, abs=0.05)
    assert metadata["video"]["codec"] == "h264"


@pytest.mark.parametrize("name", ["http:evil", "concat:a|b", "pipe:0"])
async def test_a_protocol_looking_file_name_is_read_as_a_local_file(
    prober: FfprobeProber, clips: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, name: str,
) -> None:
    shutil.copyfile(clips["mp4"], tmp_path / name)
    monkeypatch.chdir(tmp_path)

    metadata = await prober.probe(name)

    assert metadata["video"]["codec"] == "h264"
    assert metadata["duration_s"] == pytest.approx(2.0, abs=0.05)


async def test_a_playlist_pointing_at_another_local_file_is_refused(
    prober: FfprobeProber, clips: dict[str, Path], tmp_path: Path
) -> None:
    playlist = tmp_path / "alert.mp4"
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\n{clips['mp4']}\n#EXT-X-ENDLIST\n"
    )

    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(playlist))

    assert raised.value.code is ErrorCode.NOT_A_VIDEO
    assert "whitelist" in raised.value.message


async def test_a_hung_ffprobe_is_killed_with_its_children_and_raises_probe_timeout(
    tmp_path: Path,
) -> None:
    script, shell_pid_file, sleep_pid_file = sleeping_ffprobe(tmp_path)
    prober = FfprobeProber(ffprobe=str(script), timeout=0.5)

    started = time.monotonic()
    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(tmp_path / "clip.mp4"))
    elapsed = time.monotonic() - started

    assert raised.value.code is ErrorCode.PROBE_TIMEOUT
    assert elapsed < 5
    # Reaped by us, not merely killed: no /proc entry, not even a zombie.
    assert is_reaped(await wait_for_pid(shell_pid_file))
    assert await wait_until_gone(await wait_for_pid(sleep_pid_file))


async def test_cancelling_the_probe_kills_and_reaps_the_child(tmp_path: Path) -> None:
    script, shell_pid_file, sleep_pid_file = sleeping_ffprobe(tmp_path)
    prober = FfprobeProber(ffprobe=str(script), timeout=60)
    task = asyncio.create_task(prober.probe(str(tmp_path / "clip.mp4")))
    shell_pid = await wait_for_pid(shell_pid_file)
    sleep_pid = await wait_for_pid(sleep_pid_file)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert is_reaped(shell_pid)
    assert await wait_until_gone(sleep_pid)


async def test_an_ffprobe_killed_by_a_signal_is_probe_crashed(tmp_path: Path) -> None:
    prober = FfprobeProber(ffprobe=str(fake_ffprobe(tmp_path, "kill -SEGV $$")), timeout=5)

    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(tmp_path / "clip.mp4"))

    assert raised.value.code is ErrorCode.PROBE_CRASHED
    assert "SIGSEGV" in raised.value.message


async def test_ffprobe_runs_without_alertds_settings_and_secrets_in_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It parses hostile clips: it has no use for the webhook secret or the DSN.
    monkeypatch.setenv("ALERTD_WEBHOOK_SECRET", "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0")
    monkeypatch.setenv("ALERTD_DSN", "postgresql://u:pgpass@127.0.0.1/db")
    seen = tmp_path / "env.txt"
    prober = FfprobeProber(ffprobe=str(fake_ffprobe(tmp_path, f"env > {seen}; exit 1")),
                           timeout=5)
    with pytest.raises(PermanentError):
        await prober.probe(str(tmp_path / "clip.mp4"))
    env = seen.read_text()
    assert "PATH=" in env and "ALERTD_" not in env and "pgpass" not in env


async def test_output_beyond_the_cap_is_not_a_video_and_does_not_hang(tmp_path: Path) -> None:
    # Prints 8 MiB and then would sleep: only killing it ends the probe early.
    body = "head -c 8388608 /dev/zero\nexec sleep 30"
    prober = FfprobeProber(ffprobe=str(fake_ffprobe(tmp_path, body)), timeout=10)

    started = time.monotonic()
    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(tmp_path / "clip.mp4"))

    assert raised.value.code is ErrorCode.NOT_A_VIDEO
    assert "more than" in raised.value.message
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("echo 'not json'", "invalid JSON"),
        ("echo '[1, 2]'", "no JSON object"),
        ("echo '{\"streams\": [], \"format\": {}}'", "no audio or video stream"),
    ],
    ids=["invalid-json", "json-array", "no-streams"],
)
async def test_a_successful_ffprobe_with_unusable_output_is_not_a_video(
    tmp_path: Path, body: str, reason: str
) -> None:
    prober = FfprobeProber(ffprobe=str(fake_ffprobe(tmp_path, body)), timeout=5)

    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(tmp_path / "clip.mp4"))

    assert raised.value.code is ErrorCode.NOT_A_VIDEO
    assert reason in raised.value.message


async def test_a_failing_ffprobe_reports_its_last_stderr_lines_only(tmp_path: Path) -> None:
    body = (
        "head -c 100000 /dev/zero | tr '\\0' 'x' >&2\n"
        "echo >&2\necho '[mov @ 0x55d0c0ffee00] moov atom not found' >&2\n"
        "echo \"$(eval echo \\${$#}): Invalid data found when processing input\" >&2\n"
        "exit 1"
    )
    prober = FfprobeProber(ffprobe=str(fake_ffprobe(tmp_path, body)), timeout=5)

    with pytest.raises(PermanentError) as raised:
        await prober.probe(str(tmp_path / "clip.mp4"))

    assert raised.value.code is ErrorCode.NOT_A_VIDEO
    assert raised.value.message == (
        "[mov] moov atom not found; Invalid data found when processing input"
    )


def test_a_missing_ffprobe_is_a_config_error_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(ConfigError, match=r"^prober: ffprobe not found on PATH$"):
        FfprobeProber(timeout=5)


def test_a_non_positive_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        FfprobeProber(timeout=0)
