"""The command line: a (workers x concurrency) matrix of measured runs, then the results folder.

With ``--noop-adapters`` the runs are no-op ones, and with ``--compare-raw`` the raw
consumer's; ``--repeat`` measures both several times, interleaved (``matrix.schedule``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from loadkit import plots, report, spy
from loadkit.clips import SIZES, make_clips
from loadkit.compare import fill_cpu_x_raw, framework_overhead, noop_medians, prober_comparisons
from loadkit.matrix import PROBERS, SMOKE_NOOP, RawPlan, probers_of, schedule
from loadkit.meta import run_meta
from loadkit.noop import execute_noop
from loadkit.profiles import PROFILES, Profile, with_overrides
from loadkit.publisher import alert_bodies
from loadkit.raw import RawResult, measure_raw
from loadkit.recommend import label, recommend
from loadkit.results import RunResult
from loadkit.run import RunPlan, execute
from loadkit.servers import LoadClipServer, LoadSink, ServerThread
from loadkit.spyrecord import RATE_HZ, SpyPlan, py_spy_binary
from loadkit.stack import Environment

SMOKE = {"profile": "overhead", "workers": "1,2", "concurrency": "4", "alerts": 30,
         "warmup": 6, "duration_cap": 20.0, "wait_load": 0.0}
DEFAULTS = {"profile": "io-bound", "workers": "1,2", "concurrency": "4,16,64", "alerts": 1000,
            "warmup": 0, "duration_cap": 60.0, "wait_load": 0.7}
NOOP_DEFAULTS = {"profile": "overhead", "alerts": 10_000}
LOAD_POLL_S = 30.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/loadtest", description=(
        "Run alertd for real on loopback for each (workers, concurrency) pair and write "
        "results.csv, results.json, report.md and PNG figures."))
    p.add_argument("--profile", choices=sorted(PROFILES), help="load shape (default io-bound)")
    p.add_argument("--workers", help="comma-separated child counts (default 1,2)")
    p.add_argument("--concurrency", help="comma-separated slots per child (default 4,16,64)")
    p.add_argument("--prober", help=f"comma-separated probers ({', '.join(PROBERS)}); each is "
                   "run on every (workers, concurrency) pair, back to back (default pyav)")
    p.add_argument("--noop-adapters", action="store_true", help=(
        "framework overhead: alertd with adapters that do nothing (no download, probe, "
        "database or webhook) on a prefilled queue, like the raw consumer; overhead "
        "profile only; --alerts is the message count (default 10000)"))
    p.add_argument("--py-spy", type=float, metavar="SECONDS", help=(
        "record alertd's master, children and one PyAV helper with py-spy for this long "
        "from the start of each measured window; writes profile.md and pyspy/"))
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
                   f"one no-op run ({SMOKE_NOOP[0]} x {SMOKE_NOOP[1]}, {SMOKE_NOOP[2]} "
                   "messages), raw comparison, no load wait")
    p.add_argument("--compare-raw", action="store_true",
                   help="also time a bare aiormq consumer on the same number of messages")
    p.add_argument("--raw-prefetch", type=int, help="default: each concurrency of the no-op "
                   "runs (one raw run each, per repeat), else the largest --concurrency")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help=(
        "measure each no-op configuration N times, and with --compare-raw the raw consumer "
        "as often, interleaved (alertd, raw, alertd, raw, ... for one prefetch) so that "
        "drift hits both alike; summary and report.md give medians, min-max ranges and the "
        "per-pair overhead range, results.csv and results.json every run (field repeat); "
        "--noop-adapters only (default 1)"))
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
    if args.noop_adapters:
        if args.smoke:
            p.error("--smoke already includes a no-op run")
        if args.prober:
            p.error("--prober has no meaning with --noop-adapters (nothing is probed)")
        if args.profile not in (None, "overhead"):
            p.error("--noop-adapters measures the framework: use it with --profile overhead")
        for key, value in NOOP_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.probers = probers_of(args.prober or "pyav")
    except ValueError as exc:
        p.error(str(exc))
    if args.py_spy is not None and args.py_spy <= 0:
        p.error("--py-spy takes a number of seconds > 0")
    if args.repeat < 1:
        p.error("--repeat takes a number of runs >= 1")
    if args.repeat > 1 and not args.noop_adapters:
        p.error("--repeat repeats the no-op and raw runs: use it with --noop-adapters")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _exit_on_term)
    sys.setswitchinterval(0.001)  # the sink's receive times should not wait on the publisher
    profile = build_profile(args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(tempfile.gettempdir()) / "alertd-loadtest" / f"{args.profile}-{stamp}"
    if args.py_spy:
        py_spy_binary()  # missing: say so now, not after the first run
    out.mkdir(parents=True, exist_ok=True)
    session = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="alertd-lt-"))
    make_clips(args.clips_dir, profile.clips)  # before the first run, so errors come early
    meta = run_meta(args, profile)  # the commit as it is when the runs start
    todo = schedule(args)
    runs = [step for step in todo if isinstance(step, RunPlan)]
    repeats = "" if args.repeat == 1 else f" ({args.repeat} of each configuration" + (
        f", interleaved with {len(todo) - len(runs)} raw runs)" if args.compare_raw else ")")
    print(f"alertd load test, profile {profile.name}: {profile.describe()}\n"
          f"{len(runs)} runs{repeats}: workers {args.workers} x concurrency "
          f"{args.concurrency}, {args.alerts} {'messages' if args.noop_adapters else 'alerts'} "
          f"per run, prober {meta['prober']}; results in {out}", flush=True)
    try:
        return _run_all(args, profile, todo, out=out, session=session, workdir=workdir,
                        meta=meta)
    finally:
        if workdir.exists() and not any(workdir.iterdir()):
            workdir.rmdir()  # interrupted before any log was written


def _run_all(args: argparse.Namespace, profile: Profile, todo: list[RunPlan | RawPlan], *,
             out: Path, session: str, workdir: Path, meta: dict[str, Any]) -> int:
    clips = make_clips(args.clips_dir, profile.clips)
    spying = SpyPlan(args.py_spy, out / "pyspy") if args.py_spy else None
    runs: list[RunResult] = []
    raws: list[RawResult] = []
    with ServerThread(LoadClipServer(clips, profile), LoadSink(profile)) as servers:
        noop = [p for p in todo if isinstance(p, RunPlan) and p.adapters == "noop"]
        bodies = alert_bodies(f"{session}-m", max([p.alerts for p in noop] or [args.alerts]),
                              video_url=servers.clip_url(profile.clips[0]),
                              webhook_url=servers.hook_url())
        for plan in todo:
            waited = wait_for_quiet(args.wait_load, args.wait_load_between if runs or raws
                                    else args.wait_load_max)
            if isinstance(plan, RawPlan):
                # The no-op runs' own bodies (matrix.raw_prefetches: at which prefetch).
                raws.append(_raw(session, bodies, plan, repeats=args.repeat))
                continue
            load_start = loadavg()
            if plan.adapters == "noop":
                result = execute_noop(plan, profile.name, workdir, session,
                                      bodies=bodies[:plan.alerts], spy=spying)
            else:
                result = execute(plan, profile.name, servers, workdir, session, spy=spying)
            result.load_start, result.load_end = load_start, loadavg()
            result.waited_for_load_s = round(waited, 1)
            runs.append(result)
            _print_run(plan, result, repeats=args.repeat)
    return _finish(args, profile, runs, raws, out=out, workdir=workdir, meta=meta)


def _print_run(plan: RunPlan, result: RunResult, *, repeats: int) -> None:
    if plan.adapters == "noop":
        figures = (f"{result.alerts_per_s:.0f} messages/s, {result.cpu_ms_per_alert:.3f} CPU "
                   f"ms/message (master {result.master_ms_per_alert:.3f}), paused "
                   f"{result.paused_s:.1f}s")
    else:
        figures = (f"{result.alerts_per_s:.1f} alerts/s, p99 {result.latency_p99_ms:.0f} ms, "
                   f"{result.cpu_ms_per_alert:.2f} CPU ms/alert")
    print(f"  {plan.label}{_nth(plan.repeat, repeats)}: {figures}, {result.status}, "
          f"consistent={result.consistent} "
          f"(load {result.load_start} -> {result.load_end})", flush=True)
    for problem in result.checks:
        print(f"    consistency: {problem}", flush=True)
    for note in result.notes:
        print(f"    note: {note}", flush=True)


def _finish(args: argparse.Namespace, profile: Profile, runs: list[RunResult],
            raws: list[RawResult], *, out: Path, workdir: Path, meta: dict[str, Any]) -> int:
    fill_cpu_x_raw(runs, raws)
    overheads = framework_overhead(runs, raws)
    comparisons = prober_comparisons(runs, args.probers)
    rec = recommend(runs, max_p99_ms=args.max_p99)
    figures = plots.draw_all(runs, raws, out, f"{profile.name} ({meta['prober']})")
    report.write_all(out, meta, runs, raws=raws, rec=rec, figures=figures,
                     probers=comparisons, overheads=overheads)
    spied = [(label(r, prober=True) + _nth(r.repeat, args.repeat),
              [(role, out / path) for role, path in r.py_spy_files.items()])
             for r in runs if r.py_spy_files]
    if spied:
        spy.write_profile(out / "profile.md", spied, rate_hz=RATE_HZ, note=(
            f"py-spy record --rate {RATE_HZ} --nonblocking for {args.py_spy:g} s from the "
            "start of each measured window; idle threads are not sampled, so the shares are "
            "of the samples where the process was running Python. Stages: see "
            "scripts/loadkit/spy.py."))
    print("\n" + "\n".join(f"- {line}" for line in [
        *(c.line() for c in comparisons),
        *([o.line() for o in overheads] or noop_medians(runs)), *rec.reasoning]))
    ok = all(r.ok for r in runs)
    print(f"\nreport: {out / 'report.md'}" + ("" if ok else "\nFAILED: a run failed or its "
          "counts disagree with alertd's /metrics (see the report)"), flush=True)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"alertd logs kept in {workdir}", flush=True)
    return 0 if ok else 1


def _raw(session: str, bodies: list[bytes], plan: RawPlan, *, repeats: int) -> RawResult:
    tag = f"{session}-raw-{plan.prefetch}" + (f"-r{plan.repeat}" if plan.repeat > 1 else "")
    with Environment(tag, with_database=False) as env:
        raw = replace(measure_raw(env.amqp_url, bodies, plan.prefetch), repeat=plan.repeat)
    print(f"  raw aiormq consumer, prefetch {plan.prefetch}{_nth(plan.repeat, repeats)}: "
          f"{raw.per_s:.0f} messages/s, {raw.cpu_ms_per_message:.3f} CPU ms/message",
          flush=True)
    return raw


def _nth(repeat: int, repeats: int) -> str:
    """", repeat 2/5" with --repeat, else nothing (the output is as it was before --repeat)."""
    return f", repeat {repeat}/{repeats}" if repeats > 1 else ""


def _exit_on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup (alertd, vhosts, databases)
