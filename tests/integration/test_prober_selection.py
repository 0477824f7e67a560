"""settings.prober picks the adapter in bootstrap; a PyAV pool lives as long as its world."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest

from alertd import bootstrap
from alertd.adapters.ffprobe import FfprobeProber
from alertd.adapters.pyav import PyAVProber
from alertd.config import Settings, validate
from alertd.errors import ConfigError

pytestmark = pytest.mark.integration


def is_reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


async def test_pyav_opens_a_pool_of_probe_helpers_closed_with_the_stack(
    clips: dict[str, Path],
) -> None:
    settings = validate(replace(Settings(), prober="pyav", probe_helpers=3))
    closers = contextlib.AsyncExitStack()

    prober = await bootstrap.open_prober(settings, closers)

    assert isinstance(prober, PyAVProber)
    pids = prober.helper_pids()
    assert len(pids) == 3
    assert (await prober.probe(str(clips["mp4"])))["video"]["codec"] == "h264"
    await closers.aclose()
    assert all(is_reaped(pid) for pid in pids)


async def test_pyav_is_the_default_prober_and_ffprobe_is_one_setting_away() -> None:
    # The default since equivalence and isolation were shown (issue 8).
    async with contextlib.AsyncExitStack() as closers:
        assert isinstance(await bootstrap.open_prober(Settings(), closers), PyAVProber)
        chosen = await bootstrap.open_prober(Settings(prober="ffprobe"), closers)
        assert isinstance(chosen, FfprobeProber)


@pytest.mark.parametrize("helpers", [0, 65])
def test_a_probe_pool_size_out_of_range_is_refused(helpers: int) -> None:
    with pytest.raises(ConfigError, match="probe_helpers"):
        validate(replace(Settings(), prober="pyav", probe_helpers=helpers))
