"""The master's policy without forking real workers: backoff, halting, rollover, notify."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from alertd import sdnotify
from alertd.config import Settings
from alertd.exitcodes import EXIT_CONFIG, EXIT_CRASH, EXIT_OK, EXIT_RECYCLED
from alertd.handle import ChildHandle
from alertd.master import ROLLOVER_STALL_S, Arbiter, restart_delay
from alertd.stats import ChildStats
from alertd.statusview import status_document


class Kids:
    """Children made of pipes (no process behind them) for an Arbiter under test."""

    def __init__(self) -> None:
        self.writers: dict[int, int] = {}
        self.made: list[ChildHandle] = []
        self._next_pid = 1 << 30  # above any pid_max: signalling it is a harmless ESRCH

    def make(self, index: int, generation: int = 0, state: str = "booting") -> ChildHandle:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._next_pid += 1
        child = ChildHandle(self._next_pid, index, generation, read_fd)
        child.state = state
        self.writers[child.pid] = write_fd
        self.made.append(child)
        return child

    def report(self, child: ChildHandle, **beat: object) -> None:
        os.write(self.writers[child.pid], orjson.dumps(beat) + b"\n")

    def close(self) -> None:
        for fd in self.writers.values():
            os.close(fd)
        for child in self.made:
            child.close()


@pytest.fixture()
def kids() -> Iterator[Kids]:
    made = Kids()
    yield made
    made.close()


def arbiter_with(kids: Kids, monkeypatch: pytest.MonkeyPatch, settings: Settings,
                 reload: Callable[[], Settings] | None = None) -> Arbiter:
    """An Arbiter whose spawn makes pipe children; ``arb.spawned`` lists them in order."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    arb = Arbiter(settings, reload=reload)
    spawned: list[ChildHandle] = []

    def fake_spawn(index: int) -> ChildHandle:
        child = kids.make(index, arb.generation)
        arb.children[child.pid] = child
        spawned.append(child)
        return child

    monkeypatch.setattr(arb, "spawn", fake_spawn)
    arb.spawned = spawned  # type: ignore[attr-defined]
    return arb


@pytest.fixture()
def arbiter(kids: Kids, monkeypatch: pytest.MonkeyPatch) -> Arbiter:
    return arbiter_with(kids, monkeypatch, Settings(workers=1, heartbeat_timeout=5))


def test_restart_delay_doubles_from_half_a_second_and_stops_at_thirty() -> None:
    assert [restart_delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_a_child_refusing_the_config_halts_the_master_with_exit_3(
    arbiter: Arbiter, kids: Kids,
) -> None:
    arbiter._on_exit(kids.make(0), EXIT_CONFIG)
    assert arbiter.exit_code == EXIT_CONFIG
    assert arbiter.stopping == "graceful"
    arbiter.manage_children()  # the loop does not call it while stopping; nor may it fork
    assert arbiter.aggregate.restarts == 0


def test_crashes_in_a_row_back_off_and_a_recycled_child_is_replaced_at_once(
    arbiter: Arbiter, kids: Kids,
) -> None:
    for _ in range(3):
        arbiter._on_exit(kids.make(0), EXIT_CRASH)
    wait = arbiter._not_before[0] - time.monotonic()
    assert 1.5 < wait <= 2.0
    assert arbiter.aggregate.restarts == 3
    arbiter.manage_children()
    assert arbiter.spawned == []  # type: ignore[attr-defined]

    arbiter._not_before.clear()
    recycled = kids.make(0)
    kids.report(recycled, state="draining", recycling=True, counters=[["alerts", "done", 7]])
    arbiter._read_child(recycled)
    arbiter._on_exit(recycled, EXIT_RECYCLED)
    assert arbiter.aggregate.restarts == 3 and not arbiter._not_before
    arbiter.manage_children()
    assert len(arbiter.spawned) == 1  # type: ignore[attr-defined]


def hup_with_one_consuming_child(arbiter: Arbiter, kids: Kids) -> tuple[ChildHandle, ChildHandle]:
    """HUP with one consuming child: the old child and the replacement spawned for it."""
    old = kids.make(0, generation=0, state="consuming")
    arbiter.children[old.pid] = old
    arbiter.handle_hup()
    arbiter.manage_children()
    return old, arbiter.spawned[-1]  # type: ignore[attr-defined]


def test_a_hup_replacement_that_crashes_waits_out_the_backoff_instead_of_fork_looping(
    arbiter: Arbiter, kids: Kids,
) -> None:
    old, new = hup_with_one_consuming_child(arbiter, kids)
    del arbiter.children[new.pid]  # it died at boot
    arbiter._on_exit(new, EXIT_CRASH)
    for _ in range(3):
        arbiter.manage_children()
    assert len(arbiter.spawned) == 1  # type: ignore[attr-defined]
    assert old.pid in arbiter.children and not old.retiring

    arbiter._not_before.clear()  # the backoff ran out
    arbiter.manage_children()
    assert len(arbiter.spawned) == 2  # type: ignore[attr-defined]


def test_a_hup_whose_new_child_refuses_the_config_goes_back_to_the_old_config(
    arbiter: Arbiter, kids: Kids,
) -> None:
    # It passed the master's validation; only a child finds out (an unmigrated
    # database, no ffprobe on this host) and exits 3.
    before = arbiter.settings
    arbiter._reload = lambda: replace(before, dsn="postgresql://elsewhere/unmigrated")
    old, new = hup_with_one_consuming_child(arbiter, kids)
    assert arbiter.settings.dsn.endswith("/unmigrated") and new.generation == 1
    del arbiter.children[new.pid]
    arbiter._on_exit(new, EXIT_CONFIG)
    assert arbiter.stopping is None and arbiter.exit_code != EXIT_CONFIG
    assert arbiter.settings is before
    assert old.generation == arbiter.generation and not old.retiring
    for _ in range(3):
        arbiter.manage_children()
    assert arbiter.spawned == [new]  # type: ignore[attr-defined]


def test_a_rollback_replaces_the_children_already_on_the_refused_config(
    kids: Kids, monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = Settings(workers=2, heartbeat_timeout=5)
    arb = arbiter_with(kids, monkeypatch, before,
                       reload=lambda: replace(before, dsn="postgresql://elsewhere/db"))
    spawned: list[ChildHandle] = arb.spawned  # type: ignore[attr-defined]
    old0, old1 = kids.make(0, state="consuming"), kids.make(1, state="consuming")
    arb.children = {old0.pid: old0, old1.pid: old1}
    arb.handle_hup()
    arb.manage_children()
    [new0] = spawned
    new0.state = "consuming"  # the first replacement took the new config
    arb.manage_children()
    assert old0.retiring
    del arb.children[old0.pid]
    arb.manage_children()
    new1 = spawned[-1]
    assert new1.index == 1 and new1.generation == 1
    del arb.children[new1.pid]
    arb._on_exit(new1, EXIT_CONFIG)  # the second refuses it: back to the old config
    assert arb.settings is before and arb.stopping is None
    assert old1.generation == arb.generation and new0.generation < arb.generation
    arb.manage_children()
    again0 = spawned[-1]
    assert (again0.index, again0.generation) == (0, arb.generation)
    again0.state = "consuming"
    arb.manage_children()
    assert new0.retiring and not old1.retiring


def test_a_graceful_stop_leaves_a_retiring_child_to_its_drain(
    kids: Kids, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A second TERM makes a child stop fast (in-flight alerts cancelled and
    # requeued): one already draining must not get one (found by a review).
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(ChildHandle, "signal",
                        lambda self, signum: sent.append((self.pid, signum)))
    arb = Arbiter(Settings(workers=2, heartbeat_timeout=5))
    zero, one = kids.make(0, state="consuming"), kids.make(1, state="consuming")
    arb.children = {zero.pid: zero, one.pid: one}
    arb.handle_ttou()
    arb.manage_children()
    arb.handle_term()
    assert sent == [(one.pid, signal.SIGTERM), (zero.pid, signal.SIGTERM)]


def test_a_child_refusing_the_config_while_others_consume_is_retried_with_backoff(
    kids: Kids, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # E.g. a newer release migrated the database: the running children keep
    # serving instead of the whole fleet halting.
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    arb = Arbiter(Settings(workers=2, heartbeat_timeout=5))
    serving = kids.make(1, state="consuming")
    arb.children = {serving.pid: serving}
    arb._on_exit(kids.make(0), EXIT_CONFIG)
    assert arb.stopping is None and arb.exit_code != EXIT_CONFIG
    assert arb._not_before[0] > time.monotonic() and arb.aggregate.restarts == 1


def test_a_replacement_that_never_consumes_is_superseded_by_the_next_hup(
    arbiter: Arbiter, kids: Kids,
) -> None:
    old, stuck = hup_with_one_consuming_child(arbiter, kids)
    stuck.state = "connecting"  # e.g. a wrong vhost: it retries for ever
    arbiter.handle_hup()  # the config fixed
    arbiter.manage_children()
    assert stuck.retiring and not old.retiring
    arbiter.manage_children()
    fixed = arbiter.spawned[-1]  # type: ignore[attr-defined]
    assert fixed.generation == 2 and fixed.index == 0
    fixed.state = "consuming"
    arbiter.manage_children()
    assert old.retiring


def test_a_replacement_not_consuming_after_a_minute_is_reported_once(
    arbiter: Arbiter, kids: Kids, caplog: pytest.LogCaptureFixture,
) -> None:
    old, stuck = hup_with_one_consuming_child(arbiter, kids)
    arbiter.manage_children()
    assert "not consuming" not in caplog.text
    stuck.started -= ROLLOVER_STALL_S + 1
    for _ in range(3):
        arbiter.manage_children()
    [report] = [r for r in caplog.records if "not consuming" in r.getMessage()]
    assert report.levelname == "ERROR" and f"pid {old.pid} keeps serving" in report.getMessage()
    assert not old.retiring and len(arbiter.spawned) == 1  # type: ignore[attr-defined]


def test_ttou_retires_the_extra_child_only_once_the_slots_left_consume(
    kids: Kids, monkeypatch: pytest.MonkeyPatch,
) -> None:
    arb = arbiter_with(kids, monkeypatch, Settings(workers=2, heartbeat_timeout=5))
    spawned: list[ChildHandle] = arb.spawned  # type: ignore[attr-defined]
    one = kids.make(1, state="consuming")
    arb.children = {one.pid: one}
    for _ in range(4):  # child 0 keeps crashing: its slot waits out a backoff
        arb._on_exit(kids.make(0), EXIT_CRASH)
    arb.handle_ttou()
    arb.manage_children()
    assert not one.retiring, "TTOU left no child consuming until the backoff ended"
    arb._not_before.clear()
    arb.manage_children()
    [zero] = spawned
    assert not one.retiring  # not before its successor consumes
    zero.state = "consuming"
    arb.manage_children()
    assert one.retiring


def test_a_hup_retires_the_old_child_only_once_its_successor_consumes(
    arbiter: Arbiter, kids: Kids,
) -> None:
    old, new = hup_with_one_consuming_child(arbiter, kids)
    arbiter.manage_children()
    assert not old.retiring
    new.state = "consuming"
    arbiter.manage_children()
    assert old.retiring and new.generation == 1
    arbiter.manage_children()
    assert arbiter.spawned == [new], "the retired child got a second successor"  # type: ignore[attr-defined]


def test_a_recycling_child_gets_its_replacement_before_it_has_drained(
    arbiter: Arbiter, kids: Kids,
) -> None:
    child = kids.make(0, state="consuming")
    arbiter.children[child.pid] = child
    kids.report(child, state="draining", recycling=True, counters=[["alerts", "done", 7]])
    arbiter._read_child(child)
    assert child.retiring
    arbiter.manage_children()
    assert [c.index for c in arbiter.spawned] == [0]  # type: ignore[attr-defined]
    arbiter._on_exit(child, EXIT_RECYCLED)
    assert arbiter.aggregate.restarts == 0


def restarts_shown(arb: Arbiter) -> list[tuple[int, int]]:
    """(slot, restarts) per child, as ``alertd status --json`` shows them."""
    return [(c["index"], c["restarts"]) for c in status_document(arb)["children"]]


def test_each_child_shows_its_slots_crashes_and_hang_kills_but_not_recycles_or_reloads(
    kids: Kids, monkeypatch: pytest.MonkeyPatch,
) -> None:
    arb = arbiter_with(kids, monkeypatch, Settings(workers=2, heartbeat_timeout=5))
    arb._on_exit(kids.make(0), EXIT_CRASH)
    hung = kids.make(1, state="consuming")
    arb.children[hung.pid] = hung
    hung.last_beat = time.monotonic() - 10
    arb.murder_hung()
    del arb.children[hung.pid]
    arb._on_exit(hung, -signal.SIGKILL)
    arb._on_exit(kids.make(0), EXIT_RECYCLED)
    reloaded = kids.make(1, state="draining")
    reloaded.retiring = True  # HUP rollover, TTOU: replaced on purpose
    arb._on_exit(reloaded, EXIT_OK)
    arb._not_before.clear()
    arb.manage_children()
    assert restarts_shown(arb) == [(0, 1), (1, 1)]
    assert status_document(arb)["restarts"] == 2


def test_a_slot_the_fleet_shrinks_away_forgets_its_restarts_and_starts_at_0_when_regrown(
    kids: Kids, monkeypatch: pytest.MonkeyPatch,
) -> None:
    arb = arbiter_with(kids, monkeypatch, Settings(workers=2, heartbeat_timeout=5))
    arb._on_exit(kids.make(0), EXIT_CRASH)
    arb._on_exit(kids.make(1), EXIT_CRASH)
    arb._not_before.clear()
    arb.manage_children()
    zero, one = arb.spawned  # type: ignore[attr-defined]
    zero.state = one.state = "consuming"
    arb.handle_ttou()
    arb.manage_children()
    assert one.retiring and restarts_shown(arb) == [(0, 1), (1, 1)]  # still draining
    del arb.children[one.pid]
    arb._on_exit(one, EXIT_OK)
    arb.manage_children()
    assert restarts_shown(arb) == [(0, 1)]
    arb.handle_ttin()
    arb.manage_children()
    assert restarts_shown(arb) == [(0, 1), (1, 0)]
    assert arb.aggregate.restarts == 2, "the fleet total keeps the gone slot's restart"


def reap_only(arbiter: Arbiter, monkeypatch: pytest.MonkeyPatch, pid: int,
              status: int) -> None:
    """``arbiter.reap()`` seeing one exited child, ``pid``: reap() waits for any
    child, and pytest may run others of its own."""
    results = [(pid, status)]

    def waitpid(want: int, options: int) -> tuple[int, int]:
        if not results:
            raise ChildProcessError
        return results.pop()

    monkeypatch.setattr(os, "waitpid", waitpid)
    arbiter.reap()


def test_reaping_a_child_first_reads_the_heartbeats_it_left_in_the_pipe(
    arbiter: Arbiter, monkeypatch: pytest.MonkeyPatch,
) -> None:
    stats = ChildStats()
    for _ in range(7):
        stats.count("alerts", "done", "")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: one last report, then exit
        os.write(write_fd, orjson.dumps({"state": "stopped", **stats.snapshot()}) + b"\n")
        os._exit(EXIT_RECYCLED)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    arbiter.children[pid] = ChildHandle(pid, 0, 0, read_fd)
    _, status = os.waitpid(pid, 0)
    reap_only(arbiter, monkeypatch, pid, status)
    assert arbiter.aggregate.processed() == (7, 0)
    assert pid not in arbiter.children


def test_a_replacement_that_reuses_the_pipe_fd_of_its_predecessor_stays_read(
    arbiter: Arbiter, kids: Kids, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A recycled child's pipe hits EOF and is closed; its replacement, spawned before
    the old one is reaped, gets the same fd number. Reaping the old child must not
    unregister the new child's pipe (it would never be read again)."""
    old = kids.make(0, state="draining")
    arbiter.children[old.pid] = old
    arbiter._selector.register(old.read_fd, selectors.EVENT_READ, None)
    os.close(kids.writers.pop(old.pid))  # the old child exited: EOF
    arbiter._read_child(old)
    assert old.eof and old.closed
    new = kids.make(0, state="booting")
    assert new.read_fd == old.read_fd  # the lowest free fd number, reused
    arbiter.children[new.pid] = new
    arbiter._selector.register(new.read_fd, selectors.EVENT_READ, "new child")
    reap_only(arbiter, monkeypatch, old.pid, EXIT_RECYCLED << 8)
    assert arbiter._selector.get_key(new.read_fd).data == "new child"
    kids.report(new, state="consuming")
    arbiter._read_child(new)
    assert new.state == "consuming"


def test_the_watchdog_is_fed_only_while_heartbeats_are_fresh(
    arbiter: Arbiter, kids: Kids, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = str(tmp_path / "notify.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setattr(sdnotify, "_last_sent", {})

    def heard() -> list[bytes]:
        got = []
        while True:
            try:
                got.append(sink.recv(4096))
            except BlockingIOError:
                return got

    child = kids.make(0, state="booting")
    arbiter.children[child.pid] = child
    monkeypatch.setattr(sdnotify, "_last_watchdog", 0.0)
    arbiter._notify_systemd()
    first = heard()
    assert b"WATCHDOG=1" in first and b"READY=1" not in first  # not consuming yet

    child.state = "consuming"
    child.last_beat = time.monotonic() - 6  # silent for longer than --heartbeat-timeout
    monkeypatch.setattr(sdnotify, "_last_watchdog", 0.0)
    arbiter._notify_systemd()
    stale = heard()
    assert b"READY=1" in stale and b"WATCHDOG=1" not in stale

    child.last_beat = time.monotonic()
    monkeypatch.setattr(sdnotify, "_last_watchdog", 0.0)
    arbiter._notify_systemd()
    assert heard() == [b"WATCHDOG=1"]  # STATUS is throttled to once a second
    sink.close()


def test_heartbeats_split_across_reads_are_reassembled_and_garbage_is_skipped(
    kids: Kids,
) -> None:
    child = kids.make(0)
    fd = kids.writers[child.pid]
    os.write(fd, b'{"state": "connecting"}\nnot json\n{"state": "cons')
    assert [b["state"] for b in child.read_heartbeats()] == ["connecting"]
    os.write(fd, b'uming", "slots": [{"alert_id": "a-1"}, {"alert_id": null}]}\n')
    assert [b["state"] for b in child.read_heartbeats()] == ["consuming"]
    assert child.state == "consuming" and child.in_flight_alert_ids() == ["a-1"]
    os.close(fd)
    kids.writers.pop(child.pid)
    assert child.read_heartbeats() == [] and child.eof
    child.close()


def test_a_child_recycling_before_a_single_alert_is_replaced_with_backoff_not_at_once(
    arbiter: Arbiter, kids: Kids,
) -> None:
    # --max-memory-per-child below a child's own size: every child would
    # recycle a second after it starts, for ever, each a fork and 2 helpers.
    for round_ in range(1, 4):
        arbiter._not_before.clear()
        arbiter.manage_children()
        child = arbiter.spawned[-1]  # type: ignore[attr-defined]
        kids.report(child, state="draining", recycling=True, counters=[])
        arbiter._read_child(child)
        assert not child.retiring  # no replacement while it drains
        arbiter.manage_children()
        assert len(arbiter.spawned) == round_  # type: ignore[attr-defined]
        del arbiter.children[child.pid]
        arbiter._on_exit(child, EXIT_RECYCLED)
    wait = arbiter._not_before[0] - time.monotonic()
    assert 1.5 < wait <= 2.0  # the third in a row: 0.5, 1, 2 s
    assert arbiter.aggregate.restarts == 0  # not a crash
    arbiter.manage_children()
    assert len(arbiter.spawned) == 3  # type: ignore[attr-defined]


def test_a_child_killed_by_a_real_time_signal_is_replaced_like_any_crash(
    arbiter: Arbiter, kids: Kids,
) -> None:
    # signal.Signals has names for SIGRTMIN and SIGRTMAX only: 40 has none.
    arbiter._on_exit(kids.make(0), -(signal.SIGRTMIN + 6))

    assert arbiter.aggregate.restarts == 1 and 0 in arbiter._not_before
