"""The master: pre-forks children, supervises them from one small explicit loop.

Signal handlers only enqueue the signal and wake the loop (self-pipe). Each
tick the loop dispatches one signal to ``handle_<name>``, reads heartbeats,
reaps dead children, kills hung ones and spawns missing ones. The master has
no threads and no event loop, so ``fork()`` is safe at any tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable

from alertd import sdnotify
from alertd.aggregate import Aggregate
from alertd.autoscale import Autoscaler, fleet_load
from alertd.config import Settings
from alertd.errors import AlertdError
from alertd.exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_RECYCLED, signal_name
from alertd.handle import MASTER_SIGNALS, ChildHandle, reopen_log_files
from alertd.statusview import MasterViews

log = logging.getLogger(__name__)

HANDLED_SIGNALS = MASTER_SIGNALS
TICK_S = 0.25
KILL_AFTER_ABORT_S = 5.0
RESTART_BACKOFF_FIRST_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A child that consumed for this long has proven itself: its slot's backoff resets.
STABLE_AFTER_S = 10.0
ROLLOVER_STALL_S = 60.0
SUMMARY_EVERY_S = 60.0
FORK_RETRY_S = 1.0


def restart_delay(failures: int) -> float:
    """Backoff before replacing a child after its ``failures``-th crash in a row."""
    return float(min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_FIRST_S * 2 ** (failures - 1)))


class Arbiter:
    """Decides how many children run, which to replace, and when the master stops."""

    def __init__(self, settings: Settings, *, reload: Callable[[], Settings] | None = None,
                 control_socket: str | None = None) -> None:
        self.settings = settings
        self.num_workers = settings.workers
        self._reload = reload
        self._control_path = control_socket
        self.children: dict[int, ChildHandle] = {}
        self.generation = 0
        self.aggregate = Aggregate()
        self.signals: list[int] = []
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.exit_code = EXIT_OK
        self.started = time.monotonic()
        self._stop_deadline = 0.0
        self._failures: dict[int, int] = {}     # slot index -> consecutive crashes
        self._not_before: dict[int, float] = {}  # slot index -> earliest respawn
        self._replacing: dict[int, int] = {}    # new pid -> old pid (HUP rollover)
        # HUP: what to go back to if a new child refuses the reloaded config.
        self._before_reload: tuple[Settings, int, int] | None = None
        self._stall_logged: set[int] = set()     # replacements reported as not consuming
        self._ready_sent = False
        self._last_summary = time.monotonic()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self.views: MasterViews | None = None
        self.autoscaler = Autoscaler(settings, self._selector) if settings.autoscale else None
        self._pidfile: str | None = None  # the one written at start, whatever HUP says

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        try:
            self._setup()
            while True:
                self._tick()
                if self.stopping and not self.children:
                    break
        finally:
            self._teardown()
        log.info("master exiting with code %d", self.exit_code)
        return self.exit_code

    def _setup(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeups)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._enqueue_signal)
        self.views = MasterViews(self, self._selector, self.settings, self._control_path)
        if self.settings.pidfile:
            try:
                _write_pidfile(self.settings.pidfile)
            except OSError as exc:
                raise AlertdError(f"pidfile: cannot write {self.settings.pidfile}: "
                                  f"{exc.strerror or exc}") from None
            self._pidfile = self.settings.pidfile
        log.info("master pid %d starting %d children x %d slots%s", os.getpid(),
                 self.num_workers, self.settings.concurrency,
                 f", autoscaling {self.autoscaler.low}..{self.autoscaler.high}"
                 if self.autoscaler else "")
        _warn_if_unsigned(self.settings)

    def _teardown(self) -> None:
        sdnotify.notify("STOPPING=1")
        if self.views is not None:
            self.views.close()
        if self.autoscaler is not None:
            self.autoscaler.close()
        if self._pidfile:
            _remove_pidfile(self._pidfile)

    def _tick(self) -> None:
        # Signals still queued are handled one per tick, without waiting a tick.
        for key, mask in self._selector.select(0 if self.signals else TICK_S):
            key.data(mask)
        if self.signals:
            self._dispatch(self.signals.pop(0))
        self.reap()
        self.murder_hung()
        if self.stopping:
            self._enforce_stop_deadline()
        else:
            self.manage_children()
            self.autoscale()
        self._notify_systemd()
        if self.views is not None:
            self.views.expire()
        self._log_summary()

    # -- signals ---------------------------------------------------------------

    def _enqueue_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD and len(self.signals) < 16:
            self.signals.append(signum)
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.write(self._wake_w, b".")

    def _drain_wakeups(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._wake_r, 512):
                pass

    def _dispatch(self, signum: int) -> None:
        name = signal.Signals(signum).name.removeprefix("SIG").lower()
        handler = getattr(self, f"handle_{name}", None)
        if handler is not None:
            handler()

    def handle_term(self) -> None:
        if self.stopping:
            self.handle_quit()
            return
        log.info("graceful stop: children finish in-flight alerts within %.0fs",
                 self.settings.graceful_timeout)
        self.stopping = "graceful"
        self._stop_deadline = time.monotonic() + self.settings.graceful_timeout + 15
        sdnotify.notify("STOPPING=1")
        for child in self.children.values():
            # A retiring child already drains (it got TERM, or it recycles);
            # a second TERM would make it stop fast and requeue its alerts.
            if not child.retiring:
                child.signal(signal.SIGTERM)

    handle_int = handle_term

    def handle_quit(self) -> None:
        log.info("fast stop: unacked alerts go back to the broker")
        self.stopping = "fast"
        self._stop_deadline = time.monotonic() + 10
        sdnotify.notify("STOPPING=1")
        for child in self.children.values():
            child.signal(signal.SIGQUIT)

    def handle_hup(self) -> None:
        if self.stopping:
            return
        if self._reload is not None:
            try:
                new = self._reload()
            except Exception as exc:
                log.error("reload refused, keeping the running config: %s", exc)
                return
            previous = self.num_workers
            if self._before_reload is None:  # else a rollover is still going: keep its origin
                self._before_reload = (self.settings, previous, self.generation)
            self.settings = new
            self.num_workers = new.workers
            self._reconfigure_autoscale(new, previous)
            if new.pidfile != self._pidfile:
                log.warning("pidfile: a change takes effect at the next start; %s stays",
                            self._pidfile)
            _warn_if_unsigned(new)
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        self._ready_sent = False
        self.generation += 1
        log.info("reload: replacing children one by one (generation %d)", self.generation)

    def handle_ttin(self) -> None:
        if self.stopping:
            return
        self.num_workers = self._bounded(self.num_workers + 1)
        log.info("TTIN: %d children", self.num_workers)

    def handle_ttou(self) -> None:
        if self.stopping:
            return
        self.num_workers = self._bounded(self.num_workers - 1)
        log.info("TTOU: %d children", self.num_workers)

    def handle_usr1(self) -> None:
        # Logs go to stderr (journald or the container runtime), which has no
        # file to reopen; file handlers, ours and the children's, are reopened.
        reopen_log_files()
        for child in self.children.values():
            child.signal(signal.SIGUSR1)

    # -- supervision -------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                if self.autoscaler is not None:
                    self.autoscaler.reaped(pid)
                continue
            # Its last heartbeats may still be in the pipe: they carry the
            # final counters (totals) and what was in flight when it died.
            self._read_child(child)
            self._forget(child)
            code = os.waitstatus_to_exitcode(status)
            self._on_exit(child, code)

    def _on_exit(self, child: ChildHandle, code: int) -> None:
        self.aggregate.child_gone(child.pid)
        in_flight = child.in_flight_alert_ids()
        how = f"exit code {code}" if code >= 0 else f"signal {signal_name(-code)}"
        if code == EXIT_RECYCLED:
            how += ", recycled"
        planned = child.retiring or self.stopping
        level = logging.INFO if planned or code in (EXIT_OK, EXIT_RECYCLED) else logging.ERROR
        log.log(level, "child %d pid %d ended (%s)%s", child.index, child.pid, how,
                f"; in flight, to be redelivered: {in_flight}" if in_flight and not planned
                else "")
        if code == EXIT_CONFIG and not self.stopping:
            if self._before_reload is not None and child.generation == self.generation:
                self._roll_back(child)
                return
            if not any(c.state == "consuming" for c in self.children.values()):
                log.error("a child refused the configuration: halting (exit %d)", EXIT_CONFIG)
                self.exit_code = EXIT_CONFIG
                self.handle_term()
                return
            # The others run and consume: halting them all would turn one
            # child's refusal (a database migrated by a newer release) into an
            # outage. Its slot waits out the crash backoff like any crash.
            log.error("child %d refused the configuration; the %d consuming children keep "
                      "running, and it is retried with backoff", child.index,
                      sum(c.state == "consuming" for c in self.children.values()))
        if planned:
            return
        if code == EXIT_RECYCLED:
            if child.processed:
                return  # replaced at once (its replacement may run already)
            # It recycled before a single alert (a memory limit below a
            # child's own size): so will the next one, at once. Back off as
            # after a crash, or the fleet forks children without end.
            self._back_off(child, "recycled before a single alert")
            return
        self.aggregate.count_restart(child.index)
        self._back_off(child, "crash")

    def _back_off(self, child: ChildHandle, what: str) -> None:
        if child.consumed_for() >= STABLE_AFTER_S:
            self._failures[child.index] = 0
        failures = self._failures.get(child.index, 0) + 1
        self._failures[child.index] = failures
        delay = restart_delay(failures)
        self._not_before[child.index] = time.monotonic() + delay
        log.warning("child %d will be replaced in %.1fs (%s %d in a row)",
                    child.index, delay, what, failures)

    def _roll_back(self, child: ChildHandle) -> None:
        """A child of the reloaded config refused it: back to the config before the HUP.

        The children still on that config become current again; any that
        already run the refused one are replaced one by one, like a HUP.
        """
        assert self._before_reload is not None
        settings, workers, kept = self._before_reload
        self._before_reload = None
        log.error("reload refused: child %d of generation %d exited %d (bad configuration); "
                  "going back to the configuration before the HUP", child.index,
                  child.generation, EXIT_CONFIG)
        previous = self.num_workers
        self.settings = settings
        self.num_workers = workers
        self._reconfigure_autoscale(settings, previous)
        self.generation += 1
        for other in self.children.values():
            if other.generation <= kept:
                other.generation = self.generation

    def murder_hung(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.killed_at is not None:
                if now - child.killed_at > KILL_AFTER_ABORT_S:
                    child.signal(signal.SIGKILL)
                continue
            silent = now - child.last_beat
            if silent > self.settings.heartbeat_timeout:
                log.error("child %d pid %d hung: no heartbeat for %.1fs; killing it; "
                          "in flight, to be redelivered: %s", child.index, child.pid, silent,
                          child.in_flight_alert_ids())
                child.killed_at = now
                self.aggregate.count_hung()
                child.signal(signal.SIGABRT)
                # A stopped child (SIGSTOP, a debugger detached) would hold the
                # abort pending until SIGKILL; let it act on it now.
                child.signal(signal.SIGCONT)

    def manage_children(self) -> None:
        active = [c for c in self.children.values() if not c.retiring]
        present = {c.index for c in active}
        now = time.monotonic()
        for index in range(self.num_workers):
            if index not in present and now >= self._not_before.get(index, 0.0):
                self._try_spawn(index)
        # Fewer children (TTOU, autoscale): retire the extra ones once every
        # remaining slot consumes, not while one waits out a crash backoff.
        serving = {c.index for c in active if c.state == "consuming"}
        if serving.issuperset(range(self.num_workers)):
            for child in active:
                if child.index >= self.num_workers:
                    self.retire(child)
        self._forget_gone_slots()
        self._roll_over(active)

    def _forget_gone_slots(self) -> None:
        """A slot beyond the fleet's size whose last child has exited is gone: its
        restart count goes with it, so a slot the fleet grows into later starts at 0."""
        held = {c.index for c in self.children.values()}
        for index in list(self.aggregate.slot_restarts):
            if index >= self.num_workers and index not in held:
                self.aggregate.slot_gone(index)

    def _roll_over(self, active: list[ChildHandle]) -> None:
        """HUP: one child at a time, the new one consuming before the old one drains."""
        now = time.monotonic()
        for new_pid, old_pid in list(self._replacing.items()):
            new, old = self.children.get(new_pid), self.children.get(old_pid)
            if new is None or old is None:
                del self._replacing[new_pid]
            elif new.state == "consuming":
                del self._replacing[new_pid]
                self.retire(old)
            elif new.generation < self.generation:
                # A later HUP came before it consumed (a config it cannot run
                # with: a wrong vhost, an unreachable host): it goes, the old
                # child stays until the new generation's replacement consumes.
                del self._replacing[new_pid]
                self.retire(new)
            elif now - new.started > ROLLOVER_STALL_S and new_pid not in self._stall_logged:
                self._stall_logged.add(new_pid)
                log.error("reload: child %d pid %d (generation %d) is not consuming after "
                          "%.0fs; child %d pid %d keeps serving. Fix the config and send "
                          "HUP again", new.index, new.pid, new.generation, now - new.started,
                          old.index, old.pid)
        if self._replacing:
            return
        if not any(c.generation < self.generation for c in self.children.values()):
            self._before_reload = None  # the rollover is done: that config is the one
            self._stall_logged.clear()
        for child in active:
            # ``active`` predates the retire() above: a child retired there
            # already has its successor and must not get a second one.
            # A replacement that crashed waits out its slot's backoff like any
            # other, or a config that crashes children would fork-loop here.
            if (child.generation < self.generation and child.index < self.num_workers
                    and not child.retiring
                    and now >= self._not_before.get(child.index, 0.0)):
                new = self._try_spawn(child.index)
                if new is not None:
                    self._replacing[new.pid] = child.pid
                return

    def _try_spawn(self, index: int) -> ChildHandle | None:
        try:
            return self.spawn(index)
        except OSError as exc:  # EAGAIN, ENOMEM: the children we have keep working
            log.error("cannot fork child %d: %s; retrying in %.0fs", index, exc,
                      FORK_RETRY_S)
            self._not_before[index] = time.monotonic() + FORK_RETRY_S
            return None

    def spawn(self, index: int) -> ChildHandle:
        child = ChildHandle.spawn(self.settings, index, self.generation,
                                  close_in_child=self._master_fds())
        self.children[child.pid] = child
        self._selector.register(child.read_fd, selectors.EVENT_READ,
                                lambda mask, c=child: self._read_child(c))
        log.info("spawned child %d pid %d (generation %d)", index, child.pid, self.generation)
        return child

    def _master_fds(self) -> list[int]:
        """What a forked process (child or queue probe) must close: the master's own fds."""
        fds = [self._wake_r, self._wake_w, self._selector.fileno()]
        # Open ones only: a closed fd's number may be the new child's own pipe end.
        fds += [c.read_fd for c in self.children.values() if not c.eof]
        if self.views is not None:
            fds += self.views.fds()
        if self.autoscaler is not None:
            fds += self.autoscaler.fds()
        return fds

    def retire(self, child: ChildHandle) -> None:
        if not child.retiring:
            log.info("retiring child %d pid %d (graceful)", child.index, child.pid)
            child.retiring = True
            child.signal(signal.SIGTERM)

    # -- autoscaling -------------------------------------------------------------

    def autoscale(self) -> None:
        if self.autoscaler is None:
            return
        decision = self.autoscaler.poll(time.monotonic(), self.num_workers,
                                        self._settled_load(), self._master_fds)
        if decision is not None:
            log.info("autoscale %s: %d -> %d children (%s)", decision.direction,
                     decision.current, decision.target, decision.reason)
            self.aggregate.count_scaling(decision.direction)
            self.num_workers = decision.target

    def _settled_load(self) -> tuple[int, int] | None:
        """Busy and total slots; None while the fleet changes (boot, crash, HUP rollover)."""
        active = [c for c in self.children.values() if not c.retiring]
        if self._replacing or len(active) != self.num_workers or any(
                c.state != "consuming" or c.generation < self.generation for c in active):
            return None
        return fleet_load(active, self.settings.concurrency)

    def _reconfigure_autoscale(self, new: Settings, previous: int) -> None:
        """HUP: an autoscaled fleet keeps its size (``previous``), clamped into new bounds."""
        if new.autoscale is None:
            if self.autoscaler is not None:
                self.autoscaler.close()
                self.autoscaler = None
            return
        if self.autoscaler is None:
            self.autoscaler = Autoscaler(new, self._selector)
        else:
            self.autoscaler.configure(new)
        self.num_workers = self.autoscaler.clamp(previous)

    def _bounded(self, count: int) -> int:
        return self.autoscaler.clamp(count) if self.autoscaler is not None else max(1, count)

    def _read_child(self, child: ChildHandle) -> None:
        for beat in child.read_heartbeats():
            self.aggregate.add(child.pid, beat)
        if (child.recycling and not child.retiring and not self.stopping
                and child.processed):
            # It drains, then exits EXIT_RECYCLED: its slot need not wait for
            # that. (One that recycles before its first alert waits for its
            # exit and a backoff: see _on_exit.)
            log.info("child %d pid %d recycles: starting its replacement now",
                     child.index, child.pid)
            child.retiring = True
        if child.eof:
            self._forget(child)

    def _forget(self, child: ChildHandle) -> None:
        # Once only: a child whose pipe hit EOF is forgotten when it is read,
        # and again when it is reaped. By then its fd number may belong to a
        # new child's pipe (a recycled child's replacement is spawned before
        # the old one exits); unregistering it again would leave the new
        # child unread: no counters, and killed as hung.
        if child.closed:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(child.read_fd)
        child.close()

    def _enforce_stop_deadline(self) -> None:
        if time.monotonic() > self._stop_deadline:
            for child in self.children.values():
                log.error("child %d pid %d did not stop in time: SIGKILL", child.index, child.pid)
                child.signal(signal.SIGKILL)
            self._stop_deadline = time.monotonic() + 5

    # -- reporting ---------------------------------------------------------------

    def all_consuming(self) -> bool:
        active = [c for c in self.children.values() if not c.retiring]
        return len(active) >= self.num_workers and all(c.state == "consuming" for c in active)

    def heartbeats_fresh(self) -> bool:
        now = time.monotonic()
        return all(now - c.last_beat <= self.settings.heartbeat_timeout
                   for c in self.children.values())

    def _notify_systemd(self) -> None:
        if not sdnotify.enabled() or self.stopping:
            return
        if not self._ready_sent and self.all_consuming() and not self._replacing:
            sdnotify.notify("READY=1")
            self._ready_sent = True
        if self.heartbeats_fresh():
            sdnotify.notify_watchdog()
        sdnotify.notify(f"STATUS={self.aggregate.status_line(self.children.values())}",
                        throttle_s=1.0)

    def _log_summary(self) -> None:
        now = time.monotonic()
        if now - self._last_summary >= SUMMARY_EVERY_S:
            self._last_summary = now
            log.info("%s", self.aggregate.summary(self.children.values(), SUMMARY_EVERY_S))


def _warn_if_unsigned(settings: Settings) -> None:
    """Receivers cannot tell alertd's webhooks from forgeries without a secret: say so."""
    if not settings.webhook_secrets:
        log.warning("no webhook secret (ALERTD_WEBHOOK_SECRET or webhook_secret in the config "
                    "file): webhooks are sent without a webhook-signature header")


def _remove_pidfile(path: str) -> None:
    """Remove the pidfile if it still names this process (another may have written it since)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as fh:
            if int(fh.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)


def _write_pidfile(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    os.replace(tmp, path)

