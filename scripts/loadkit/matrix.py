"""The runs of one invocation, in order: (workers x concurrency) x probers, or no-op runs."""

from __future__ import annotations

import argparse
import shlex
from itertools import product

from loadkit.run import RunPlan

PROBERS = ("pyav", "ffprobe")
SMOKE_NOOP = (2, 4, 300)  # --smoke's no-op run: workers, concurrency, messages


def probers_of(text: str) -> list[str]:
    """"pyav,ffprobe" -> ["pyav", "ffprobe"]; unknown or repeated names are refused."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROBERS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--prober: a comma list of distinct probers from {', '.join(PROBERS)}"
                         f" (got {text!r})")
    return names


def axis(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def plans(args: argparse.Namespace) -> list[RunPlan]:
    """Every run, in the order they run.

    The probers of one (workers, concurrency) pair run back to back, so they
    see the same machine; their order alternates from one pair to the next,
    so neither always runs second (on a warmer, or a busier, machine).
    """
    extra = tuple(shlex.split(args.alertd_args))
    pairs = list(product(axis(args.workers), axis(args.concurrency)))
    if args.noop_adapters:
        return [RunPlan(workers=w, concurrency=c, prober="noop", alerts=args.alerts, warmup=0,
                        window=0, duration_cap_s=args.duration_cap, alertd_args=extra,
                        adapters="noop") for w, c in pairs]
    found = []
    for k, (w, c) in enumerate(pairs):
        for prober in args.probers if k % 2 == 0 else reversed(args.probers):
            found.append(RunPlan(workers=w, concurrency=c, prober=prober, alerts=args.alerts,
                                 warmup=args.warmup or max(10, 2 * w * c), window=args.window,
                                 duration_cap_s=args.duration_cap, alertd_args=extra))
    if args.smoke:
        w, c, messages = SMOKE_NOOP
        found.append(RunPlan(workers=w, concurrency=c, prober="noop", alerts=messages,
                             warmup=0, window=0, duration_cap_s=args.duration_cap,
                             alertd_args=extra, adapters="noop"))
    return found
