"""py-spy raw profiles summarized: top frames, and where the samples go by stage.

``python -m loadkit.spy FILE... [--out profile.md]`` summarizes any raw
(collapsed-stack) files written by ``py-spy record -f raw``; the load test
calls :func:`write_profile` for the files of its ``--py-spy`` recordings.

A sample is one stack, root first. Frames are aggregated by function and
file (line numbers dropped). Self = the sample's innermost frame; inclusive =
every sample the frame is on (once per sample, recursion or not). The stage
rollup gives each sample to the innermost frame that a stage rule claims,
below the event loop's own frame: a stats call made by the use case counts
as stats, not as the use case. A sample with nothing below the loop's frame
is the event loop itself (uvloop's C code: epoll, reads, callback dispatch).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

Frame = tuple[str, str]  # (function, file)
Stacks = Counter[tuple[Frame, ...]]

TOP_SELF = 25
TOP_INCLUSIVE = 40
FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class StageRule:
    stage: str
    funcs: frozenset[str] = frozenset()  # function names, wherever they are
    files: tuple[str, ...] = ()  # path fragments ("alertd/outbox.py", "aiormq/")
    pairs: tuple[tuple[str, str], ...] = ()  # (function, path fragment)

    def claims(self, frame: Frame) -> bool:
        func, path = frame
        name = _short(func)
        return (name in self.funcs or any(_in_path(path, f) for f in self.files)
                or any(name == fn and _in_path(path, f) for fn, f in self.pairs))


EVENT_LOOP = "event loop (self)"
ASYNCIO = "asyncio, caller not read"  # a partial stack of asyncio frames only
OTHER = "other"
# Checked in this order for each frame, innermost frame first.
STAGE_RULES = (
    StageRule("outbox / webhook",
              frozenset({"claim_due", "record_attempt", "record_attempts", "count_pending",
                         "deliver", "deliver_webhook"}),
              ("alertd/outbox.py", "alertd/adapters/webhook.py", "alertd/signing.py")),
    StageRule("store (dedup, record_outcome)",
              frozenset({"recorded_fingerprint", "record_outcome", "check_schema"}),
              ("alertd/adapters/postgres.py", "psycopg/", "psycopg_pool/")),
    StageRule("download (fetch_video)", frozenset({"fetch_video"}),
              ("alertd/adapters/download.py", "alertd/netguard.py"),
              (("__aenter__", "loadkit/noopalertd.py"), ("__aexit__", "loadkit/noopalertd.py"))),
    StageRule("probe", frozenset(),
              ("alertd/adapters/pyav.py", "alertd/adapters/ffprobe.py", "alertd/probehelper.py",
               "alertd/media.py", "av/"),
              (("probe", "loadkit/noopalertd.py"),)),
    StageRule("AMQP consume / ack", frozenset(),
              ("alertd/adapters/amqp.py", "aiormq/", "pamqp/")),
    StageRule("alert handling (handler, use case, domain)", frozenset(),
              ("alertd/handler.py", "alertd/service.py", "alertd/domain.py")),
    StageRule("child: heartbeat, stats, logging", frozenset(),
              ("alertd/stats.py", "alertd/child.py", "alertd/logs.py", "logging/")),
    StageRule("master (supervision, heartbeats, /metrics)", frozenset(),
              ("alertd/master.py", "alertd/handle.py", "alertd/aggregate.py",
               "alertd/statusview.py", "alertd/tinyserve.py", "alertd/autoscale.py",
               "alertd/queuedepth.py", "alertd/sdnotify.py", "prometheus_client/")),
)
STAGES = (*(r.stage for r in STAGE_RULES), EVENT_LOOP, ASYNCIO, OTHER)
# The innermost of these on a stack is the event loop; below it runs a callback.
LOOP_FRAMES = {("run", "asyncio/runners.py"), ("run_until_complete", "asyncio/base_events.py"),
               ("run_forever", "asyncio/base_events.py"), ("_run_once", "asyncio/base_events.py"),
               ("_run", "asyncio/events.py")}
LOOP_INTERNALS = ("asyncio/", "uvloop/", "selectors.py", "contextvars", "_weakrefset.py")


def _short(func: str) -> str:
    """py-spy names methods by qualified name ("AmqpConsumer._run_delivery"): the last part."""
    return func.rsplit(".", 1)[-1]


def _in_path(path: str, fragment: str) -> bool:
    """``fragment`` as whole path components of ``path`` (full or package-relative)."""
    return ("/" + path).find("/" + fragment) >= 0


def parse_raw(text: str) -> Stacks:
    """``frame;frame;... count`` lines (py-spy ``-f raw``) -> samples per stack."""
    stacks: Stacks = Counter()
    for line in text.splitlines():
        stack, _, count = line.strip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks[tuple(_frame(f) for f in stack.split(";") if f)] += int(count)
    return stacks


def _frame(text: str) -> Frame:
    found = FRAME_RE.match(text)
    return (found["func"], found["file"]) if found else (text, "")


def loop_cut(frames: tuple[Frame, ...]) -> int:
    """How many frames, from the root, are the process's scaffolding up to its event loop.

    0 when the stack has no event-loop frame: a process without one (the
    master, a PyAV helper), or a coroutine's stack that py-spy read without
    its callers (``--nonblocking`` reads a running process, so some stacks
    come back cut short).
    """
    for i in range(len(frames) - 1, -1, -1):
        if any(_short(frames[i][0]) == f and _in_path(frames[i][1], p) for f, p in LOOP_FRAMES):
            return i + 1
    return 0


def stage_of(frames: tuple[Frame, ...]) -> str:
    """The stage a sample belongs to (see the module docstring)."""
    cut = loop_cut(frames)
    below = frames[cut:]
    for frame in reversed(below):
        for rule in STAGE_RULES:
            if rule.claims(frame):
                return rule.stage
    if below and not all(any(_in_path(path, p) for p in LOOP_INTERNALS) for _, path in below):
        return OTHER
    return EVENT_LOOP if cut else ASYNCIO


@dataclass
class Profile:
    """One process's samples, aggregated."""

    name: str
    total: int = 0
    trunk: tuple[Frame, ...] = ()  # the frames every sample starts with (start-up, runner)
    scaffold: set[Frame] = field(default_factory=set)  # the trunk, and frames up to the loop
    partial: int = 0  # samples without the loop's frame in a process that has one
    self_samples: Counter[Frame] = field(default_factory=Counter)
    inclusive: Counter[Frame] = field(default_factory=Counter)
    stages: Counter[str] = field(default_factory=Counter)

    def share(self, samples: int) -> float:
        return 100 * samples / self.total if self.total else 0.0


def summarize(name: str, stacks: Stacks) -> Profile:
    profile = Profile(name)
    trunk: tuple[Frame, ...] | None = None
    for frames, count in stacks.items():
        if trunk is None:
            trunk = frames
        while trunk and frames[:len(trunk)] != trunk:
            trunk = trunk[:-1]
        profile.total += count
        if frames:
            profile.self_samples[frames[-1]] += count
        for frame in set(frames):
            profile.inclusive[frame] += count
        profile.stages[stage_of(frames)] += count
        cut = loop_cut(frames)
        profile.scaffold.update(frames[:cut])
        if not cut:
            profile.partial += count
    profile.trunk = trunk or ()
    profile.scaffold.update(profile.trunk)
    if not any(loop_cut(frames) for frames in stacks):
        profile.partial = 0  # no event loop in this process at all
    return profile


def summarize_file(path: Path, name: str | None = None) -> Profile:
    return summarize(name or path.name, parse_raw(path.read_text(errors="replace")))


def markdown(profile: Profile, *, rate_hz: float | None = None, level: int = 2) -> list[str]:
    """One process's section: total, stage rollup, top self and inclusive frames."""
    h = "#" * level
    busy = f" (~{profile.total / rate_hz:.1f} s of busy samples at {rate_hz:g} Hz)" \
        if rate_hz else ""
    lines = [f"{h} {profile.name}", "", f"Total samples: **{profile.total}**{busy}.", ""]
    if not profile.total:
        return [*lines, "No samples (the process was idle or py-spy could not read it).", ""]
    lines += [f"{h}# Hot path by stage", "", "| stage | samples | % |", "|---|---:|---:|"]
    for stage in STAGES:
        if profile.stages.get(stage):
            n = profile.stages[stage]
            lines.append(f"| {stage} | {n} | {profile.share(n):.1f} |")
    lines += ["", *_frame_table(f"{h}# Top {TOP_SELF} self frames", profile,
                                profile.self_samples, TOP_SELF)]
    branches = Counter({f: n for f, n in profile.inclusive.items() if f not in profile.scaffold})
    lines += _frame_table(f"{h}# Top {TOP_INCLUSIVE} inclusive frames", profile, branches,
                          TOP_INCLUSIVE)
    if profile.scaffold:
        lines += [f"Left out: {len(profile.scaffold)} scaffolding frames (start-up, the "
                  "command line, the master's fork, the event loop's runner: every sample "
                  "that has them is under them)."]
    if profile.partial:
        lines += [f"{profile.share(profile.partial):.0f} % of the samples came without the "
                  "event loop's frame (a coroutine's stack read without its callers); they "
                  "count all the same, by their innermost frames."]
    return [*lines, ""]


def _frame_table(title: str, profile: Profile, counts: Counter[Frame], top: int) -> list[str]:
    lines = [title, "", "| % | samples | function | file |", "|---:|---:|---|---|"]
    for (func, path), n in counts.most_common(top):
        lines.append(f"| {profile.share(n):.1f} | {n} | `{_cell(func)}` | {_cell(path)} |")
    return [*lines, ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_profile(path: Path, sections: Iterable[tuple[str, list[tuple[str, Path]]]], *,
                  rate_hz: float, note: str = "") -> None:
    """profile.md: for every (heading, [(process name, raw file)]) a section per process."""
    lines = ["# py-spy profiles", ""]
    if note:
        lines += [note, ""]
    for heading, files in sections:
        lines += [f"## {heading}", ""]
        for name, raw in files:
            lines += markdown(summarize_file(raw, f"{name} ({raw.name})"), rate_hz=rate_hz,
                              level=3)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadkit.spy", description=(
        "Summarize py-spy raw files: total samples, stage rollup, top self and inclusive "
        "frames."))
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="write markdown here (default: stdout)")
    p.add_argument("--rate", type=float, help="py-spy's --rate, to show busy seconds")
    args = p.parse_args(argv)
    lines = ["# py-spy profiles", ""]
    for raw in args.files:
        lines += markdown(summarize_file(raw, str(raw)), rate_hz=args.rate)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
