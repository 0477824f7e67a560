"""scripts/soak: a steady mixed load for a long time; does anything per child keep growing?

Runs the real stack on loopback (a fresh vhost and database, a clip server, a
webhook sink, ``alertd start``), publishes at a steady rate with a fraction of
failing alerts (404s, not-a-video, webhooks answered 500), and samples per
child every ``--sample-every`` seconds: RSS (child plus its PyAV helpers), open
fds, open sockets (AMQP, PostgreSQL, HTTP), files in the download directory.
Writes samples.csv, soak.png and report.md with a verdict on growth: a
resource "grows" when its least-squares slope over the second half of the run,
extrapolated to one hour, exceeds a tolerance (RSS 5 %/h of its mean, fds and
sockets 5/h, temp files 1/h) and it still sets new highs in the last quarter.
The first half is warm-up (pools filling, allocator arenas); a leak keeps
growing after it.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # loadkit, then alertd and tests

import orjson  # noqa: E402
from loadkit.clips import make_clips  # noqa: E402
from loadkit.profiles import Profile  # noqa: E402
from loadkit.publisher import Publisher  # noqa: E402
from loadkit.servers import LoadClipServer, LoadSink, ServerThread  # noqa: E402
from loadkit.stack import ALERTD, AlertdProcess, Environment  # noqa: E402

from alertd.config import Settings  # noqa: E402
from alertd.statusclient import fetch_status  # noqa: E402
from tests.ports import free_port  # noqa: E402

FIELDS = ["t_s", "child", "pid", "rss_bytes", "fds", "sockets", "temp_files", "processed"]
TOLERANCE_PER_HOUR = {"fds": 5.0, "sockets": 5.0, "temp_files": 1.0}
RSS_TOLERANCE_PER_HOUR = 0.05


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=20.0, help="alerts published per second")
    p.add_argument("--failure-fraction", type=float, default=0.1,
                   help="share of alerts that fail (404 or not a video)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def child_tree_rss(pid: int) -> int:
    """RSS of a child plus its live children (PyAV helpers)."""
    total = _rss(pid)
    for task in _listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                total += sum(_rss(int(c)) for c in fh.read().split())
        except OSError:
            continue
    return total


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def fd_counts(pid: int) -> tuple[int, int]:
    fds = sockets = 0
    for fd in _listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return fds, sockets


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600


def still_climbing(points: list[tuple[float, float]], limit_per_hour: float) -> bool:
    """Grows past warm-up: a positive trend *and* new highs in the last quarter of the run.

    A pool that fills once makes a step, then stays flat; a leak keeps
    setting new highs.
    """
    if len(points) < 4 or slope_per_hour(points) <= limit_per_hour:
        return False
    half = len(points) // 2
    return max(v for _, v in points[half:]) > max(v for _, v in points[:half])


def verdict(rows: list[dict[str, float]]) -> list[str]:
    """One line per (child slot, resource) that grows after warm-up; empty when stable."""
    end = max(r["t_s"] for r in rows)
    growing = []
    for child in sorted({int(r["child"]) for r in rows}):
        # Per slot, and only the latest pid in it: a replaced child starts over.
        mine = [r for r in rows if int(r["child"]) == child]
        last_pid = mine[-1]["pid"]
        late = [r for r in mine if r["pid"] == last_pid and r["t_s"] >= end / 2]
        rss = [(r["t_s"], r["rss_bytes"]) for r in late]
        mean_rss = sum(v for _, v in rss) / max(1, len(rss))
        if still_climbing(rss, RSS_TOLERANCE_PER_HOUR * mean_rss):
            growing.append(f"child {child}: RSS +{slope_per_hour(rss) / 1e6:.1f} MB/h "
                           f"(mean {mean_rss / 1e6:.1f} MB)")
        for key, limit in TOLERANCE_PER_HOUR.items():
            points = [(r["t_s"], r[key]) for r in late]
            if still_climbing(points, limit):
                growing.append(f"child {child}: {key} +{slope_per_hour(points):.1f}/h")
    return growing


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    for ax, (key, label, scale) in zip(axes.flat, [
        ("rss_bytes", "RSS incl. helpers (MB)", 1e6), ("fds", "open fds", 1),
        ("sockets", "open sockets", 1), ("temp_files", "files in download dir", 1),
    ], strict=True):
        for child in sorted({int(r["child"]) for r in rows}):
            mine = [r for r in rows if int(r["child"]) == child]
            ax.plot([r["t_s"] / 60 for r in mine], [r[key] / scale for r in mine],
                    label=f"child {child}")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or HERE.parent / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    profile = Profile("soak", "steady mixed load", clips=("tiny", "small"),
                      clip_latency_s=0.02, clip_jitter_s=0.05, sink_failure_rate=0.02)
    clips = make_clips(HERE.parent / ".cache" / "clips", profile.clips)
    downloads = out / "downloads"
    downloads.mkdir(exist_ok=True)
    tag = f"soak{os.getpid()}"
    rows: list[dict[str, float]] = []
    with Environment(tag) as env, ServerThread(LoadClipServer(clips, profile),
                                               LoadSink(profile)) as servers:
        control = str(out / "control.sock")
        proc = AlertdProcess(
            [ALERTD, "start", "--workers", str(args.workers), "--concurrency",
             str(args.concurrency), "--amqp-url", env.amqp_url, "--dsn", env.dsn,
             "--allow-network", "127.0.0.1/32", "--control-socket", control,
             "--metrics-port", str(free_port()), "--download-dir", str(downloads),
             "--max-attempts", "2", "--retry-delay", "1"],
            env={**os.environ, "ALERTD_WEBHOOK_SECRET": "whsec_" + "c29ha3NvYWtzb2Frc29haw=="},
            log_path=out / "alertd.log", control_socket=control).start()
        try:
            proc.wait_consuming(args.workers, 60)
            publisher = Publisher(Settings(amqp_url=env.amqp_url))
            started = time.monotonic()
            next_sample, sent = started, 0
            deadline = started + args.minutes * 60
            hook = servers.hook_url()
            while time.monotonic() < deadline:
                now = time.monotonic()
                while sent < (now - started) * args.rate:
                    failing = (sent * 7919 % 1000) / 1000 < args.failure_fraction
                    url = (servers.clips.url("/status/404") if failing and sent % 2
                           else servers.clips.url("/bytes/2000") if failing
                           else servers.clip_url(profile.clips[sent % len(profile.clips)]))
                    publisher.publish(orjson.dumps({"alert_id": f"soak-{sent}",
                                                    "video_url": url, "webhook_url": hook}))
                    sent += 1
                if now >= next_sample:
                    rows += sample(control, downloads, now - started)
                    next_sample += args.sample_every
                    print(f"\r{(now - started) / 60:5.1f} min, {sent} published",
                          end="", file=sys.stderr, flush=True)
                publisher.idle()
                time.sleep(0.01)
            publisher.close()
        finally:
            proc.stop()
    print(file=sys.stderr)
    write_outputs(out, rows, args, sent, proc.exit_code)
    return 0 if not verdict(rows) and proc.exit_code == 0 else 1


def sample(control: str, downloads: Path, t_s: float) -> list[dict[str, float]]:
    status = fetch_status(control)
    temp_files = sum(1 for p in downloads.rglob("*") if p.is_file())
    rows = []
    for child in status["children"]:
        fds, sockets = fd_counts(child["pid"])
        rows.append({"t_s": round(t_s, 1), "child": child["index"], "pid": child["pid"],
                     "rss_bytes": child_tree_rss(child["pid"]), "fds": fds,
                     "sockets": sockets, "temp_files": temp_files,
                     "processed": child["processed"]})
    return rows


def write_outputs(out: Path, rows: list[dict[str, float]], args: argparse.Namespace,
                  sent: int, exit_code: int | None) -> None:
    with open(out / "samples.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    title = (f"alertd soak: {args.minutes:g} min, {args.rate:g} alerts/s, "
             f"{args.workers} x {args.concurrency}")
    plot(rows, out / "soak.png", title)
    growing = verdict(rows)
    lines = [f"# {title}", "",
             f"Command: `scripts/soak --minutes {args.minutes:g} --rate {args.rate:g} "
             f"--workers {args.workers} --concurrency {args.concurrency}`", "",
             f"Published {sent} alerts ({args.failure_fraction:.0%} failing on purpose); "
             f"alertd exited {exit_code}.", "",
             "Verdict: " + ("**stable** — no resource grows after warm-up."
                            if not growing else "**growing**: " + "; ".join(growing)), "",
             "| child | RSS MB first/last | fds first/last | sockets first/last |",
             "|---|---|---|---|"]
    for child in sorted({int(r["child"]) for r in rows}):
        mine = [r for r in rows if int(r["child"]) == child]
        first, last = mine[0], mine[-1]
        lines.append(f"| {child} | {first['rss_bytes'] / 1e6:.1f} / {last['rss_bytes'] / 1e6:.1f}"
                     f" | {first['fds']:.0f} / {last['fds']:.0f} | "
                     f"{first['sockets']:.0f} / {last['sockets']:.0f} |")
    lines += ["", "![soak](soak.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
