"""One ``--noop-adapters`` run: alertd's framework cost per message, measured like the raw consumer.

The raw consumer (:mod:`loadkit.raw`) takes a prefilled queue, so this does
too. alertd (:mod:`loadkit.noopalertd`: real master, children, consumer,
handler, use case, stats and /metrics; adapters that do nothing) starts on a
fresh vhost and is stopped, whole process group, with SIGSTOP once its
children consume. The queue is filled while it is stopped; the tree's CPU is
read, SIGCONT lets it go, and the CPU is read again once the broker has no
message ready and /metrics counts every one as done (/metrics is scraped only
then, so scraping adds nearly nothing to the master's CPU). CPU per message =
that difference / messages, master and children together.

The pause must not look like a failure to anyone: the AMQP heartbeat is
raised to NOOP_AMQP_HEARTBEAT_S for these runs (the broker would close a
connection silent for two heartbeats), and the master's hang watchdog
(``--heartbeat-timeout``) to NOOP_HANG_TIMEOUT_S, since after SIGCONT it sees
heartbeats as old as the pause.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pika
from yarl import URL

from alertd.adapters.amqp import topology
from alertd.config import Settings
from loadkit import results
from loadkit.metrics import Scrape, processed, scrape
from loadkit.proctree import cpu_sample, descendants, scan
from loadkit.publisher import prefill
from loadkit.run import BOOT_CAP_S, RunPlan
from loadkit.spyrecord import SpyPlan
from loadkit.stack import AlertdProcess, Environment
from tests.ports import free_port

NOOP_AMQP_HEARTBEAT_S = 120
NOOP_HANG_TIMEOUT_S = 600.0
IDLE_SAMPLE_S = 1.0  # the tree's idle CPU is read over this long before the pause
STOP_CONFIRM_S = 5.0
DRAIN_CAP_S = 120.0
POLL_S = 0.05
METRICS_LAG_CAP_S = 10.0  # children report every 0.5 s; /metrics follows within a tick
SCRIPTS = Path(__file__).resolve().parents[1]


def execute_noop(plan: RunPlan, profile_name: str, workdir: Path, session: str, *,
                 bodies: list[bytes], spy: SpyPlan | None = None) -> results.RunResult:
    """Run ``plan`` with no-op adapters over ``bodies``; failures come back in ``status``."""
    result = results.RunResult(profile=profile_name, prober="noop", adapters="noop",
                               workers=plan.workers, concurrency=plan.concurrency,
                               slots=plan.slots, window=len(bodies),
                               alerts_requested=len(bodies), repeat=plan.repeat)
    # Repeats get their own vhost and log; the first keeps the name it had before --repeat.
    tag = (f"{session}-noop-{plan.workers}x{plan.concurrency}"
           + (f"-r{plan.repeat}" if plan.repeat > 1 else ""))
    left = 0
    with Environment(tag, with_database=False) as env:
        url = str(URL(env.amqp_url).update_query(heartbeat=NOOP_AMQP_HEARTBEAT_S))
        port, control = free_port(), str(workdir / f"{tag}.sock")
        argv = [sys.executable, "-m", "loadkit.noopalertd", "start",
                "--workers", str(plan.workers), "--concurrency", str(plan.concurrency),
                "--amqp-url", url, "--control-socket", control, "--metrics-port", str(port),
                "--log-level", "warning", "--graceful-timeout", "15",
                "--heartbeat-timeout", str(NOOP_HANG_TIMEOUT_S), *plan.alertd_args]
        path = os.pathsep.join([str(SCRIPTS), str(SCRIPTS.parent),
                                os.environ.get("PYTHONPATH", "")])
        alertd = AlertdProcess(argv, env={**os.environ, "PYTHONPATH": path},
                               log_path=workdir / f"alertd-{tag}.log", control_socket=control)
        try:
            alertd.start().wait_consuming(plan.workers, BOOT_CAP_S)
            _measure(result, alertd=alertd, url=url, port=port, bodies=bodies, spy=spy,
                     tag=tag)
        except Exception as exc:  # reported, the matrix goes on
            result.status = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        finally:
            with contextlib.suppress(ProcessLookupError):
                if alertd.proc is not None:
                    os.killpg(alertd.pid, signal.SIGCONT)  # never leave it stopped
            alertd.stop()
            result.exit_code = alertd.exit_code
            result.stragglers_killed = len(alertd.killed)
        counts = env.ready_messages([name for name, _ in topology(Settings(amqp_url=url))])
        result.dead_lettered = counts.get("alerts.dlq", 0)
        left = counts.get("alerts", 0)
    if result.dead_lettered or (left and result.status == "ok"):
        result.checks.append(f"after the stop: {result.dead_lettered} dead-lettered, "
                             f"{left} left in the queue")
        result.consistent = False
    if result.exit_code != 0 and result.status == "ok":
        result.status = f"failed: alertd exited {result.exit_code} on TERM"
    if result.status.startswith("failed") or not result.consistent:
        print(f"  alertd log ({alertd.log_path}):\n{alertd.log_tail()}", flush=True)
    return result


def _measure(result: results.RunResult, *, alertd: AlertdProcess, url: str, port: int,
             bodies: list[bytes], spy: SpyPlan | None, tag: str) -> None:
    n = len(bodies)
    before = scrape(port)
    idle0 = cpu_sample(alertd.pid)
    time.sleep(IDLE_SAMPLE_S)
    idle = cpu_sample(alertd.pid).minus(idle0)
    result.idle_cores_alertd = idle.alertd / idle.at
    assert alertd.watch is not None
    alertd.watch.reset_peaks()

    stopped_at = time.monotonic()
    pause_tree(alertd.pid)
    prefill(url, bodies)
    cpu0 = cpu_sample(alertd.pid)
    started = time.monotonic()
    result.paused_s = started - stopped_at
    os.killpg(alertd.pid, signal.SIGCONT)
    recording = spy.start(alertd.pid, tag) if spy else None
    try:
        with QueueDepth(url, Settings(amqp_url=url).queue) as depth:
            emptied = depth.wait_empty(started + DRAIN_CAP_S)
        after = _wait_counted(port, before, n, time.monotonic() + METRICS_LAG_CAP_S)
        cpu = cpu_sample(alertd.pid).minus(cpu0)
    finally:
        if recording is not None:  # before alertd stops: py-spy would lose its process
            result.py_spy_files = recording.wait()
            result.notes += recording.problems
    delta = after.minus(before)
    done = sum(processed(delta).values())
    result.alerts_measured, result.alerts_delivered = n, done
    # Until no message was ready: at most the slots' worth were still being handled.
    result.window_s = emptied - started
    result.alerts_per_s = n / result.window_s if result.window_s > 0 else float("nan")
    results.fill_from_metrics(result, delta)
    results.fill_resources(result, cpu, alertd.watch.peaks)
    results.check_noop_consistency(result, delta, left_in_queue=0 if done >= n else n - done)


def pause_tree(root: int) -> None:
    """SIGSTOP ``root``'s process group (master first: no reaction to its children stopping)."""
    os.killpg(root, signal.SIGSTOP)
    deadline = time.monotonic() + STOP_CONFIRM_S
    while time.monotonic() < deadline:
        procs = scan()
        running = [p for p in descendants(procs, root) if _state(p) not in ("T", "t")]
        if not running:
            return
        for pid in running:  # a process in the tree but not in the group (setsid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        time.sleep(0.01)
    raise RuntimeError(f"alertd's tree did not stop within {STOP_CONFIRM_S:.0f}s")


def _state(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return raw[raw.rindex(")") + 2]


class QueueDepth:
    """Ready messages of one queue, by passive declare on one connection kept open."""

    def __init__(self, url: str, queue: str) -> None:
        self._queue = queue
        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        self._channel = self._connection.channel()

    def __enter__(self) -> QueueDepth:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._connection.close()

    def ready(self) -> int:
        count: int = self._channel.queue_declare(self._queue, passive=True).method.message_count
        return count

    def wait_empty(self, deadline: float) -> float:
        """``time.monotonic()`` when no message was ready any more; raises at ``deadline``."""
        while self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.ready()} messages still ready after the drain cap")
            time.sleep(POLL_S)
        return time.monotonic()


def _wait_counted(port: int, before: Scrape, count: int, deadline: float) -> Scrape:
    """Scrape /metrics until it counts ``count`` more processed alerts (or ``deadline``)."""
    while True:
        now = scrape(port)
        if sum(processed(now.minus(before)).values()) >= count or time.monotonic() > deadline:
            return now
        time.sleep(POLL_S)
