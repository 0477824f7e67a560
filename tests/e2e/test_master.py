"""End to end: the pre-fork master under real faults (SIGKILL, SIGSTOP), signals and systemd.

Each test owns a vhost, a database and a tmp dir, talks to loopback only and
is bounded by explicit timeouts. Slow clips (``/slow/mp4?delay=S``) keep
alerts in flight long enough to hit a child while it holds them.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from alertd.statusclient import fetch_status
from tests.e2e.harness import (
    Alertd,
    ConfigFileAlertd,
    Datagram,
    NotifySocket,
    Servers,
    SessionAlertd,
    alert,
    close_broker_connections,
    forked_pids,
    http_get,
    lines_with,
    metric_values,
    outbox,
    publish,
    queue_counts,
    rows,
    run_cli,
    spawned,
    unmigrated_database,
    vhost_of,
    wait_until,
    webhook_ids_by_alert,
)
from tests.ports import free_port
from tests.processes import is_alive

pytestmark = pytest.mark.e2e

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def slow_alerts(srv: Servers, prefix: str, count: int, delay: float
                ) -> tuple[list[str], list[bytes]]:
    """Alerts whose download takes ``delay`` seconds; the id in the URL names the request."""
    ids = [f"{prefix}-{i:02d}" for i in range(count)]
    bodies = [orjson.dumps(alert(i, srv.clips.url(f"/slow/mp4?delay={delay}&id={i}"),
                                 srv.hook_url())) for i in ids]
    return ids, bodies


def in_flight(proc: Alertd) -> dict[int, list[str]]:
    """Alert ids in the slots of each live child, by child pid."""
    return {c["pid"]: [s["alert_id"] for s in c["slots"] if s["alert_id"]]
            for c in proc.children()}


def pid_of(proc: Alertd, index: int) -> int | None:
    pids = [c["pid"] for c in proc.children() if c["index"] == index and not c["retiring"]]
    return pids[0] if pids else None


def stored_once_with_one_webhook_id(srv: Servers, dsn: str, ids: list[str],
                                    webhooks_within: float = 60) -> None:
    """Every alert has its row and one outbox row, and the sink saw one webhook-id for it.

    A child killed while delivering leaves its outbox claim to expire (about a
    minute) before another child retries it, hence the default wait.
    """
    wait_until(lambda: set(rows(dsn)) == set(ids), 60, "every alert stored")
    wait_until(lambda: set(webhook_ids_by_alert(srv)) == set(ids), webhooks_within,
               "every webhook")
    time.sleep(1)  # a second webhook-id for an alert would show up by now
    stored = rows(dsn)
    assert len(stored) == len(ids)
    assert all(r["status"] == "done" for r in stored.values()), stored
    per_alert: dict[str, int] = {}
    for row in outbox(dsn):
        per_alert[row["alert_id"]] = per_alert.get(row["alert_id"], 0) + 1
    assert per_alert == dict.fromkeys(ids, 1)
    distinct = webhook_ids_by_alert(srv)
    assert {a: len(w) for a, w in distinct.items()} == dict.fromkeys(ids, 1), distinct


def log_time(line: str) -> float:
    found = LOG_TIME.match(line)
    assert found, line
    return dt.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def stopped_and_drained(proc: Alertd, amqp_url: str) -> None:
    """Stop alertd (so nothing stays unacked), then the main queue must be empty."""
    proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()
    assert queue_counts(amqp_url)["alerts"] == 0


# -- faults ---------------------------------------------------------------------------


def test_a_child_killed_with_alerts_in_flight_is_replaced_and_each_alert_is_stored_once(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db,
                                       workers=2, concurrency=8) as proc:
        proc.wait_consuming()
        ids, bodies = slow_alerts(srv, "kill", 24, delay=3)
        publish(fresh_vhost, bodies)
        busy = wait_until(lambda: (b := in_flight(proc)) and sum(map(len, b.values())) >= 16
                          and b, 15, "16 alerts in flight over both children")
        victim = pid_of(proc, 0)
        assert victim is not None
        held = busy[victim]
        assert len(held) == 8, busy
        os.kill(victim, signal.SIGKILL)

        replaced = wait_until(lambda: (p := pid_of(proc, 0)) not in (None, victim) and p, 15,
                              "a new child 0")
        proc.wait_consuming()
        stored_once_with_one_webhook_id(srv, fresh_db, ids)
        ended = lines_with(proc.log(), f"child 0 pid {victim} ended (signal SIGKILL)")
        assert len(ended) == 1 and all(i in ended[0] for i in held), ended
        doc = proc.status()
        assert doc is not None and doc["restarts"] == 1 and doc["processed"] >= len(ids)
        assert replaced in {c["pid"] for c in doc["children"]}
        assert {c["index"]: c["restarts"] for c in doc["children"]} == {0: 1, 1: 0}, doc
        stopped_and_drained(proc, fresh_vhost)


def test_a_stopped_child_is_killed_as_hung_and_its_alerts_are_redelivered_and_completed(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    port = free_port()
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db, "--heartbeat-timeout",
                                       "3", "--metrics-port", str(port),
                                       workers=2, concurrency=4) as proc:
        proc.wait_consuming()
        ids, bodies = slow_alerts(srv, "hung", 8, delay=4)
        publish(fresh_vhost, bodies)
        busy = wait_until(lambda: (b := in_flight(proc)) and sum(map(len, b.values())) == 8
                          and b, 15, "8 alerts in flight over both children")
        victim = pid_of(proc, 0)
        assert victim is not None
        held = busy[victim]
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()

        hung = wait_until(lambda: lines_with(proc.log(), f"pid {victim} hung"), 15,
                          "the master to call the stopped child hung")
        # Silence counts from its last heartbeat, up to 0.5 s before the stop.
        assert time.monotonic() - stopped_at >= 2.5, "killed before --heartbeat-timeout"
        assert all(i in hung[0] for i in held), (held, hung)
        wait_until(lambda: pid_of(proc, 0) not in (None, victim), 15, "a new child 0")
        stored_once_with_one_webhook_id(srv, fresh_db, ids)
        with pytest.raises(ProcessLookupError):
            os.kill(victim, 0)  # gone and reaped, not a zombie
        doc = proc.status()
        assert doc is not None and doc["hung"] == 1 and doc["restarts"] == 1
        assert {c["index"]: c["restarts"] for c in doc["children"]} == {0: 1, 1: 0}, doc
        metrics = metric_values(port)
        assert metrics["alertd_child_hung_total"] == 1
        # The other child finished its own alerts; the stopped one's came back.
        assert metrics["alertd_messages_redelivered_total"] >= len(held)
        stopped_and_drained(proc, fresh_vhost)


# -- stopping ------------------------------------------------------------------------


def test_sigterm_under_load_exits_zero_within_the_graceful_timeout_and_loses_nothing(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    graceful = 8.0
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db, "--graceful-timeout",
                                       str(graceful), workers=2, concurrency=4) as proc:
        proc.wait_consuming()
        ids, bodies = slow_alerts(srv, "term", 30, delay=2)
        publish(fresh_vhost, bodies)
        busy = wait_until(lambda: (b := in_flight(proc)) and sum(map(len, b.values())) == 8
                          and b, 15, "8 alerts in flight")
        proc.send(signal.SIGTERM)
        sent = time.monotonic()
        assert proc.wait(graceful + 10) == 0, proc.log()
        assert time.monotonic() - sent < graceful, "did not stop within --graceful-timeout"

        stored = rows(fresh_db)
        assert {i for held in busy.values() for i in held} <= set(stored), "in flight not done"
        assert all(r["status"] == "done" for r in stored.values())
        assert len(stored) < len(ids), "intake did not stop at once"
        # alertd is gone, so nothing is unacked: what it did not finish is ready again.
        assert len(stored) + queue_counts(fresh_vhost)["alerts"] == len(ids)
        assert "requeued" not in proc.log()


@pytest.mark.parametrize("second", ["TERM", "QUIT"])
def test_a_second_term_or_a_quit_stops_fast_and_unfinished_alerts_go_back_to_the_queue(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path], second: str,
) -> None:
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db, "--graceful-timeout",
                                       "60", workers=2, concurrency=2) as proc:
        proc.wait_consuming()
        ids, bodies = slow_alerts(srv, "fast", 6, delay=30)
        publish(fresh_vhost, bodies)
        wait_until(lambda: sum(map(len, in_flight(proc).values())) == 4, 15, "4 in flight")
        if second == "TERM":
            proc.send(signal.SIGTERM)
            wait_until(lambda: "graceful stop" in proc.log(), 5, "the graceful stop")
        proc.send(getattr(signal, f"SIG{second}"))
        sent = time.monotonic()
        assert proc.wait(15) == 0, proc.log()
        assert time.monotonic() - sent < 5
        assert "fast stop" in proc.log()
        assert rows(fresh_db) == {}
        assert queue_counts(fresh_vhost)["alerts"] == len(ids)


def test_ctrl_c_to_the_whole_process_group_stops_gracefully_not_fast(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    with Servers(clips) as srv, SessionAlertd(tmp_path, fresh_vhost, fresh_db,
                                              "--graceful-timeout", "20",
                                              workers=2, concurrency=2) as proc:
        proc.wait_consuming()
        ids, bodies = slow_alerts(srv, "ctrlc", 4, delay=2)
        publish(fresh_vhost, bodies)
        wait_until(lambda: sum(map(len, in_flight(proc).values())) == 4, 15, "4 in flight")
        proc.send_group(signal.SIGINT)  # master and children at once, as a terminal does
        assert proc.wait(20) == 0, proc.log()
        assert "fast stop" not in proc.log()
        assert set(rows(fresh_db)) == set(ids), "a single Ctrl-C requeued in-flight alerts"
        assert queue_counts(fresh_vhost)["alerts"] == 0


# -- reload and scaling ------------------------------------------------------------------


def test_hup_reloads_the_config_file_and_replaces_children_one_by_one_without_loss(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    config = tmp_path / "alertd.toml"
    config.write_text("workers = 2\nconcurrency = 2\n")
    with Servers(clips) as srv, ConfigFileAlertd(tmp_path, fresh_vhost, fresh_db, config,
                                                 workers=2) as proc:
        proc.wait_consuming()
        before = {c["pid"] for c in proc.children()}
        ids, bodies = slow_alerts(srv, "hup", 60, delay=0.5)

        def publish_steadily() -> None:
            for start in range(0, len(bodies), 4):
                publish(fresh_vhost, bodies[start:start + 4])
                time.sleep(0.2)

        publisher = threading.Thread(target=publish_steadily)
        publisher.start()
        try:
            time.sleep(1)
            config.write_text("workers = 2\nconcurrency = 5\n")
            proc.send(signal.SIGHUP)

            def reloaded() -> bool:
                doc = proc.status()
                kids = doc["children"] if doc else []
                return bool(doc) and doc["concurrency"] == 5 and len(kids) == 2 and all(
                    c["generation"] == 1 and c["state"] == "consuming"
                    and c["concurrency"] == 5 and c["pid"] not in before for c in kids)

            wait_until(reloaded, 30, "two new children at concurrency 5")
        finally:
            publisher.join(30)
        stored_once_with_one_webhook_id(srv, fresh_db, ids)

        log = proc.log().splitlines()
        new = [(i, p) for i, p, g in spawned(proc.log()) if g == 1]
        assert len(new) == 2, new

        def at(needle: str) -> int:
            found = [n for n, line in enumerate(log) if needle in line]
            assert found, needle
            return found[0]

        # One by one: the second new child is forked only after the first old
        # one was retired, and each old one retires only once its successor consumes.
        retired = [at(f"retiring child {i} pid ") for i, _ in new]
        consuming = [at(f"pid={p}] alertd.adapters.amqp: consuming") for _, p in new]
        assert consuming[0] < retired[0] < at(f"spawned child {new[1][0]} pid {new[1][1]}")
        assert consuming[1] < retired[1]
        assert "reload refused" not in proc.log()
        stopped_and_drained(proc, fresh_vhost)


def test_ttin_adds_a_child_and_ttou_removes_one_after_it_drained_its_alerts(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    port = free_port()
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db, "--metrics-port",
                                       str(port), workers=2, concurrency=3) as proc:
        proc.wait_consuming()
        proc.send(signal.SIGTTIN)
        proc.wait_consuming(count=3)
        assert sorted(c["index"] for c in proc.children()) == [0, 1, 2]

        ids, bodies = slow_alerts(srv, "ttou", 18, delay=2)
        publish(fresh_vhost, bodies)
        third = pid_of(proc, 2)
        assert third is not None
        held = wait_until(lambda: len(h := in_flight(proc).get(third, [])) == 3 and h, 15,
                          "child 2 to hold 3 alerts")
        proc.send(signal.SIGTTOU)
        wait_until(lambda: [c["pid"] for c in proc.children()] != [] and third not in
                   {c["pid"] for c in proc.children()}, 20, "child 2 to drain and exit")
        assert sorted(c["index"] for c in proc.children()) == [0, 1]
        assert proc.status()["workers"] == 2  # type: ignore[index]

        stored_once_with_one_webhook_id(srv, fresh_db, ids)
        assert set(held) <= set(rows(fresh_db))
        log = proc.log()
        assert lines_with(log, f"retiring child 2 pid {third} (graceful)")
        assert lines_with(log, f"child 2 pid {third} ended (exit code 0)")
        # What it held was finished by it, not handed back to the broker.
        assert "requeued" not in log
        assert metric_values(port)["alertd_messages_redelivered_total"] == 0
        assert proc.status()["restarts"] == 0  # type: ignore[index]
        stopped_and_drained(proc, fresh_vhost)


# -- boot failures and backoff ---------------------------------------------------------


def test_an_unmigrated_database_halts_the_master_with_exit_3_after_one_fork_per_child(
    tmp_path: Path, fresh_vhost: str,
) -> None:
    with unmigrated_database() as dsn, Alertd(tmp_path, fresh_vhost, dsn, workers=2) as proc:
        started = time.monotonic()
        assert proc.wait(20) == 3, proc.log()
        assert time.monotonic() - started < 10
        log = proc.log()
        reason = lines_with(log, "database schema is at version 0, expected")
        assert reason and "run 'alertd db migrate'" in reason[0], log
        assert len(spawned(log)) <= 2, "forked again after a child refused the config"
        assert lines_with(log, "halting (exit 3)")
        assert not Path(proc.control).exists()


@pytest.mark.parametrize("key", ["metrics_port", "control_socket", "pidfile"])
def test_a_port_in_use_or_an_unwritable_path_is_refused_at_start_in_one_line_naming_it(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, key: str,
) -> None:
    missing = tmp_path / "no-such-dir"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        busy = taken.getsockname()[1]
        metrics = busy if key == "metrics_port" else free_port()
        extra = {"metrics_port": [],
                 "control_socket": ["--control-socket", str(missing / "control.sock")],
                 "pidfile": ["--pidfile", str(missing / "alertd.pid")]}[key]
        with Alertd(tmp_path, fresh_vhost, fresh_db, "--metrics-port", str(metrics), *extra,
                    workers=2) as proc:
            assert proc.wait(20) == 1, proc.log()
            log = proc.log()
    where = {"metrics_port": f"127.0.0.1:{busy}: Address already in use",
             "control_socket": f"{missing / 'control.sock'}: No such file or directory",
             "pidfile": f"{missing / 'alertd.pid'}: No such file or directory"}[key]
    verb = "write" if key == "pidfile" else "listen on"
    assert log.strip().splitlines()[-1] == f"alertd: error: {key}: cannot {verb} {where}", log
    assert "Traceback" not in log, log
    assert spawned(log) == [], "forked children before it could serve them"
    assert not Path(proc.control).exists()
    if key == "pidfile":
        with socket.socket() as again:  # the metrics port it had bound is released
            again.bind(("127.0.0.1", metrics))


def test_a_second_master_on_the_same_control_socket_is_refused_and_the_first_keeps_it(
    tmp_path: Path, fresh_vhost: str, fresh_db: str,
) -> None:
    pidfile = tmp_path / "alertd.pid"
    with Alertd(tmp_path, fresh_vhost, fresh_db, "--pidfile", str(pidfile),
                workers=1) as first:
        first.wait_consuming()
        other = tmp_path / "second"
        other.mkdir()
        with Alertd(other, fresh_vhost, fresh_db, "--control-socket", first.control,
                    "--pidfile", str(pidfile), workers=1) as second:
            assert second.wait(20) == 1, second.log()
        assert second.log().strip().splitlines()[-1] == (
            f"alertd: error: control_socket: cannot listen on {first.control}: another "
            "process (a running alertd master?) answers on it"), second.log()
        assert spawned(second.log()) == []
        doc = first.status()
        assert doc is not None and doc["master_pid"] == first.pid
        assert pidfile.read_text() == f"{first.pid}\n"
        first.stop()
    assert not Path(first.control).exists() and not pidfile.exists()


def test_a_master_without_a_webhook_secret_warns_that_webhooks_go_unsigned(
    tmp_path: Path, fresh_vhost: str, fresh_db: str,
) -> None:
    warning = "webhooks are sent without a webhook-signature header"
    with Alertd(tmp_path, fresh_vhost, fresh_db, workers=1) as signed:
        signed.wait_consuming()
    assert warning not in signed.log()
    other = tmp_path / "unsigned"
    other.mkdir()
    with Alertd(other, fresh_vhost, fresh_db, workers=1,
                env={"ALERTD_WEBHOOK_SECRET": ""}) as unsigned:
        unsigned.wait_consuming()
    assert warning in unsigned.log()


# A master that forks one real child, prints its pid and dies after argv[1]
# seconds. Nothing answers on port 1: only the orphan check can end the child.
SHORT_LIVED_MASTER = """
import os, sys, time
from alertd.config import Settings
from alertd.handle import ChildHandle
settings = Settings(dsn="postgresql://postgres@127.0.0.1:1/none",
                    amqp_url="amqp://guest:guest@127.0.0.1:1/%2F", probe_helpers=1)
child = ChildHandle.spawn(settings, 0, 0, close_in_child=[])
print(child.pid, flush=True)
time.sleep(float(sys.argv[1]))
os._exit(0)
"""


@pytest.mark.parametrize("master_lives_s", [0.0, 3.0])
def test_a_child_stops_once_its_master_is_gone(tmp_path: Path, master_lives_s: float) -> None:
    # 0 s: the master dies while the child still imports, before it could ask
    # who its parent is; it used to take pid 1 for its master (found by a review).
    out = tmp_path / "pid"
    with out.open("w") as fh:  # a file, not a pipe: an orphan would hold a pipe open
        subprocess.run([sys.executable, "-c", SHORT_LIVED_MASTER, str(master_lives_s)],
                       stdout=fh, stderr=subprocess.DEVNULL, timeout=30, check=True)
    pid = int(out.read_text().split()[0])
    try:
        assert wait_until(lambda: not is_alive(pid), 15, "the orphaned child to stop")
    finally:
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_an_unreachable_database_keeps_children_booting_without_a_fork_storm(
    tmp_path: Path, fresh_vhost: str,
) -> None:
    port = free_port()
    with Alertd(tmp_path, fresh_vhost, "postgresql://postgres@127.0.0.1:1/x",
                "--metrics-port", str(port), workers=2) as proc:
        first = wait_until(lambda: len(kids := proc.children()) == 2 and kids, 15,
                           "two children")
        time.sleep(5)
        # Each try waits out the pool's 5 s checkout before it says so.
        wait_until(lambda: len(lines_with(proc.log(), "database unavailable at start")) >= 2,
                   10, "both children to report the database unavailable")
        proc.assert_running()
        doc = proc.status()
        assert doc is not None and doc["restarts"] == 0
        assert [(c["pid"], c["state"]) for c in doc["children"]] == [
            (c["pid"], "booting") for c in first]
        assert len(spawned(proc.log())) == 2
        assert http_get(port, "/readyz")[0] == 503
        assert http_get(port, "/healthz")[0] == 200  # alive, heartbeating, just waiting
        proc.send(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.log()


def test_a_term_that_arrives_while_children_are_still_booting_is_not_lost(
    tmp_path: Path, fresh_vhost: str, fresh_db: str,
) -> None:
    with Alertd(tmp_path, fresh_vhost, fresh_db, workers=2) as proc:
        # The first instants after fork, before a child has set up its own
        # signal handling (it imports for most of a second): a TERM relayed
        # then must not be swallowed.
        wait_until(lambda: len(forked_pids(proc.pid)) == 2, 10, "two forks", interval=0.005)
        proc.send(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.log()
        assert "did not stop in time" not in proc.log()


def test_a_child_that_keeps_dying_is_replaced_with_exponential_backoff(
    tmp_path: Path, fresh_vhost: str, fresh_db: str,
) -> None:
    with Alertd(tmp_path, fresh_vhost, fresh_db, workers=1) as proc:
        proc.wait_consuming()
        killed: list[int] = []
        for _ in range(4):
            pid = wait_until(lambda: (p := pid_of(proc, 0)) not in (None, *killed) and p, 20,
                             "the next child 0")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        proc.wait_consuming(timeout=30)

        log = proc.log().splitlines()
        planned = [(float(d), int(n)) for d, n in re.findall(
            r"child 0 will be replaced in ([\d.]+)s \(crash (\d+) in a row\)", "\n".join(log))]
        assert planned == [(0.5, 1), (1.0, 2), (2.0, 3), (4.0, 4)]
        # The delay is kept, not only logged: each fork waits for it after the death.
        for pid, (delay, _) in zip(killed, planned, strict=True):
            died = next(n for n, line in enumerate(log) if f"pid {pid} ended" in line)
            respawn = next(n for n in range(died, len(log)) if "spawned child 0" in log[n])
            assert log_time(log[respawn]) - log_time(log[died]) >= delay - 0.01
        assert len(spawned("\n".join(log))) == 5
        assert proc.status()["restarts"] == 4  # type: ignore[index]


# -- systemd, status, health, pidfile ----------------------------------------------------


def test_systemd_hears_ready_status_watchdog_reloading_and_stopping_from_the_master_only(
    tmp_path: Path, fresh_vhost: str, fresh_db: str,
) -> None:
    control = str(tmp_path / "control.sock")
    at_ready: list[list[tuple[str, int]]] = []

    def on_datagram(datagram: Datagram) -> None:
        # What the master shows the moment it says READY=1.
        if datagram.fields().get("READY") == "1":
            doc = fetch_status(control, timeout=2)
            at_ready.append([(c["state"], c["generation"]) for c in doc["children"]
                             if not c["retiring"]])

    with NotifySocket(tmp_path / "notify.sock", on_datagram) as notify, Alertd(
        tmp_path, fresh_vhost, fresh_db, workers=2, concurrency=2,
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"},
    ) as proc:
        ready = wait_until(lambda: notify.with_field("READY"), 30, "READY=1")[0]
        assert at_ready[0] == [("consuming", 0), ("consuming", 0)]

        def pings() -> list[float]:
            return [d.at for d in notify.with_field("WATCHDOG") if d.at > ready.at]

        wait_until(lambda: len(pings()) >= 6, 10, "watchdog pings")
        gaps = [b - a for a, b in itertools.pairwise(pings())]
        # A third of WATCHDOG_USEC, on the next tick; never WATCHDOG_USEC itself.
        assert all(0.3 <= g < 1.0 for g in gaps), gaps
        wait_until(lambda: any(d.fields()["STATUS"].startswith("2/2 children consuming, ")
                               for d in notify.with_field("STATUS")), 5, "STATUS=2/2 ...")

        proc.send(signal.SIGHUP)
        reloading = wait_until(lambda: notify.with_field("RELOADING"), 10, "RELOADING=1")[0]
        usec = int(reloading.fields()["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - time.monotonic()) < 10
        wait_until(lambda: len(at_ready) == 2, 30, "READY=1 again after the reload")
        assert at_ready[1] == [("consuming", 1), ("consuming", 1)]
        assert notify.with_field("READY")[1].at > reloading.at

        proc.send(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify.with_field("STOPPING", "1")
        # NotifyAccess=main: only the master talks to systemd. (A forked child's
        # /proc/<pid>/environ still shows the master's original environment,
        # whatever it unsets, so the senders' credentials are what proves it.)
        assert {d.pid for d in notify.received} == {proc.pid}


def test_status_health_and_pidfile_work_and_status_answers_while_the_broker_is_unreachable(
    tmp_path: Path, fresh_vhost: str, fresh_db: str,
) -> None:
    port = free_port()
    pidfile = tmp_path / "alertd.pid"
    with Alertd(tmp_path, fresh_vhost, fresh_db, "--metrics-port", str(port), "--pidfile",
                str(pidfile), workers=2, concurrency=2) as proc:
        proc.wait_consuming()
        assert pidfile.read_text() == f"{proc.pid}\n"
        assert http_get(port, "/healthz") == (200, b"ok\n")
        assert http_get(port, "/readyz") == (200, b"ready\n")
        pids = sorted(c["pid"] for c in proc.children())

        as_json = run_cli("status", "--control-socket", proc.control, "--json")
        assert as_json.returncode == 0, as_json.stderr
        doc = orjson.loads(as_json.stdout)
        assert doc["master_pid"] == proc.pid and doc["workers"] == 2
        assert sorted(c["pid"] for c in doc["children"]) == pids
        plain = run_cli("status", "--control-socket", proc.control)
        assert plain.returncode == 0 and f"master pid {proc.pid}" in plain.stdout
        assert all(str(p) in plain.stdout for p in pids)

        proc.send(signal.SIGUSR1)  # reopen logs: nobody may die of it
        time.sleep(1.5)
        assert sorted(c["pid"] for c in proc.children()) == pids
        assert proc.status()["restarts"] == 0  # type: ignore[index]

        vhost = vhost_of(fresh_vhost)
        subprocess.run(["rabbitmqctl", "-q", "clear_permissions", "-p", vhost, "guest"],
                       check=True, capture_output=True, timeout=60)
        try:
            close_broker_connections(fresh_vhost, "test: broker unreachable")
            wait_until(lambda: [c["state"] for c in proc.children()] == ["connecting"] * 2,
                       15, "both children to lose the broker")
            down = run_cli("status", "--control-socket", proc.control, "--json")
            assert down.returncode == 0, down.stderr
            assert [c["state"] for c in orjson.loads(down.stdout)["children"]] == [
                "connecting"] * 2
            assert run_cli("status", "--control-socket", proc.control).returncode == 0
            assert http_get(port, "/readyz")[0] == 503
            assert http_get(port, "/healthz")[0] == 200
        finally:
            subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest",
                            ".*", ".*", ".*"], check=True, capture_output=True, timeout=60)
        proc.wait_consuming(timeout=40)
        assert http_get(port, "/readyz")[0] == 200

        proc.send(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not pidfile.exists()
        assert not Path(proc.control).exists()
        assert run_cli("status", "--control-socket", proc.control).returncode != 0


# -- recycling --------------------------------------------------------------------------


def test_children_recycled_after_max_alerts_lose_nothing_and_totals_stay_monotonic(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db,
                                       "--max-alerts-per-child", "5",
                                       workers=2, concurrency=2) as proc:
        proc.wait_consuming()
        ids, bodies = slow_alerts(srv, "recycle", 30, delay=0.3)
        publish(fresh_vhost, bodies)
        # A recycled child finishes the webhooks it claimed before it exits:
        # none waits for an abandoned claim to expire.
        stored_once_with_one_webhook_id(srv, fresh_db, ids, webhooks_within=20)

        def totals() -> dict[str, Any] | None:
            doc = proc.status()
            return doc if doc and doc["processed"] == len(ids) else None

        doc = wait_until(totals, 10, "status to count 30 processed")
        assert doc["failed"] == 0 and doc["restarts"] == 0
        log = proc.log()
        recycled = lines_with(log, "ended (exit code 4, recycled)")
        assert len(recycled) >= 2, log
        assert all(" INFO " in line for line in recycled)
        assert not lines_with(log, "will be replaced in")
        assert len(spawned(log)) >= 2 + len(recycled)
        stopped_and_drained(proc, fresh_vhost)


def test_a_child_over_max_memory_drains_and_is_replaced_without_losing_alerts(
    tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path],
) -> None:
    # One byte: every child is over the limit as soon as it checks, so each
    # one takes a few alerts, drains them and hands over to a fresh child.
    with Servers(clips) as srv, Alertd(tmp_path, fresh_vhost, fresh_db,
                                       "--max-memory-per-child", "1",
                                       workers=1, concurrency=2) as proc:
        # Children consume for a second at most here; the topology is declared.
        wait_until(lambda: "alertd.adapters.amqp: consuming" in proc.log(), 30, "a consumer")
        ids, bodies = slow_alerts(srv, "rss", 6, delay=1)
        publish(fresh_vhost, bodies)
        stored_once_with_one_webhook_id(srv, fresh_db, ids, webhooks_within=20)
        log = proc.log()
        assert lines_with(log, "recycling: RSS ")
        assert lines_with(log, "ended (exit code 4, recycled)")
        # Not crashes: only a child that recycled before its first alert (here
        # the one idle until the alerts were published) waits out a backoff.
        assert not [line for line in lines_with(log, "will be replaced in")
                    if "recycled before a single alert" not in line]
        assert "requeued" not in log
        stopped_and_drained(proc, fresh_vhost)
