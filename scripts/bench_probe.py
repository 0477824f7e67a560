"""scripts/bench-probe's body: time FfprobeProber and PyAVProber on sample clips.

Local files only, nothing on the network. For each prober and clip: a few
warm-up probes, then ``--probes`` timed ones (``--concurrency`` at a time) on
a uvloop loop, as in a child. Prints wall ms/probe and CPU ms/probe, split
into this process (the event loop side) and the probing processes: ffprobe
children are reaped after each probe, so RUSAGE_CHILDREN counts them; PyAV
helpers live on, so their CPU is read from /proc/<pid>/stat before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from alertd.adapters.ffprobe import FfprobeProber
from alertd.adapters.pyav import PyAVProber
from alertd.ports import Prober
from alertd.samples import make_sample_clips

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WARMUP = 5


@dataclass(frozen=True)
class Sample:
    wall_s: float
    own_cpu_s: float
    probe_cpu_s: float


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reaped_children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def live_cpu(pids: Sequence[int]) -> float:
    """utime + stime of running processes, from /proc/<pid>/stat (fields 14 and 15)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


async def measure(prober: Prober, path: str, probes: int, concurrency: int,
                  helper_pids: Sequence[int]) -> Sample:
    for _ in range(WARMUP):
        await prober.probe(path)

    async def worker(count: int) -> None:
        for _ in range(count):
            await prober.probe(path)

    shares = [probes // concurrency + (i < probes % concurrency) for i in range(concurrency)]
    wall, own, reaped, helpers = time.perf_counter(), own_cpu(), reaped_children_cpu(), \
        live_cpu(helper_pids)
    await asyncio.gather(*(worker(n) for n in shares))
    return Sample(
        wall_s=time.perf_counter() - wall,
        own_cpu_s=own_cpu() - own,
        probe_cpu_s=(reaped_children_cpu() - reaped) + (live_cpu(helper_pids) - helpers),
    )


def report(prober: str, clip: str, probes: int, sample: Sample) -> None:
    per = 1000 / probes
    total = sample.own_cpu_s + sample.probe_cpu_s
    print(f"{prober:<8} {clip:<6} {probes:>6} {sample.wall_s * per:>10.2f} "
          f"{sample.own_cpu_s * per:>10.2f} {sample.probe_cpu_s * per:>10.2f} "
          f"{total * per:>10.2f}")


async def bench(clips: dict[str, Path], names: Sequence[str], probes: int, concurrency: int,
                helpers: int) -> None:
    print(f"{probes} probes per row, {concurrency} at a time; PyAV pool of {helpers} helpers")
    print(f"{'prober':<8} {'clip':<6} {'probes':>6} {'wall ms':>10} {'loop cpu':>10} "
          f"{'probe cpu':>10} {'total cpu':>10}   (per probe)")
    ffprobe = FfprobeProber(timeout=30)
    for name in names:
        report("ffprobe", name, probes,
               await measure(ffprobe, str(clips[name]), probes, concurrency, ()))

    started, before = time.perf_counter(), own_cpu()
    async with PyAVProber(timeout=30, size=helpers) as pyav:
        pids = pyav.helper_pids()
        print(f"PyAV pool start: {(time.perf_counter() - started) * 1000:.0f} ms wall, "
              f"helpers {live_cpu(pids) * 1000:.0f} ms CPU in all, "
              f"this process {(own_cpu() - before) * 1000:.0f} ms CPU")
        for name in names:
            report("pyav", name, probes,
                   await measure(pyav, str(clips[name]), probes, concurrency, pids))
        assert pyav.helper_pids() == pids, "a helper was replaced during the benchmark"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench-probe", description=__doc__)
    parser.add_argument("--probes", type=int, default=200, help="timed probes per row")
    parser.add_argument("--concurrency", type=int, default=1, help="probes in flight at once")
    parser.add_argument("--helpers", type=int, default=2, help="PyAV pool size")
    parser.add_argument("--clips", nargs="+", default=["large", "mp4"], help="corpus names")
    parser.add_argument("--clip-dir", type=Path, default=None,
                        help="cache of sample clips (default: a temp dir, removed after)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alertd-bench-") as scratch:
        clips = make_sample_clips(args.clip_dir or Path(scratch))
        uvloop.run(bench(clips, args.clips, args.probes, args.concurrency, args.helpers))


if __name__ == "__main__":
    main()
