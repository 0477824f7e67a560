"""The runs of one invocation, in order: alertd's matrix or no-op runs, and the raw consumer's.

The matrix is (workers x concurrency) x probers. With ``--repeat`` the no-op
runs and the raw runs are repeated and interleaved (:func:`schedule`).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, replace
from itertools import product

from loadkit.run import RunPlan

PROBERS = ("pyav", "ffprobe")
SMOKE_NOOP = (2, 4, 300)  # --smoke's no-op run: workers, concurrency, messages


@dataclass(frozen=True)
class RawPlan:
    """One run of the raw aiormq consumer (loadkit.raw) over the no-op runs' bodies."""

    prefetch: int
    repeat: int = 1  # 1..--repeat


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


def raw_prefetches(args: argparse.Namespace, runs: list[RunPlan]) -> list[int]:
    """--raw-prefetch, else each concurrency of the no-op runs, else the largest --concurrency."""
    if args.raw_prefetch:
        return [args.raw_prefetch]
    return sorted({p.concurrency for p in runs if p.adapters == "noop"}) or [
        max(axis(args.concurrency))]


def schedule(args: argparse.Namespace) -> list[RunPlan | RawPlan]:
    """Every run, the raw consumer's included (with --compare-raw), in the order they run.

    Once each: :func:`plans`, then one raw run per prefetch. With --repeat N
    (no-op runs only) the no-op runs compared with one raw prefetch form a
    group, and each group runs N rounds of its no-op runs followed by a raw
    run: round i's runs are paired with raw run i. So a configuration's runs
    and its raw reference's alternate, seconds apart: a machine that drifts
    (someone else's load, thermals) moves both alike, not one side only.
    """
    runs = plans(args)
    if args.repeat == 1:
        raws = [RawPlan(p) for p in raw_prefetches(args, runs)] if args.compare_raw else []
        return [*runs, *raws]
    groups: dict[int, list[RunPlan]] = {}
    for plan in runs:
        groups.setdefault(args.raw_prefetch or plan.concurrency, []).append(plan)
    found: list[RunPlan | RawPlan] = []
    for prefetch, group in groups.items():
        for repeat in range(1, args.repeat + 1):
            found += [replace(plan, repeat=repeat) for plan in group]
            if args.compare_raw:
                found.append(RawPlan(prefetch, repeat))
    return found
