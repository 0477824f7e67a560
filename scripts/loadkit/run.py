"""One measured run: fresh vhost and database, alertd started, warm-up, measured window, stop.

The window is bounded by quiet points: warm-up alerts are all delivered and
counted by /metrics before the first measured publish, and the measured ones
after their last webhook. So the /metrics deltas hold exactly the measured
alerts and can be checked against what the sink received.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg

from alertd.adapters.amqp import topology
from alertd.config import Settings
from loadkit import results
from loadkit.metrics import Scrape, processed, scrape, webhook_attempts
from loadkit.proctree import cpu_sample
from loadkit.publisher import Progress, Publisher, Tracker, publish_closed_loop
from loadkit.servers import Receipt, ServerThread
from loadkit.spyrecord import SpyPlan
from loadkit.stack import ALERTD, AlertdProcess, Environment
from tests.ports import free_port

WARMUP_CAP_S = 60.0  # warm-up publishing and delivery, each
DRAIN_CAP_S = 30.0  # after the last measured publish, for the last webhooks
SETTLE_CAP_S = 15.0  # for /metrics to count what the sink saw (heartbeats every 0.5 s)
BOOT_CAP_S = 60.0
WEBHOOK_SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


@dataclass(frozen=True)
class RunPlan:
    workers: int
    concurrency: int
    prober: str
    alerts: int
    warmup: int
    window: int  # 0: slots + max(4, slots // 2)
    duration_cap_s: float
    alertd_args: tuple[str, ...] = ()
    adapters: str = "real"  # or "noop": loadkit.noop runs it
    repeat: int = 1  # 1..--repeat (no-op runs only)

    @property
    def slots(self) -> int:
        return self.workers * self.concurrency

    @property
    def outstanding(self) -> int:
        return self.window or self.slots + max(4, self.slots // 2)

    @property
    def label(self) -> str:
        prober = "noop adapters" if self.adapters == "noop" else self.prober
        return f"{self.workers}w x {self.concurrency}c {prober}"


def execute(plan: RunPlan, profile_name: str, servers: ServerThread, workdir: Path,
            session: str, *, spy: SpyPlan | None = None) -> results.RunResult:
    """Run ``plan`` once; never raises for a failure of alertd, returns it in ``status``."""
    result = results.RunResult(profile=profile_name, prober=plan.prober, adapters="real",
                               workers=plan.workers, concurrency=plan.concurrency,
                               slots=plan.slots, window=plan.outstanding,
                               alerts_requested=plan.alerts)
    tag = f"{session}-{plan.workers}x{plan.concurrency}-{plan.prober}"
    servers.forget()
    with Environment(tag) as env:
        port, control = free_port(), str(workdir / f"{tag}.sock")
        argv = [ALERTD, "start", "--workers", str(plan.workers),
                "--concurrency", str(plan.concurrency), "--amqp-url", env.amqp_url,
                "--dsn", env.dsn, "--control-socket", control, "--metrics-port", str(port),
                "--allow-network", "127.0.0.1/32", "--log-level", "warning",
                "--prober", plan.prober, "--graceful-timeout", "15", *plan.alertd_args]
        alertd = AlertdProcess(argv, env={**os.environ, "ALERTD_WEBHOOK_SECRET": WEBHOOK_SECRET},
                               log_path=workdir / f"alertd-{tag}.log", control_socket=control)
        try:
            alertd.start().wait_consuming(plan.workers, BOOT_CAP_S)
            _measure(plan, result, alertd=alertd, env=env, servers=servers, port=port, tag=tag,
                     spy=spy)
        except Exception as exc:  # a broken run is reported, the matrix goes on
            result.status = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        finally:
            servers.sink.on_receipt = None
            alertd.stop()
            result.exit_code = alertd.exit_code
            result.stragglers_killed = len(alertd.killed)
        queues = [name for name, _ in topology(Settings(amqp_url=env.amqp_url))]
        counts = env.ready_messages(queues)
        result.dead_lettered = counts.get("alerts.dlq", 0)
    if result.exit_code != 0 and result.status == "ok":
        result.status = f"failed: alertd exited {result.exit_code} on TERM"
    if result.status.startswith("failed") or not result.consistent:
        print(f"  alertd log ({alertd.log_path}):\n{alertd.log_tail()}", flush=True)
    return result


def _measure(plan: RunPlan, result: results.RunResult, *, alertd: AlertdProcess,
             env: Environment, servers: ServerThread, port: int, tag: str,
             spy: SpyPlan | None) -> None:
    tracker = Tracker()

    def on_receipt(receipt: Receipt) -> None:
        if receipt.answered == 200:
            tracker.add_delivered(receipt.alert_id, receipt.received_at)

    servers.sink.on_receipt = on_receipt
    clips = [servers.clip_url(name) for name in servers.clips.profile.clips]
    hook = servers.hook_url()
    publisher = Publisher(Settings(amqp_url=env.amqp_url))
    recording = None
    try:
        def body_for(alert_id: str, at: float) -> bytes:
            seq = int(alert_id.rsplit("-", 1)[1])
            return orjson.dumps({
                "alert_id": alert_id, "video_url": clips[seq % len(clips)],
                "webhook_url": hook, "source": "loadtest",
                "attributes": {"published_at": at, "run": tag}})

        warm = [f"{tag}-w-{i}" for i in range(plan.warmup)]
        publish_closed_loop(publisher, tracker, ids=warm, body_for=body_for,
                            window=plan.outstanding, deadline=time.monotonic() + WARMUP_CAP_S)
        if not tracker.wait(lambda: len(tracker.delivered) >= len(warm), WARMUP_CAP_S):
            raise RuntimeError(f"warm-up: {len(tracker.delivered)}/{len(warm)} webhooks")
        warm_500s = sum(1 for r in servers.receipts() if r.answered == 500)
        before = _settle(port, len(warm), len(warm), warm_500s)
        assert alertd.watch is not None
        alertd.watch.reset_peaks()
        cpu0 = cpu_sample(alertd.pid, env.database)
        recording = spy.start(alertd.pid, tag) if spy else None

        ids = [f"{tag}-m-{i}" for i in range(plan.alerts)]
        progress = Progress(plan.label, plan.alerts)
        sent = publish_closed_loop(publisher, tracker, ids=ids, body_for=body_for,
                                   window=plan.outstanding, progress=progress,
                                   deadline=time.monotonic() + plan.duration_cap_s)
        total = len(warm) + len(sent)
        deadline = time.monotonic() + DRAIN_CAP_S
        while not tracker.wait(lambda: len(tracker.delivered) >= total, 0.25):
            progress.update(len(sent), len(tracker.delivered) - len(warm))
            publisher.idle()
            if time.monotonic() > deadline:
                break
        cpu = cpu_sample(alertd.pid, env.database).minus(cpu0)
        progress.update(len(sent), len(tracker.delivered) - len(warm), force=True)
        progress.close()
        peaks = alertd.watch.peaks
    finally:
        publisher.close()
        if recording is not None:  # before alertd stops: py-spy would lose its process
            result.py_spy_files = recording.wait()
            result.notes += recording.problems
    if len(sent) < plan.alerts:
        result.status = "capped"
    measured = set(sent)
    receipts = [r for r in servers.receipts() if r.alert_id in measured]
    after = _settle(port, total, len(warm) + sum(r.answered == 200 for r in receipts),
                    warm_500s + sum(r.answered == 500 for r in receipts))
    delta = after.minus(before)
    results.fill_latency(result, {a: tracker.published[a] for a in sent},
                         {a: t for a, t in tracker.delivered.items() if a in measured})
    results.fill_outbox_lag(result, receipts)
    results.fill_from_metrics(result, delta)
    results.fill_resources(result, cpu, peaks)
    results.check_consistency(result, delta, receipts, measured, _rows(env.dsn, f"{tag}-m-"))


def _settle(port: int, processed_total: int, delivered: int, answered_500: int) -> Scrape:
    """Scrape /metrics once its counts reach what the sink saw (or SETTLE_CAP_S passed)."""
    deadline = time.monotonic() + SETTLE_CAP_S
    while True:
        now = scrape(port)
        attempts = webhook_attempts(now)
        if (sum(processed(now).values()) >= processed_total
                and attempts.get("delivered", 0) >= delivered
                and attempts.get("retry", 0) + attempts.get("failed", 0) >= answered_500):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def _rows(dsn: str, prefix: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT status, count(*) FROM alerts WHERE starts_with(alert_id, %s)"
                             " GROUP BY status", (prefix,)).fetchall()
    return {str(status): int(count) for status, count in found}
