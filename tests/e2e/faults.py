"""The fault suite's common run: load with work in flight, a fault, then the invariants.

Every fault test ends with the same checks (issue "nothing is lost"): every
alert has exactly one row; exactly one distinct webhook-id was delivered per
alert (a repeated delivery of that id is at-least-once, a second id is a
duplicate event); after alertd stops, nothing is left in the main queue or
its delay queues; no download file is left behind; no child's fd count grew;
and the master was healthy (status answering, every child consuming) before
the stop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tests.e2e.harness import (
    Alertd,
    Servers,
    alert,
    publish,
    queue_counts,
    queue_settled,
    rows,
    wait_until,
)
from tests.servers import Reply

Inject = Callable[["Run"], None]


@dataclass
class Run:
    proc: Alertd
    srv: Servers
    amqp_url: str
    dsn: str
    ids: list[str]
    download_dir: Path
    webhook_srv: Servers
    fd_baseline: int = 0
    fds_at_end: dict[int, int] = field(default_factory=dict)


def child_fds(proc: Alertd) -> dict[int, int]:
    counts = {}
    for child in proc.children():
        try:
            counts[child["pid"]] = len(os.listdir(f"/proc/{child['pid']}/fd"))
        except FileNotFoundError:
            continue
    return counts


def run_with_fault(
    tmp_path: Path, amqp_url: str, dsn: str, clips: dict[str, Path], inject: Inject, *,
    alerts: int = 200, workers: int = 2, concurrency: int = 8, args: Sequence[str] = (),
    clip: Callable[[Servers, int], str] = lambda srv, i: srv.clips.url("/slow/mp4?delay=0.05"),
    hook: Callable[[Servers, int], str] = lambda srv, i: srv.hook_url(),
    sink_script: Sequence[int | Reply] = (200,), amqp_for_alertd: str | None = None,
    dsn_for_alertd: str | None = None, settle_s: float = 180,
    webhook_srv: Servers | None = None,
) -> Run:
    """Publish ``alerts``, call ``inject`` once work is under way, check the invariants.

    ``webhook_srv``: where the webhooks arrive when ``hook`` points elsewhere
    than this run's own sink (e.g. through a fault proxy).
    """
    download_dir = tmp_path / "downloads"
    download_dir.mkdir(exist_ok=True)
    with Servers(clips, sink_script=sink_script) as srv, Alertd(
        tmp_path, amqp_for_alertd or amqp_url, dsn_for_alertd or dsn,
        "--download-dir", str(download_dir), "--graceful-timeout", "20", *args,
        workers=workers, concurrency=concurrency,
    ) as proc:
        proc.wait_consuming(timeout=60)
        ids = [f"{tmp_path.name[-12:]}-{i}" for i in range(alerts)]
        run = Run(proc, srv, amqp_url, dsn, ids, download_dir, webhook_srv or srv)
        publish(amqp_url, [orjson.dumps(alert(a, clip(srv, i), hook(srv, i)))
                           for i, a in enumerate(ids)])
        wait_until(lambda: len(rows(dsn)) >= min(10, alerts // 10), 60, "work under way")
        baseline = max(child_fds(proc).values(), default=0)
        inject(run)
        wait_until(lambda: set(rows(dsn)) >= set(ids), settle_s, "every alert stored")
        wait_until(lambda: set(_ids_by_alert(run.webhook_srv)) >= set(ids), settle_s,
                   "a webhook for every alert")
        # A fault that closed connections sends the unacked deliveries back
        # (acks lost with them); they are acked as duplicates once the children
        # consume again. A status report is up to a heartbeat old, so "every
        # child consuming" alone may be from before the fault: wait until the
        # queue is drained and every slot idle, seen twice a second apart.
        wait_until(stays_true(lambda: drained(run), 1.0), settle_s,
                   "the queue drained and every child consuming, idle")
        run.fd_baseline, run.fds_at_end = baseline, child_fds(proc)
        proc.stop()
        assert proc.proc is not None and proc.proc.returncode == 0, proc.log()[-3000:]
    check_invariants(run)
    return run


def drained(run: Run) -> bool:
    """No message ready in the main or delay queues, every child consuming with no slot busy."""
    children = run.proc.children()
    return (len(children) >= run.proc.workers
            and all(c["state"] == "consuming" and not c["slots"] for c in children)
            and queue_settled(run.amqp_url))


def stays_true(check: Callable[[], bool], for_s: float) -> Callable[[], bool]:
    """A predicate for wait_until: ``check`` held on two calls at least ``for_s`` apart."""
    since: list[float] = []

    def held() -> bool:
        if not check():
            since.clear()
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= for_s
    return held


def _ids_by_alert(srv: Servers) -> dict[str, set[str]]:
    by_alert: dict[str, set[str]] = {}
    for request in srv.webhooks():
        alert_id = orjson.loads(request.body)["alert_id"]
        by_alert.setdefault(alert_id, set()).add(request.headers["webhook-id"])
    return by_alert


def check_invariants(run: Run) -> None:
    stored = rows(run.dsn)
    assert set(stored) == set(run.ids), "rows for alerts never published?"
    ids = _ids_by_alert(run.webhook_srv)
    doubles = {a: sorted(w) for a, w in ids.items() if len(w) != 1}
    assert not doubles, f"alerts with more than one webhook-id: {doubles}"
    counts = queue_counts(run.amqp_url)
    left = {q: n for q, n in counts.items() if n and not q.endswith(".dlq")}
    assert not left, f"messages left behind: {left}"
    leftovers = [str(p) for p in run.download_dir.rglob("*") if p.is_file()]
    assert not leftovers, f"download files left: {leftovers}"
    grown = {pid: n for pid, n in run.fds_at_end.items() if n > run.fd_baseline + 16}
    assert not grown, f"fd counts grew from about {run.fd_baseline}: {grown}"
