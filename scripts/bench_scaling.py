"""scripts/bench-scaling's body: alertd's throughput from 1 to N children, loopback only.

For each worker count: a fresh vhost and database, ``alertd start`` with that
many children, wait until every child consumes, publish ``--alerts`` alerts of
one tiny clip (served at once from a local server, webhooks answered 200 by a
local sink), and time first publish -> last row stored (the newest
``processed_at``; the database is polled for the count). CPU is read from
/proc for the master and every descendant (reaped ffprobe runs included via
the children's cutime/cstime), and alertd's own ``alertd_cpu_seconds_total``
is shown next to it, with the whole host's busy share (broker, database and
the local servers share the cores) to tell when the box, not alertd, is the
limit. Prints a table and writes results.csv and results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiormq  # noqa: E402
import orjson  # noqa: E402
import psycopg  # noqa: E402
from pamqp import commands as spec  # noqa: E402

from alertd.adapters.amqp import declare_topology  # noqa: E402
from alertd.adapters.postgres import migrate  # noqa: E402
from alertd.config import Settings  # noqa: E402
from alertd.errors import AlertdError  # noqa: E402
from alertd.samples import make_sample_clips  # noqa: E402
from alertd.statusclient import fetch_status  # noqa: E402
from tests.conftest import (  # noqa: E402
    create_database,
    create_vhost,
    delete_vhost,
    drop_database,
)
from tests.e2e.harness import TEST_SECRET, Servers, metric_values  # noqa: E402
from tests.ports import free_port  # noqa: E402

ALERTD = str(Path(sys.executable).with_name("alertd"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PUBLISH_WINDOW = 500  # unconfirmed publishes in flight at once


@dataclass
class Run:
    workers: int
    concurrency: int
    alerts: int
    stored: int
    publish_s: float
    elapsed_s: float
    alerts_per_s: float
    cpu_s: float
    cpu_ms_per_alert: float
    cores_busy: float
    host_busy_pct: float
    broker_cpu_s: float
    db_cpu_s: float
    bench_cpu_s: float
    alertd_cpu_metric_s: float
    outcome: str


def proc_stats() -> dict[int, tuple[str, list[str]]]:
    """Command name and the fields after it of every /proc/<pid>/stat."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                head, _, tail = (entry / "stat").read_text().rpartition(")")
            except OSError:
                continue  # gone meanwhile
            stats[int(entry.name)] = (head.partition("(")[2], tail.split())
    return stats


def ticks(fields: list[str]) -> int:
    # utime, stime, cutime, cstime: fields 14-17 of /proc/<pid>/stat.
    return sum(int(f) for f in fields[11:15])


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants, plus what they reaped."""
    stats = {pid: fields for pid, (_, fields) in proc_stats().items()}
    parents = {pid: int(fields[1]) for pid, fields in stats.items()}

    def in_tree(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    return sum(ticks(fields) for pid, fields in stats.items() if in_tree(pid)) / CLOCK_TICKS


def service_cpu() -> dict[str, float]:
    """CPU seconds of the broker, the database (exited backends via the postmaster's
    cutime) and this process (clip server, sink, publisher): host-wide, so other
    users of the same RabbitMQ and PostgreSQL count too."""
    totals = {"broker": 0.0, "db": 0.0}
    for command, fields in proc_stats().values():
        key = "broker" if command == "beam.smp" else "db" if command == "postgres" else None
        if key:
            totals[key] += ticks(fields) / CLOCK_TICKS
    usage = resource.getrusage(resource.RUSAGE_SELF)
    totals["bench"] = usage.ru_utime + usage.ru_stime
    return totals


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


async def publish_all(amqp_url: str, bodies: list[bytes]) -> None:
    """Publish persistently with confirms, PUBLISH_WINDOW unconfirmed at a time."""
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, Settings(amqp_url=amqp_url))
        props = spec.Basic.Properties(delivery_mode=2, content_type="application/json")
        for start in range(0, len(bodies), PUBLISH_WINDOW):
            confirms = await asyncio.gather(*(
                channel.basic_publish(body, routing_key="alerts", properties=props)
                for body in bodies[start:start + PUBLISH_WINDOW]))
            if not all(isinstance(c, spec.Basic.Ack) for c in confirms):
                raise RuntimeError("the broker refused a publish")
    finally:
        await connection.close()


def stored(dsn: str) -> tuple[int, int, dt.datetime | None]:
    """Rows stored, rows stored as done, and the newest processed_at."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), count(*) FILTER (WHERE status = 'done'),"
                           " max(processed_at) FROM alerts").fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), row[2]


def wait_consuming(control: str, workers: int, proc: subprocess.Popen[bytes],
                   timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"alertd exited with {proc.returncode} before consuming")
        try:
            kids = fetch_status(control, timeout=2)["children"]
        except AlertdError:
            kids = []
        if sum(1 for c in kids if c["state"] == "consuming") >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError("children did not all consume in time")


def bench_one(workers: int, args: argparse.Namespace, srv: Servers, workdir: Path) -> Run:
    name = uuid.uuid4().hex[:8]
    amqp_url = create_vhost(f"alertd-bench-{name}")
    dsn = create_database(f"alertd_bench_{name}")
    proc: subprocess.Popen[bytes] | None = None
    log_path = workdir / f"alertd-{workers}w.log"
    try:
        migrate(dsn)
        port, control = free_port(), str(workdir / f"control-{name}.sock")
        argv = [ALERTD, "start", "--workers", str(workers), "--concurrency",
                str(args.concurrency), "--amqp-url", amqp_url, "--dsn", dsn,
                "--control-socket", control, "--metrics-port", str(port),
                "--allow-network", "127.0.0.1/32", "--log-level", "warning",
                *shlex.split(args.alertd_args)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env={**os.environ, "ALERTD_WEBHOOK_SECRET": TEST_SECRET})
        wait_consuming(control, workers, proc, 60)
        clip, hook = srv.clip_url(args.clip), srv.hook_url()
        bodies = [orjson.dumps({"alert_id": f"bench-{i}", "video_url": clip,
                                "webhook_url": hook}) for i in range(args.alerts)]
        cpu0, metric0 = tree_cpu(proc.pid), metric_values(port)["alertd_cpu_seconds_total"]
        host0, services0 = host_cpu(), service_cpu()

        start_wall, start = time.time(), time.monotonic()
        asyncio.run(publish_all(amqp_url, bodies))
        publish_s = time.monotonic() - start
        count, done, last = 0, 0, None
        deadline = start + args.run_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            count, done, last = stored(dsn)
            if count >= args.alerts:
                break
            time.sleep(0.1)
        cpu = tree_cpu(proc.pid) - cpu0
        host1, services = host_cpu(), service_cpu()
        services = {k: v - services0[k] for k, v in services.items()}
        host_busy = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
        time.sleep(1.2)  # children report CPU in their heartbeats (every 0.5 s)
        metric = metric_values(port)["alertd_cpu_seconds_total"] - metric0
        complete = count >= args.alerts and last is not None
        # A fast failure (e.g. a forbidden address) is no throughput figure.
        outcome = "ok" if complete and done == count else (
            "failed rows" if complete else "timeout")
        elapsed = (last.timestamp() - start_wall) if complete and last else (
            time.monotonic() - start)
        return Run(workers=workers, concurrency=args.concurrency, alerts=args.alerts,
                   stored=count, publish_s=round(publish_s, 3), elapsed_s=round(elapsed, 3),
                   alerts_per_s=round(count / elapsed, 1) if elapsed > 0 else 0.0,
                   cpu_s=round(cpu, 2),
                   cpu_ms_per_alert=round(1000 * cpu / max(1, count), 2),
                   cores_busy=round(cpu / elapsed, 2) if elapsed > 0 else 0.0,
                   host_busy_pct=round(100 * host_busy, 1),
                   broker_cpu_s=round(services["broker"], 2),
                   db_cpu_s=round(services["db"], 2), bench_cpu_s=round(services["bench"], 2),
                   alertd_cpu_metric_s=round(metric, 2), outcome=outcome)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        delete_vhost(f"alertd-bench-{name}")
        drop_database(f"alertd_bench_{name}")


def print_table(runs: list[Run]) -> None:
    base = runs[0].alerts_per_s if runs and runs[0].alerts_per_s else None
    print(f"{'workers':>7} {'alerts':>6} {'stored':>6} {'secs':>7} {'alerts/s':>9} "
          f"{'speedup':>7} {'cpu s':>7} {'cpu ms/alert':>12} {'cores':>6} {'host%':>6} "
          f"{'outcome':>8}")
    for r in runs:
        speedup = f"{r.alerts_per_s / base:.2f}x" if base else "-"
        print(f"{r.workers:>7} {r.alerts:>6} {r.stored:>6} {r.elapsed_s:>7.2f} "
              f"{r.alerts_per_s:>9.1f} {speedup:>7} {r.cpu_s:>7.2f} "
              f"{r.cpu_ms_per_alert:>12.2f} {r.cores_busy:>6.2f} {r.host_busy_pct:>6.1f} "
              f"{r.outcome:>8}")
    print(f"\n{'workers':>7} {'alertd cpu s':>12} {'broker':>7} {'postgres':>8} "
          f"{'bench proc':>10}   (CPU seconds over the run, host-wide for the services)")
    for r in runs:
        print(f"{r.workers:>7} {r.cpu_s:>12.2f} {r.broker_cpu_s:>7.2f} {r.db_cpu_s:>8.2f} "
              f"{r.bench_cpu_s:>10.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4",
                        help="comma-separated child counts (default 1,2,4)")
    parser.add_argument("--alerts", type=int, default=2000, help="alerts per run")
    parser.add_argument("--concurrency", type=int, default=16, help="slots per child")
    parser.add_argument("--clip", default="video_only",
                        help="sample clip name from alertd.samples (default video_only)")
    parser.add_argument("--run-timeout", type=float, default=300.0,
                        help="seconds one run may take from first publish")
    parser.add_argument("--alertd-args", default="",
                        help="extra 'alertd start' arguments, e.g. '--prober pyav'")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="default bench-results/scaling-<timestamp>")
    args = parser.parse_args()

    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = args.results_dir or ROOT / "bench-results" / f"scaling-{stamp}"
    results.mkdir(parents=True, exist_ok=True)
    clips = make_sample_clips(Path(tempfile.gettempdir()) / "alertd-bench-clips")
    print(f"{platform.node()}: {os.cpu_count()} CPUs; {args.alerts} alerts of "
          f"{args.clip!r} ({clips[args.clip].stat().st_size} bytes) per run, "
          f"concurrency {args.concurrency}; results in {results}", flush=True)

    runs: list[Run] = []
    with Servers(clips) as srv:
        for workers in counts:
            run = bench_one(workers, args, srv, results)
            runs.append(run)
            print(f"  {workers} workers: {run.alerts_per_s} alerts/s, "
                  f"{run.cpu_ms_per_alert} CPU ms/alert ({run.outcome})", flush=True)
    print()
    print_table(runs)

    with open(results / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(runs[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in runs)
    meta = {"started": stamp, "host": platform.node(), "cpus": os.cpu_count(),
            "clip": args.clip, "clip_bytes": clips[args.clip].stat().st_size,
            "alertd_args": args.alertd_args, "runs": [asdict(r) for r in runs]}
    (results / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0 if all(r.outcome == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
