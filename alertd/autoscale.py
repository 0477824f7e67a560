"""Autoscale on a VM: how many children to run, from the queue's depth and the busy slots.

How the depth is read, and why that way. The master must stay thread-free,
must not block its select loop for long, and must not carry sockets into the
children it forks. Three designs were weighed:

(a) a blocking pika connection from the master every few seconds, with 2 s
    timeouts: simple, but a broker that accepts TCP and then stalls freezes
    every tick (heartbeats, reaping, signals, /healthz) for up to the timeout,
    each time it samples, for as long as the broker is sick;
(b) a short-lived forked process per sample (:mod:`alertd.queuedepth`) that
    does the passive ``queue.declare`` on its own connection and writes the
    count back over a pipe registered in the master's selector;
(c) a non-blocking AMQP state machine inside the master: bounded, but a
    second AMQP client to write and maintain.

alertd uses (b). The master only forks (it has no threads, so fork is safe
at any tick) and reads one line when the selector says so; its worst case is
a fork per interval. The socket lives and dies in the probe, so no child
ever inherits one, and the probe's pipe is closed in every child forked
while a probe runs. A probe that does not answer in 5 s is SIGKILLed. A
failed sample (broker down, queue missing, probe killed, fork refused) is
logged once, counted, and makes no decision. Probes run only while the fleet
is settled (every child consuming), so a fleet that is booting, or
reconnecting through an outage, costs no forks.

The policy (:class:`AutoscalePolicy`) is pure: fed samples and a monotonic
clock, it grows one child after ``grow_after`` consecutive samples whose
ready messages exceed the free slots x ``backlog_per_free_slot``, shrinks one
after the queue has been empty, and the slots little used, for the idle
window, and then keeps still for a cooldown. It never leaves MIN..MAX. The
master feeds it no sample while stopping, during a HUP rollover or while a
child is not consuming, which resets its windows like a failed sample.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alertd.config import Settings
from alertd.queuedepth import DepthProbe

if TYPE_CHECKING:
    from alertd.handle import ChildHandle

log = logging.getLogger(__name__)

GROW_AFTER_SAMPLES = 3
COOLDOWN_SAMPLES = 3
IDLE_WINDOW_SAMPLES = 12
BACKLOG_PER_FREE_SLOT = 2.0
# Shrink only if the children left would be at most this busy.
SHRINK_MAX_UTILISATION = 0.5


@dataclass(frozen=True, slots=True)
class Sample:
    ready: int  # messages ready in the queue (not yet delivered to any child)
    busy: int   # slots running an alert, from the children's heartbeats
    slots: int  # slots of the consuming children

    @property
    def free(self) -> int:
        return max(0, self.slots - self.busy)


@dataclass(frozen=True, slots=True)
class Decision:
    direction: str  # "up" or "down"
    current: int
    target: int
    reason: str


class AutoscalePolicy:
    """Turns samples into at most one step up or down, with hysteresis and a cooldown."""

    def __init__(self, low: int, high: int, *, interval_s: float, concurrency: int,
                 grow_after: int = GROW_AFTER_SAMPLES,
                 idle_s: float | None = None, cooldown_s: float | None = None,
                 backlog_per_free_slot: float = BACKLOG_PER_FREE_SLOT,
                 shrink_max_utilisation: float = SHRINK_MAX_UTILISATION) -> None:
        self.low, self.high = low, high
        self.concurrency = concurrency
        self.grow_after = grow_after
        self.idle_s = IDLE_WINDOW_SAMPLES * interval_s if idle_s is None else idle_s
        self.cooldown_s = COOLDOWN_SAMPLES * interval_s if cooldown_s is None else cooldown_s
        self.backlog_per_free_slot = backlog_per_free_slot
        self.shrink_max_utilisation = shrink_max_utilisation
        self._pressed = 0                  # consecutive samples with a backlog
        self._idle_since: float | None = None
        self._quiet_until = float("-inf")  # end of the cooldown

    def observe(self, now: float, sample: Sample | None, current: int) -> Decision | None:
        """One sample (None: failed or not meaningful) with ``current`` children wanted."""
        if sample is None or now < self._quiet_until:
            # A gap or a fleet still adjusting: the windows start again after it.
            self._pressed, self._idle_since = 0, None
            return None
        backlog = sample.ready > 0 and sample.ready > sample.free * self.backlog_per_free_slot
        self._pressed = self._pressed + 1 if backlog else 0
        idle = (sample.ready == 0 and sample.busy
                <= (current - 1) * self.concurrency * self.shrink_max_utilisation)
        if not idle:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        if self._pressed >= self.grow_after and current < self.high:
            return self._decide(now, "up", current, current + 1, (
                f"ready {sample.ready} > {sample.free} free slots x "
                f"{self.backlog_per_free_slot:g} for {self._pressed} samples, "
                f"{sample.busy}/{sample.slots} slots busy"))
        if (self._idle_since is not None and now - self._idle_since >= self.idle_s
                and current > self.low):
            return self._decide(now, "down", current, current - 1, (
                f"queue empty and {sample.busy}/{sample.slots} slots busy for "
                f"{now - self._idle_since:.1f}s"))
        return None

    def _decide(self, now: float, direction: str, current: int, target: int,
                reason: str) -> Decision:
        self._pressed, self._idle_since = 0, None
        self._quiet_until = now + self.cooldown_s
        return Decision(direction, current, target, reason)


def fleet_load(children: Iterable[ChildHandle], concurrency: int) -> tuple[int, int]:
    """(busy, slots) of the children that take new work: consuming and not retiring."""
    taking = [c for c in children if c.state == "consuming" and not c.retiring]
    busy = sum(len(c.last_report.get("slots", [])) for c in taking)
    return busy, concurrency * len(taking)


class Autoscaler:
    """The master's side: a probe per interval, each answer a sample for the policy.

    Contract with the master: register nothing itself but the probe's pipe in
    ``selector``; the master passes :meth:`fds` to every fork, calls
    :meth:`reaped` for each pid it reaps that is not a child, :meth:`poll`
    once per tick, and :meth:`close` at exit.
    """

    def __init__(self, settings: Settings, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._probe: DepthProbe | None = None
        self._next_probe_at = 0.0
        self.ready: int | None = None        # last sampled ready count; None after a failure
        self.sampled_at: float | None = None
        self.failures = 0
        self.last_error: str | None = None
        self.last_decision: str | None = None
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """At start and on HUP: the bounds and interval of ``settings``; windows restart."""
        assert settings.autoscale is not None
        self.settings = settings
        self.low, self.high = settings.autoscale
        self.policy = AutoscalePolicy(self.low, self.high,
                                      interval_s=settings.autoscale_interval,
                                      concurrency=settings.concurrency)

    def clamp(self, count: int) -> int:
        return min(self.high, max(self.low, count))

    def fds(self) -> list[int]:
        probe = self._probe
        return [probe.read_fd] if probe is not None and not probe.closed else []

    def reaped(self, pid: int) -> None:
        if self._probe is not None and self._probe.pid == pid:
            self._probe.reaped = True  # its pid may be reused: never signal it again

    def poll(self, now: float, current: int, load: tuple[int, int] | None,
             fds_to_close: Callable[[], list[int]]) -> Decision | None:
        """Start a probe when due; turn a finished one into a sample and maybe a decision.

        ``load`` is :func:`fleet_load`, or None when the fleet is not settled.
        """
        probe = self._probe
        if probe is not None and probe.overdue(now):
            probe.kill()
        if probe is not None and probe.done:
            self._end_probe()
            return self._sample(now, probe.ready, probe.error, current, load)
        # Only a settled fleet is sampled: any other sample could decide nothing, and
        # while children boot or reconnect the broker is the children's business.
        if probe is None and load is not None and now >= self._next_probe_at:
            self._next_probe_at = now + self.settings.autoscale_interval
            try:
                started = DepthProbe.spawn(self.settings, close_in_child=fds_to_close())
            except OSError as exc:
                return self._sample(now, None, f"cannot fork a probe: {exc}", current, load)
            self._probe = started
            self._selector.register(started.read_fd, selectors.EVENT_READ,
                                    lambda mask: self._on_readable(started))
        return None

    def _sample(self, now: float, ready: int | None, error: str | None, current: int,
                load: tuple[int, int] | None) -> Decision | None:
        self.ready = ready
        if ready is None:
            self.failures += 1
            # Once per outage at warning level: a broker down for an hour is one line.
            log.log(logging.DEBUG if self.last_error else logging.WARNING,
                    "autoscale: queue sample failed, no decision until one works: %s", error)
            self.last_error = error
            self.policy.observe(now, None, current)
            return None
        if self.last_error is not None:
            log.info("autoscale: queue samples work again (%d ready)", ready)
            self.last_error = None
        self.sampled_at = now
        sample = None if load is None else Sample(ready, *load)
        decision = self.policy.observe(now, sample, current)
        if decision is not None:
            self.last_decision = (f"{decision.direction} {decision.current} -> "
                                  f"{decision.target}: {decision.reason}")
        return decision

    def _on_readable(self, probe: DepthProbe) -> None:
        probe.read()
        if probe.done:
            # At once, not at the next poll: an EOF stays readable, and a master
            # that stops polling (stopping) must not spin on it.
            self._release(probe)

    def _release(self, probe: DepthProbe) -> None:
        if probe.closed:  # its fd number may be someone else's registration by now
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(probe.read_fd)
        probe.close()

    def _end_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            self._release(probe)

    def close(self) -> None:
        """At exit: a probe still running is killed and reaped, not left behind."""
        probe = self._probe
        if probe is not None:
            probe.kill()
            if not probe.reaped:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(probe.pid, 0)
            self._end_probe()
