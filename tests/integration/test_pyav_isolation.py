"""PyAVProber's isolation: a helper that crashes, hangs or lies fails one probe, never the pool.

Faults are real: ``faulty_probehelper.py`` is the real helper, with a SIGSEGV,
an exit or a hang on clips named for them; every helper is a real process
whose reaping is checked in /proc.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
import uvloop

from alertd.adapters.pyav import FRAME_HEADER, PyAVProber
from alertd.errors import ConfigError, ErrorCode, PermanentError, TransientError
from tests.processes import is_alive, is_reaped, minor_faults

pytestmark = pytest.mark.integration

FAULTY = (sys.executable, str(Path(__file__).with_name("faulty_probehelper.py")))


@pytest_asyncio.fixture()
async def pool() -> AsyncIterator[PyAVProber]:
    async with PyAVProber(timeout=2, size=2, command=FAULTY) as prober:
        yield prober


def faulty_clip(directory: Path, name: str) -> Path:
    """A file whose name picks the helper's fault (see faulty_probehelper)."""
    path = directory / name
    path.write_bytes(b"")
    return path


def read_pid(clip: Path) -> int | None:
    """The pid the faulty helper wrote for ``clip``, once it has."""
    pid_file = Path(f"{clip}.pid")
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    return int(text) if text else None


async def wait_for_pid(clip: Path) -> int:
    for _ in range(1000):
        if (pid := read_pid(clip)) is not None:
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError(f"no pid was ever written for {clip}")


async def wait_until_gone(pid: int) -> bool:
    for _ in range(500):
        if not is_alive(pid):
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_crashing_helper_fails_only_its_probe_while_the_others_succeed(
    pool: PyAVProber, clips: dict[str, Path], tmp_path: Path
) -> None:
    crash = faulty_clip(tmp_path, "crash.mp4")
    expected = await pool.probe(str(clips["mp4"]))

    results = await asyncio.gather(
        pool.probe(str(crash)), *(pool.probe(str(clips["mp4"])) for _ in range(6)),
        return_exceptions=True,
    )

    error = results[0]
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.PROBE_CRASHED
    assert "SIGSEGV" in error.message
    assert results[1:] == [expected] * 6
    assert is_reaped(await wait_for_pid(crash))


async def test_a_crashed_helper_is_replaced_and_later_probes_succeed(
    pool: PyAVProber, clips: dict[str, Path], tmp_path: Path
) -> None:
    crash = faulty_clip(tmp_path, "crash.mp4")
    with pytest.raises(PermanentError):
        await pool.probe(str(crash))
    crashed = await wait_for_pid(crash)

    # Both slots busy at once: the empty one gets a fresh helper.
    await asyncio.gather(*(pool.probe(str(clips["mp4"])) for _ in range(4)))

    assert len(pool.helper_pids()) == 2
    assert crashed not in pool.helper_pids()


async def test_a_helper_killed_while_idle_is_replaced_without_failing_the_next_probe(
    clips: dict[str, Path], caplog: pytest.LogCaptureFixture,
) -> None:
    # The OOM killer picks a helper bloated by its last clip, between alerts:
    # the next alert's clip did nothing wrong (found by a review).
    async with PyAVProber(timeout=5, size=1) as pool:
        [idle] = pool.helper_pids()
        os.kill(idle, signal.SIGKILL)
        assert await wait_until_gone(idle)
        metadata = await pool.probe(str(clips["mp4"]))
        assert metadata["video"] is not None
        assert is_reaped(idle) and idle not in pool.helper_pids()
    assert f"pyav helper pid {idle} died while idle (pyav helper killed by SIGKILL)" in caplog.text


async def test_a_clip_that_always_crashes_fails_each_time_and_the_pool_keeps_working(
    pool: PyAVProber, clips: dict[str, Path], tmp_path: Path
) -> None:
    expected = await pool.probe(str(clips["mp4"]))
    started = time.monotonic()

    for attempt in range(6):
        crash = faulty_clip(tmp_path, f"crash-{attempt}.mp4")
        with pytest.raises(PermanentError) as raised:
            await pool.probe(str(crash))
        assert raised.value.code is ErrorCode.PROBE_CRASHED
        assert is_reaped(await wait_for_pid(crash))
        assert await pool.probe(str(clips["mp4"])) == expected
        assert len(pool.helper_pids()) <= 2

    # One helper start per crash, started by the next probe: no restart loop.
    assert time.monotonic() - started < 30


async def test_a_hung_helper_is_killed_with_probe_timeout_while_other_probes_go_on(
    pool: PyAVProber, clips: dict[str, Path], tmp_path: Path
) -> None:
    hang = faulty_clip(tmp_path, "hang.mp4")
    expected = await pool.probe(str(clips["mp4"]))
    started = time.monotonic()
    hung = asyncio.create_task(pool.probe(str(hang)))
    pid = await wait_for_pid(hang)

    # The other helper keeps answering while this one hangs.
    for _ in range(3):
        assert await pool.probe(str(clips["mp4"])) == expected
    with pytest.raises(PermanentError) as raised:
        await hung

    assert raised.value.code is ErrorCode.PROBE_TIMEOUT
    assert time.monotonic() - started < 5
    assert is_reaped(pid)
    await asyncio.gather(*(pool.probe(str(clips["mp4"])) for _ in range(4)))
    assert len(pool.helper_pids()) == 2


async def test_a_helper_that_exits_is_probe_crashed_with_its_status(
    pool: PyAVProber, clips: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(PermanentError) as raised:
        await pool.probe(str(faulty_clip(tmp_path, "exit.mp4")))

    assert raised.value.code is ErrorCode.PROBE_CRASHED
    assert "exited with status 3" in raised.value.message
    assert (await pool.probe(str(clips["mp4"])))["video"]["codec"] == "h264"


async def test_cancelling_a_probe_kills_its_helper_and_gives_the_slot_back(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    hang = faulty_clip(tmp_path, "hang.mp4")
    async with PyAVProber(timeout=60, size=2, command=FAULTY) as pool:
        task = asyncio.create_task(pool.probe(str(hang)))
        pid = await wait_for_pid(hang)

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert is_reaped(pid)
        await asyncio.gather(*(pool.probe(str(clips["mp4"])) for _ in range(4)))
        assert len(pool.helper_pids()) == 2


async def test_probes_beyond_the_pool_size_wait_for_a_free_helper(
    clips: dict[str, Path]
) -> None:
    async with PyAVProber(timeout=20, size=1) as pool:
        expected = await pool.probe(str(clips["large"]))

        results = await asyncio.gather(*(pool.probe(str(clips["large"])) for _ in range(8)))

        assert results == [expected] * 8
        assert len(pool.helper_pids()) == 1


async def test_closing_the_pool_kills_and_reaps_every_helper_even_mid_probe(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    hang = faulty_clip(tmp_path, "hang.mp4")
    pool = PyAVProber(timeout=60, size=3, command=FAULTY)
    await pool.open()
    await pool.probe(str(clips["mp4"]))
    pids = pool.helper_pids()
    assert len(pids) == 3
    hung = asyncio.create_task(pool.probe(str(hang)))
    await wait_for_pid(hang)

    await pool.close()

    # Not the clip's fault: the alert may be tried again elsewhere.
    with pytest.raises(TransientError):
        await hung
    assert all(is_reaped(pid) for pid in pids)
    assert pool.helper_pids() == ()
    with pytest.raises(TransientError):
        await pool.probe(str(clips["mp4"]))


async def test_a_pool_whose_helpers_cannot_start_refuses_to_open() -> None:
    pool = PyAVProber(timeout=5, size=2, command=(sys.executable, "-c", "raise SystemExit(7)"))

    with pytest.raises(ConfigError, match="exited with status 7"):
        await pool.open()
    assert pool.helper_pids() == ()


async def test_a_helper_that_sends_a_broken_frame_is_killed_and_probe_crashed(
    tmp_path: Path,
) -> None:
    # Says ready, then answers any request with a frame header of 4 GiB - 1.
    script = textwrap.dedent(f"""
        import os, struct, sys, time
        body = b'{{"ready": true}}'
        os.write(1, struct.pack(">I", len(body)) + body)
        sys.stdin.buffer.read({FRAME_HEADER.size})
        os.write(1, b"\\xff\\xff\\xff\\xff")
        time.sleep(3600)
    """)
    async with PyAVProber(timeout=5, size=1, command=(sys.executable, "-c", script)) as pool:
        (pid,) = pool.helper_pids()
        started = time.monotonic()

        with pytest.raises(PermanentError) as raised:
            await pool.probe(str(tmp_path / "clip.mp4"))

        assert raised.value.code is ErrorCode.PROBE_CRASHED
        assert "frame" in raised.value.message
        assert time.monotonic() - started < 3
        assert is_reaped(pid)


async def test_an_idle_helper_exits_when_its_stdin_closes() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alertd.probehelper",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    (length,) = FRAME_HEADER.unpack(await process.stdout.readexactly(FRAME_HEADER.size))
    assert b'"ready":true' in await process.stdout.readexactly(length)

    process.stdin.close()

    assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_a_hung_helper_dies_with_its_parent_even_when_the_parent_is_sigkilled(
    tmp_path: Path,
) -> None:
    hang = faulty_clip(tmp_path, "hang.mp4")
    # A stand-in for a child process: opens a pool, starts a hanging probe, waits.
    parent_script = textwrap.dedent(f"""
        import asyncio
        from alertd.adapters.pyav import PyAVProber

        async def main():
            pool = PyAVProber(timeout=3600, size=1, command={FAULTY!r})
            await pool.open()
            await pool.probe({str(hang)!r})

        asyncio.run(main())
    """)
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", parent_script)
    try:
        helper = await wait_for_pid(hang)
        assert is_alive(helper)

        parent.send_signal(signal.SIGKILL)
        await parent.wait()

        assert await wait_until_gone(helper)
    finally:
        if parent.returncode is None:
            parent.kill()
        await parent.wait()


def test_the_pool_works_on_uvloop_like_in_a_child(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    crash = faulty_clip(tmp_path, "crash.mp4")

    async def scenario() -> list[object]:
        async with PyAVProber(timeout=10, size=2, command=FAULTY) as pool:
            return await asyncio.gather(
                pool.probe(str(crash)), pool.probe(str(clips["webm"])),
                pool.probe(str(clips["mov"])), return_exceptions=True,
            )

    crashed, webm, mov = uvloop.run(scenario())

    assert isinstance(crashed, PermanentError) and crashed.code is ErrorCode.PROBE_CRASHED
    assert isinstance(webm, dict) and webm["video"]["codec"] == "vp8"
    assert isinstance(mov, dict) and mov["video"]["fps"] == 29.97
    crashed_pid = read_pid(crash)
    assert crashed_pid is not None and is_reaped(crashed_pid)


async def test_helpers_run_without_alertds_settings_and_secrets_in_their_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALERTD_WEBHOOK_SECRET", "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0")
    seen = tmp_path / "env.json"
    dump = f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))"
    with pytest.raises(ConfigError):  # it exits instead of saying it is ready
        async with PyAVProber(timeout=2, size=1, command=(sys.executable, "-c", dump)):
            pass
    env = orjson.loads(seen.read_bytes())
    assert "PATH" in env and not [k for k in env if k.startswith("ALERTD_")]


def test_an_invalid_pool_size_or_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pool size"):
        PyAVProber(timeout=5, size=0)
    with pytest.raises(ConfigError, match="timeout"):
        PyAVProber(timeout=0)


async def test_a_helper_reuses_its_memory_from_one_probe_to_the_next(
    clips: dict[str, Path],
) -> None:
    # With glibc's defaults libav's freed frame buffers went back to the
    # kernel after every probe: ~230-300 page faults per probe of this clip.
    async with PyAVProber(timeout=10, size=1) as prober:
        for _ in range(5):
            await prober.probe(str(clips["large"]))
        (pid,) = prober.helper_pids()
        before = minor_faults(pid)
        for _ in range(20):
            await prober.probe(str(clips["large"]))
        per_probe = (minor_faults(pid) - before) / 20

    assert per_probe < 20


@pytest.mark.parametrize("command", [
    ("sh", "-c", "kill -9 $$"),  # the OOM killer, while libav loads
    (sys.executable, "-c", "import time; time.sleep(30)"),  # never ready in time
])
async def test_a_helper_start_that_may_succeed_later_is_not_a_config_error(
    command: tuple[str, ...],
) -> None:
    # A ConfigError makes the child exit 3 and the master halt for good
    # (systemd's RestartPreventExitStatus=3): only for what cannot heal.
    pool = PyAVProber(timeout=5, size=2, command=command, start_timeout=1)

    with pytest.raises(TransientError, match="did not start") as raised:
        await pool.open()
    assert not isinstance(raised.value, ConfigError)
    assert pool.helper_pids() == ()


@pytest.mark.parametrize("command", [
    ("/nonexistent/python", "-m", "alertd.probehelper"),  # a wrong command
    (sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'not a frame')"),
])
async def test_a_helper_that_can_never_start_is_a_config_error(command: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="did not start"):
        await PyAVProber(timeout=5, size=1, command=command, start_timeout=5).open()


async def test_helpers_never_import_code_from_the_working_directory(
    clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    planted = tmp_path / "planted"
    (tmp_path / "av.py").write_text(f"open({str(planted)!r}, 'w').close()\nraise SystemExit(9)\n")
    monkeypatch.chdir(tmp_path)

    async with PyAVProber(timeout=10, size=1) as prober:
        metadata = await prober.probe(str(clips["mp4"]))

    assert metadata["video"] is not None and not planted.exists()
