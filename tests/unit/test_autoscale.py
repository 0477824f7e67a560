"""Autoscaling without a fleet: the policy on a fake clock, the probe against dead brokers."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alertd import autoscale, queuedepth
from alertd.autoscale import AutoscalePolicy, Autoscaler, Decision, Sample
from alertd.config import Settings, from_options
from alertd.errors import ConfigError
from alertd.handle import MASTER_SIGNALS
from alertd.master import Arbiter
from tests.ports import free_port

INTERVAL = 5.0


def policy(low: int = 1, high: int = 4) -> AutoscalePolicy:
    # The defaults: grow after 3 samples, idle window 60 s, cooldown 15 s.
    return AutoscalePolicy(low, high, interval_s=INTERVAL, concurrency=2)


BACKLOG = Sample(ready=40, busy=2, slots=2)   # every slot busy, 40 waiting
IDLE = Sample(ready=0, busy=0, slots=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def feed(self, rule: AutoscalePolicy, sample: Sample | None, current: int
             ) -> Decision | None:
        self.now += INTERVAL
        return rule.observe(self.now, sample, current)


def test_a_backlog_grows_one_child_after_three_samples_and_a_single_spike_does_not() -> None:
    rule, clock = policy(), Clock()
    assert clock.feed(rule, BACKLOG, 1) is None
    assert clock.feed(rule, IDLE, 1) is None       # the spike is gone: the count restarts
    assert clock.feed(rule, BACKLOG, 1) is None
    assert clock.feed(rule, BACKLOG, 1) is None
    up = clock.feed(rule, BACKLOG, 1)
    assert up is not None and (up.direction, up.current, up.target) == ("up", 1, 2)
    assert "ready 40 > 0 free slots x 2 for 3 samples" in up.reason


def test_ready_messages_that_the_free_slots_can_absorb_do_not_grow_the_fleet() -> None:
    rule, clock = policy(high=8), Clock()
    some_free = Sample(ready=7, busy=4, slots=8)  # 7 ready <= 4 free x 2
    assert all(clock.feed(rule, some_free, 4) is None for _ in range(10))


def test_the_fleet_shrinks_only_after_the_queue_stayed_idle_for_the_whole_window() -> None:
    rule, clock = policy(), Clock()
    for _ in range(12):  # 11 intervals = 55 s of idleness since the first idle sample
        assert clock.feed(rule, Sample(0, 0, 6), 3) is None
    down = clock.feed(rule, Sample(0, 0, 6), 3)
    assert down is not None and (down.direction, down.target) == ("down", 2)
    assert down.reason == "queue empty and 0/6 slots busy for 60.0s"


def test_one_busy_sample_or_a_waiting_message_restarts_the_idle_window() -> None:
    rule, clock = policy(), Clock()
    for _ in range(11):
        clock.feed(rule, Sample(0, 0, 6), 3)
    # 3 busy slots would overload the 2 children left (limit: 2 x 2 x 0.5 = 2).
    assert clock.feed(rule, Sample(0, 3, 6), 3) is None
    assert clock.feed(rule, Sample(1, 0, 6), 3) is None
    for _ in range(12):
        assert clock.feed(rule, Sample(0, 2, 6), 3) is None
    assert clock.feed(rule, Sample(0, 2, 6), 3) is not None


def test_a_change_is_followed_by_a_cooldown_in_which_samples_do_not_count() -> None:
    rule, clock = policy(), Clock()
    for _ in range(3):
        decision = clock.feed(rule, BACKLOG, 1)
    assert decision is not None and decision.target == 2
    # Cooldown 15 s: the samples at +5 and +10 s are ignored, +15 s counts as the first.
    assert [clock.feed(rule, BACKLOG, 2) for _ in range(4)] == [None] * 4
    assert clock.feed(rule, BACKLOG, 2) is not None


def test_the_fleet_never_grows_above_max_nor_shrinks_below_min() -> None:
    rule, clock = policy(low=2, high=3), Clock()
    assert all(clock.feed(rule, BACKLOG, 3) is None for _ in range(20))
    assert all(clock.feed(rule, IDLE, 2) is None for _ in range(40))


def test_a_failed_sample_makes_no_decision_and_restarts_the_windows() -> None:
    rule, clock = policy(), Clock()
    clock.feed(rule, BACKLOG, 1)
    clock.feed(rule, BACKLOG, 1)
    assert clock.feed(rule, None, 1) is None
    assert clock.feed(rule, BACKLOG, 1) is None
    assert clock.feed(rule, BACKLOG, 1) is None
    assert clock.feed(rule, BACKLOG, 1) is not None
    for _ in range(12):
        clock.feed(rule, Sample(0, 0, 4), 2)
    assert clock.feed(rule, None, 2) is None   # would have been the 13th idle sample
    assert clock.feed(rule, Sample(0, 0, 4), 2) is None


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    ("0,2", "autoscale: must be MIN,MAX with 1 <= MIN <= MAX, got 0,2"),
    ("3,2", "autoscale: must be MIN,MAX with 1 <= MIN <= MAX, got 3,2"),
    ("4", "autoscale: must be MIN,MAX (e.g. 1,4), got '4'"),
    ("a,b", "autoscale: must be MIN,MAX (e.g. 1,4), got 'a,b'"),
])
def test_bad_autoscale_bounds_are_refused_naming_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        from_options({"autoscale": value}, webhook_secret=None)
    assert str(refused.value) == message


def test_workers_is_the_starting_count_clamped_into_the_bounds() -> None:
    def start(workers: int, bounds: str) -> int:
        return from_options({"workers": workers, "autoscale": bounds},
                            webhook_secret=None).workers
    assert (start(1, "2,4"), start(3, "2,4"), start(9, "2,4")) == (2, 3, 4)
    assert from_options({"autoscale": ""}, webhook_secret=None).autoscale is None


# -- the probe process ---------------------------------------------------------------------


@pytest.fixture()
def silent_broker() -> Iterator[str]:
    """A TCP port that accepts connections and never says a word (a stalled broker)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}/%2F"


def run_until_answered(scaler: Autoscaler, selector: selectors.BaseSelector,
                       load: tuple[int, int] | None = (0, 2)) -> tuple[float, int]:
    """Tick like the master until a sample was taken; (slowest tick, ticks)."""
    slowest, ticks, failures = 0.0, 0, scaler.failures
    while scaler.failures == failures and scaler.sampled_at is None:
        started = time.monotonic()
        for key, mask in selector.select(0.05):
            key.data(mask)
        with_pid = _reap()
        if with_pid:
            scaler.reaped(with_pid)
        scaler.poll(time.monotonic(), 1, load, list)
        slowest, ticks = max(slowest, time.monotonic() - started), ticks + 1
        assert ticks < 400, "no answer within 20 s"
    return slowest, ticks


def _reap() -> int:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return 0
    return pid


def test_a_hung_probe_is_killed_and_the_master_never_waits_for_it(
    silent_broker: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queuedepth, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(queuedepth, "STACK_TIMEOUT_S", 30.0)  # only the kill can end it
    selector = selectors.DefaultSelector()
    scaler = Autoscaler(Settings(amqp_url=silent_broker, autoscale=(1, 4)), selector)
    try:
        slowest, _ = run_until_answered(scaler, selector)
    finally:
        scaler.close()
    assert slowest < 0.2, f"a tick took {slowest:.2f}s"
    assert scaler.failures == 1 and scaler.ready is None
    assert scaler.last_error == "no answer within 0.5s"
    assert scaler.last_decision is None
    assert selector.get_map() == {}  # the pipe is unregistered and closed


def scaler_of_an_unreachable_broker(selector: selectors.BaseSelector) -> Autoscaler:
    """An autoscaler whose broker address is a loopback port nobody listens on."""
    return Autoscaler(Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F",
                               autoscale=(1, 4)), selector)


def test_an_unreachable_broker_is_a_failed_sample_not_a_crash() -> None:
    selector = selectors.DefaultSelector()
    scaler = scaler_of_an_unreachable_broker(selector)
    try:
        run_until_answered(scaler, selector)
    finally:
        scaler.close()
    assert scaler.failures == 1
    assert scaler.last_error is not None and "cannot connect to the broker" in scaler.last_error


def test_no_probe_runs_while_the_fleet_is_not_settled(silent_broker: str) -> None:
    scaler = Autoscaler(Settings(amqp_url=silent_broker, autoscale=(1, 4)),
                        selectors.DefaultSelector())
    assert scaler.poll(time.monotonic(), 1, None, list) is None
    assert scaler.fds() == []


# -- the master --------------------------------------------------------------------------


@pytest.fixture()
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in MASTER_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_children_forked_while_a_probe_runs_close_its_pipe(silent_broker: str) -> None:
    arbiter = Arbiter(Settings(amqp_url=silent_broker, autoscale=(1, 4)))
    assert arbiter.autoscaler is not None
    try:
        arbiter.autoscaler.poll(time.monotonic(), 1, (0, 2), list)
        probe_fds = arbiter.autoscaler.fds()
        assert len(probe_fds) == 1 and set(probe_fds) <= set(arbiter._master_fds())
    finally:
        arbiter.autoscaler.close()


def test_a_decision_sets_the_target_and_is_counted(
    silent_broker: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    arbiter = Arbiter(Settings(amqp_url=silent_broker, autoscale=(1, 4), workers=2))
    assert arbiter.autoscaler is not None and arbiter.num_workers == 2
    monkeypatch.setattr(arbiter.autoscaler, "poll",
                        lambda *a: Decision("up", 2, 3, "ready 9 > 0 free slots"))
    arbiter.autoscale()
    assert arbiter.num_workers == 3 and arbiter.aggregate.scaling["up"] == 1
    arbiter.handle_ttin()
    arbiter.handle_ttin()
    assert arbiter.num_workers == 4  # TTIN stays within MAX


def test_the_pidfile_written_at_start_is_removed_even_if_a_reload_renamed_it(
    tmp_path: Path, restore_signals: None,
) -> None:
    first, second = tmp_path / "first.pid", tmp_path / "second.pid"
    arbiter = Arbiter(Settings(pidfile=str(first)),
                      reload=lambda: Settings(pidfile=str(second)))
    arbiter._setup()
    assert first.read_text() == f"{os.getpid()}\n"
    arbiter.handle_hup()
    assert arbiter.settings.pidfile == str(second)
    arbiter._teardown()
    assert not first.exists() and not second.exists()


def test_the_defaults_scale_with_the_interval() -> None:
    rule = AutoscalePolicy(1, 4, interval_s=2.0, concurrency=8)
    assert (rule.grow_after, rule.cooldown_s, rule.idle_s) == (
        autoscale.GROW_AFTER_SAMPLES, 6.0, 24.0)


def test_a_finished_probe_leaves_the_selector_even_if_nobody_polls() -> None:
    selector = selectors.DefaultSelector()
    scaler = scaler_of_an_unreachable_broker(selector)
    scaler.poll(time.monotonic(), 1, (0, 2), list)
    try:
        # A stopping master selects but no longer polls: the EOF must not keep it busy.
        deadline = time.monotonic() + 10
        while selector.get_map() and time.monotonic() < deadline:
            for key, mask in selector.select(0.1):
                key.data(mask)
        assert not selector.get_map() and scaler.fds() == []
    finally:
        scaler.close()


def test_a_reload_keeps_the_autoscaled_size_clamped_into_the_new_bounds(
    silent_broker: str,
) -> None:
    new = Settings(amqp_url=silent_broker, autoscale=(2, 3), workers=2)
    arbiter = Arbiter(Settings(amqp_url=silent_broker, autoscale=(1, 4), workers=1),
                      reload=lambda: new)
    arbiter.num_workers = 4
    arbiter.handle_hup()
    assert arbiter.num_workers == 3 and arbiter.autoscaler is not None
    assert (arbiter.autoscaler.low, arbiter.autoscaler.high) == (2, 3)
    arbiter.handle_ttou()
    arbiter.handle_ttou()
    assert arbiter.num_workers == 2  # TTOU stays within MIN
