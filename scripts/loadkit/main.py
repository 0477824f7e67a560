"""The command line: a (workers x concurrency) matrix of measured runs, then the results folder."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from alertd import __version__
from loadkit import plots, report
from loadkit.clips import SIZES, make_clips
from loadkit.profiles import PROFILES, Profile, with_overrides
from loadkit.raw import RawResult, measure_raw
from loadkit.recommend import recommend
from loadkit.results import RunResult
from loadkit.run import RunPlan, execute
from loadkit.servers import LoadClipServer, LoadSink, ServerThread
from loadkit.stack import Environment

ROOT = Path(__file__).resolve().parents[2]
SMOKE = {"profile": "overhead", "workers": "1,2", "concurrency": "4", "alerts": 30,
         "warmup": 6, "duration_cap": 20.0, "wait_load": 0.0}
DEFAULTS = {"profile": "io-bound", "workers": "1,2", "concurrency": "4,16,64", "alerts": 1000,
            "warmup": 0, "duration_cap": 60.0, "wait_load": 0.7}
LOAD_POLL_S = 30.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/loadtest", description=(
        "Run alertd for real on loopback for each (workers, concurrency) pair and write "
        "results.csv, results.json, report.md and PNG figures."))
    p.add_argument("--profile", choices=sorted(PROFILES), help="load shape (default io-bound)")
    p.add_argument("--workers", help="comma-separated child counts (default 1,2)")
    p.add_argument("--concurrency", help="comma-separated slots per child (default 4,16,64)")
    p.add_argument("--prober", choices=["pyav", "ffprobe"], default="pyav")
    p.add_argument("--alerts", type=int, help="measured alerts per run (default 1000)")
    p.add_argument("--warmup", type=int,
                   help="warm-up alerts per run, not measured (default max(10, 2 x slots))")
    p.add_argument("--window", type=int, default=0, help="most alerts outstanding (published, "
                   "no webhook yet); default slots + max(4, slots/2)")
    p.add_argument("--duration-cap", type=float,
                   help="seconds of measured publishing per run at most (default 60)")
    p.add_argument("--max-p99", type=float, help="acceptable p99 in ms for the recommendation "
                   "(default 2 x the fastest configuration's p99)")
    p.add_argument("--out", type=Path, help="results folder (default a new one under $TMPDIR)")
    p.add_argument("--smoke", action="store_true",
                   help="fast check that the tool works: overhead profile, 1,2 x 4, 30 alerts, "
                   "raw comparison, no load wait")
    p.add_argument("--compare-raw", action="store_true",
                   help="also time a bare aiormq consumer on the same number of messages")
    p.add_argument("--raw-prefetch", type=int, help="default: the largest --concurrency")
    p.add_argument("--clips", help=f"clip sizes served round-robin ({', '.join(SIZES)})")
    p.add_argument("--clip-latency-ms", type=float)
    p.add_argument("--clip-jitter-ms", type=float)
    p.add_argument("--bandwidth-mbps", type=float, help="MB/s per connection (0 = unlimited)")
    p.add_argument("--sink-latency-ms", type=float)
    p.add_argument("--sink-jitter-ms", type=float)
    p.add_argument("--sink-failure-rate", type=float, help="0..1 of webhook attempts get 500")
    p.add_argument("--alertd-args", default="", help="extra 'alertd start' arguments")
    p.add_argument("--wait-load", type=float, help="before each run, wait until the 1-minute "
                   "load average is below this (default 0.7; 0 = do not wait)")
    p.add_argument("--wait-load-max", type=float, default=1200.0,
                   help="seconds to wait for that at most before the first run, then run "
                   "anyway (default 1200)")
    p.add_argument("--wait-load-between", type=float, default=240.0,
                   help="the same before every later run (default 240: the previous run's "
                   "own load has decayed by then, what is left is someone else's)")
    p.add_argument("--clips-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "alertd-loadtest-clips")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compare_raw = args.compare_raw or args.smoke
    return args


def build_profile(args: argparse.Namespace) -> Profile:
    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000
    return with_overrides(
        PROFILES[args.profile], clips=args.clips.split(",") if args.clips else None,
        clip_latency_s=seconds(args.clip_latency_ms), clip_jitter_s=seconds(args.clip_jitter_ms),
        bandwidth_bps=None if args.bandwidth_mbps is None else args.bandwidth_mbps * 1e6,
        sink_latency_s=seconds(args.sink_latency_ms), sink_jitter_s=seconds(args.sink_jitter_ms),
        sink_failure_rate=args.sink_failure_rate)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (polling every 30 s) until the 1-minute load is below ``threshold``; seconds waited."""
    started = time.monotonic()
    while threshold > 0 and float(loadavg().split()[0]) >= threshold:
        waited = time.monotonic() - started
        if waited >= max_wait:
            print(f"  load still {loadavg()} after {waited:.0f}s: running anyway", flush=True)
            break
        print(f"  load {loadavg()} >= {threshold}: waiting ({waited:.0f}s so far)", flush=True)
        time.sleep(LOAD_POLL_S)
    return time.monotonic() - started


def describe_source() -> str:
    """The commit, and whether alertd/ differs from it (read-only git calls)."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes in alertd/" if git("status", "--porcelain",
                                                                "alertd") else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _exit_on_term)
    sys.setswitchinterval(0.001)  # the sink's receive times should not wait on the publisher
    profile = build_profile(args)
    workers, concurrency = _matrix(args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(tempfile.gettempdir()) / "alertd-loadtest" / f"{args.profile}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    session = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="alertd-lt-"))
    make_clips(args.clips_dir, profile.clips)  # before the first run, so errors come early
    meta = _meta(args, profile)  # the commit as it is when the runs start
    print(f"alertd load test, profile {profile.name}: {profile.describe()}\n"
          f"matrix workers {workers} x concurrency {concurrency}, {args.alerts} alerts per "
          f"run, prober {args.prober}; results in {out}", flush=True)
    try:
        return _run_all(args, profile, out=out, session=session, workdir=workdir, meta=meta)
    finally:
        if workdir.exists() and not any(workdir.iterdir()):
            workdir.rmdir()  # interrupted before any log was written


def _run_all(args: argparse.Namespace, profile: Profile, *, out: Path, session: str,
             workdir: Path, meta: dict[str, Any]) -> int:
    workers, concurrency = _matrix(args)
    clips = make_clips(args.clips_dir, profile.clips)
    runs: list[RunResult] = []
    raw: RawResult | None = None
    with ServerThread(LoadClipServer(clips, profile), LoadSink(profile)) as servers:
        for w in workers:
            for c in concurrency:
                slots = w * c
                plan = RunPlan(workers=w, concurrency=c, prober=args.prober,
                               alerts=args.alerts, warmup=args.warmup or max(10, 2 * slots),
                               window=args.window, duration_cap_s=args.duration_cap,
                               alertd_args=tuple(shlex.split(args.alertd_args)))
                waited = wait_for_quiet(args.wait_load, args.wait_load_between if runs
                                        else args.wait_load_max)
                load_start = loadavg()
                result = execute(plan, profile.name, servers, workdir, session)
                result.load_start, result.load_end = load_start, loadavg()
                result.waited_for_load_s = round(waited, 1)
                runs.append(result)
                print(f"  {plan.label}: {result.alerts_per_s:.1f} alerts/s, p99 "
                      f"{result.latency_p99_ms:.0f} ms, {result.cpu_ms_per_alert:.2f} CPU "
                      f"ms/alert, {result.status}, consistent={result.consistent} "
                      f"(load {result.load_start} -> {result.load_end})", flush=True)
                for problem in result.checks:
                    print(f"    consistency: {problem}", flush=True)
        if args.compare_raw:
            wait_for_quiet(args.wait_load, args.wait_load_between)
            raw = _raw(args, session, servers, max(concurrency))
    rec = recommend(runs, max_p99_ms=args.max_p99)
    figures = plots.draw_all(runs, raw, out, f"{profile.name} ({args.prober})")
    report.write_all(out, meta, runs, raw=raw, rec=rec, figures=figures)
    print("\n" + "\n".join(f"- {line}" for line in rec.reasoning))
    ok = all(r.ok for r in runs)
    print(f"\nreport: {out / 'report.md'}" + ("" if ok else "\nFAILED: a run failed or its "
          "counts disagree with alertd's /metrics (see the report)"), flush=True)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"alertd logs kept in {workdir}", flush=True)
    return 0 if ok else 1


def _matrix(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    return workers, concurrency


def _raw(args: argparse.Namespace, session: str, servers: ServerThread,
         largest: int) -> RawResult:
    clip, hook = servers.clip_url(servers.clips.profile.clips[0]), servers.hook_url()
    bodies = [orjson.dumps({"alert_id": f"{session}-raw-{i}", "video_url": clip,
                            "webhook_url": hook, "source": "loadtest",
                            "attributes": {"published_at": time.time(), "run": "raw"}})
              for i in range(args.alerts)]
    with Environment(f"{session}-raw") as env:
        raw = measure_raw(env.amqp_url, bodies, args.raw_prefetch or largest)
    print(f"  raw aiormq consumer: {raw.per_s:.0f} messages/s, "
          f"{raw.cpu_ms_per_message:.3f} CPU ms/message", flush=True)
    return raw


def _meta(args: argparse.Namespace, profile: Profile) -> dict[str, Any]:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "command": shlex.join(["scripts/loadtest", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "cpus": os.cpu_count(), "memory_gib": pages / 2**30,
        "alertd_version": __version__, "commit": describe_source(), "prober": args.prober,
        "profile": profile.as_dict(), "profile_text": profile.describe(),
        "alerts": args.alerts, "duration_cap_s": args.duration_cap,
        "method": (
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
            "with TERM."),
    }


def _exit_on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup (alertd, vhosts, databases)
