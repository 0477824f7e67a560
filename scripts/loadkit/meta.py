"""What a results folder says about itself: the command, the machine, the commit, the method."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from alertd import __version__
from loadkit.profiles import Profile

ROOT = Path(__file__).resolve().parents[2]


def describe_source() -> str:
    """The commit, and whether alertd/ differs from it (read-only git calls)."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes in alertd/" if git("status", "--porcelain",
                                                                "alertd") else "")


def run_meta(args: argparse.Namespace, profile: Profile) -> dict[str, Any]:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    probers = "noop" if args.noop_adapters else ",".join(args.probers)
    return {
        "command": shlex.join(["scripts/loadtest", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "cpus": os.cpu_count(), "memory_gib": pages / 2**30,
        "alertd_version": __version__, "commit": describe_source(), "prober": probers,
        "probers": [] if args.noop_adapters else list(args.probers),
        "noop_adapters": bool(args.noop_adapters), "py_spy_s": args.py_spy,
        "profile": profile.as_dict(), "profile_text": profile.describe(),
        "alerts": args.alerts, "duration_cap_s": args.duration_cap, "repeat": args.repeat,
        "method": _method(args),
    }


def _method(args: argparse.Namespace) -> str:
    text = (
        "each configuration gets a fresh vhost and database and its own `alertd start`. "
        "Warm-up alerts (default max(10, 2 x slots)) are delivered and counted by "
        "/metrics first and not measured. Then the measured alerts are published with "
        "pika and publisher confirms in a closed loop: at most `window` outstanding "
        "(published, webhook not yet answered 200; default slots + max(4, slots/2)), so "
        "every slot stays busy and the queue stays short. alerts/s = measured alerts / "
        "(first measured publish -> last webhook received); latency = publish -> webhook "
        "arrival at the sink (the publish time travels in `attributes`, which alertd "
        "echoes); CPU is read from /proc at the start and end of that window; RSS peaks "
        "are sampled every 0.25 s; per-stage means are /metrics histogram deltas. "
        f"Publishing stops after {args.duration_cap:g} s (status `capped`). "
        "alertd runs with `--log-level warning --graceful-timeout 15` and is stopped "
        "with TERM.")
    if len(args.probers) > 1 and not args.noop_adapters:
        text += (" Each prober runs every configuration, back to back with the others, "
                 "their order alternating from one configuration to the next.")
    if args.noop_adapters:
        text = (
            "each configuration gets a fresh vhost (no database) and its own alertd "
            "started through `python -m loadkit.noopalertd start` (alertd's own command "
            "line; `bootstrap.open_world` replaced by adapters that do nothing). Once its "
            "children consume, the whole process group is stopped (SIGSTOP), the queue is "
            f"filled with {args.alerts} alert bodies (publisher confirms), CPU is read "
            "from /proc, SIGCONT; when the broker has no message ready and /metrics counts "
            "every message as done, CPU is read again. alertd runs with `--log-level "
            "warning`, an AMQP heartbeat of 120 s and `--heartbeat-timeout 600` (so the "
            "pause is nobody's failure), and is stopped with TERM.")
    if args.repeat > 1:
        text += f" Each configuration was measured {args.repeat} times, in rounds: " + (
            "per raw prefetch, its no-op runs, then a raw run (round i's runs are paired with "
            "raw run i), so that drift on the machine hits both alike. The tables list every "
            "run; the framework overhead lines give medians, min-max ranges and the range of "
            "the per-pair overheads." if args.compare_raw else
            "per concurrency, its no-op runs. The tables list every run; the framework "
            "overhead lines give medians and min-max ranges.")
    if args.py_spy:
        text += (f" py-spy recorded alertd's processes for {args.py_spy:g} s from the start "
                 "of each measured window (`--nonblocking`, 200 Hz; its own CPU shares the "
                 "cores, so these runs are a little slower than unprofiled ones).")
    return text
