"""CPU and memory from /proc: alertd's whole process tree, the broker, the database, the machine.

CPU of a tree is utime + stime + cutime + cstime of every live process in it
(fields 14-17 of /proc/<pid>/stat): live PyAV helpers count through their
own stat, and every ffprobe that already exited through the cutime/cstime of
the child that reaped it. A difference of two samples is the CPU the tree
used between them.

The broker is the RabbitMQ server's process tree (not the rabbitmqctl VMs
that come and go). The database is PostgreSQL's postmaster and background
processes plus the backends of the run's own database: other test suites on
the same server are left out (so are backends that exited in the window).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DATABASE_COMMS = {"postgres", "postmaster"}


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    starttime: int  # clock ticks after boot: with the pid, names one process for good
    own_ticks: int  # user + system
    reaped_ticks: int  # of the children it waited for
    rss_pages: int

    @property
    def cpu_ticks(self) -> int:
        return self.own_ticks + self.reaped_ticks


def scan() -> dict[int, Proc]:
    """Every process visible now (those that vanish while we read are skipped)."""
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        # fields[0] is field 3 (state): utime..cstime are 14-17, starttime 22, rss 24.
        procs[int(entry.name)] = Proc(
            pid=int(entry.name), ppid=int(fields[1]), comm=comm, starttime=int(fields[19]),
            own_ticks=int(fields[11]) + int(fields[12]),
            reaped_ticks=int(fields[13]) + int(fields[14]), rss_pages=int(fields[21]))
    return procs


def descendants(procs: dict[int, Proc], root: int) -> set[int]:
    """``root`` and everything below it."""
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def broker_cpu_s(procs: dict[int, Proc]) -> float:
    """The RabbitMQ server (beam.smp started with ``-s rabbit``) and its descendants."""
    servers = [p for p in procs.values()
               if p.comm == "beam.smp" and " -s rabbit " in _cmdline(p.pid)]
    pids = set().union(*(descendants(procs, p.pid) for p in servers)) if servers else set()
    return sum(procs[p].cpu_ticks for p in pids) / CLOCK_TICKS


def database_cpu_s(procs: dict[int, Proc], database: str | None) -> float:
    """PostgreSQL's own processes and the backends of ``database`` (their own CPU only)."""
    ticks = 0
    for proc in procs.values():
        if proc.comm not in DATABASE_COMMS:
            continue
        title = _cmdline(proc.pid)
        client = "(" in title or "[local]" in title  # "user db 127.0.0.1(port) state"
        if not client or (database is not None and f" {database} " in title):
            ticks += proc.own_ticks
    return ticks / CLOCK_TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (all but idle and iowait)."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(v) for v in fh.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by each party, and the wall clock of the sample."""

    at: float
    alertd: float
    broker: float
    database: float
    loadgen: float  # this process: publisher, servers, sampling
    machine: float
    master: float = 0.0  # the root's own CPU (not its children's)
    children: dict[int, float] = field(default_factory=dict)  # each child's own, by pid

    def minus(self, earlier: CpuSample) -> CpuSample:
        """What was used between ``earlier`` and this sample (children alive at both)."""
        return CpuSample(
            at=self.at - earlier.at, alertd=self.alertd - earlier.alertd,
            broker=self.broker - earlier.broker, database=self.database - earlier.database,
            loadgen=self.loadgen - earlier.loadgen, machine=self.machine - earlier.machine,
            master=self.master - earlier.master,
            children={pid: cpu - earlier.children[pid] for pid, cpu in self.children.items()
                      if pid in earlier.children})


def cpu_sample(root: int, database: str | None = None) -> CpuSample:
    procs = scan()
    tree = descendants(procs, root)

    def seconds(pids: Iterable[int]) -> float:
        return sum(procs[p].cpu_ticks for p in pids) / CLOCK_TICKS

    times = os.times()
    return CpuSample(
        at=time.time(), alertd=seconds(tree),
        broker=broker_cpu_s(procs), database=database_cpu_s(procs, database),
        loadgen=times.user + times.system, machine=machine_busy_s(),
        master=procs[root].own_ticks / CLOCK_TICKS if root in procs else 0.0,
        # A child's own CPU, without its probe processes: what its event loop can do.
        children={p: procs[p].own_ticks / CLOCK_TICKS for p in tree if procs[p].ppid == root})


@dataclass
class MemoryPeaks:
    total_rss: int = 0  # bytes, the whole tree at its largest
    child_rss: dict[int, int] = field(default_factory=dict)  # child pid -> its own peak RSS
    helpers_rss: int = 0  # probe helpers and ffprobe runs, all children together, at peak


class TreeWatch:
    """Samples alertd's tree in a thread: memory peaks and every process ever seen in it.

    The processes seen are what :meth:`survivors` checks after a stop, so a
    helper or ffprobe that outlived its child is found (and killed) by its id.
    """

    def __init__(self, root: int, interval_s: float = 0.25) -> None:
        self.root = root
        self.peaks = MemoryPeaks()
        self.seen: dict[int, int] = {}  # pid -> starttime
        self._interval = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="treewatch", daemon=True)

    def start(self) -> TreeWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()  # one last look, after the loop stopped

    def reset_peaks(self) -> None:
        with self._lock:
            self.peaks = MemoryPeaks()

    def sample(self) -> None:
        procs = scan()
        tree = descendants(procs, self.root)
        children = {p for p in tree if procs[p].ppid == self.root}
        with self._lock:
            for pid in tree:
                self.seen.setdefault(pid, procs[pid].starttime)
            peaks = self.peaks
            total = sum(procs[p].rss_pages for p in tree) * PAGE_SIZE
            peaks.total_rss = max(peaks.total_rss, total)
            helpers = 0
            for pid in children:
                own = procs[pid].rss_pages * PAGE_SIZE
                peaks.child_rss[pid] = max(peaks.child_rss.get(pid, 0), own)
                helpers += sum(procs[p].rss_pages for p in descendants(procs, pid)
                               if p != pid) * PAGE_SIZE
            peaks.helpers_rss = max(peaks.helpers_rss, helpers)

    def survivors(self) -> list[int]:
        """Processes once in the tree that still run (same pid and start time)."""
        alive = []
        with self._lock:
            seen = dict(self.seen)
        for pid, started in seen.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = Path(f"/proc/{pid}/stat").read_text()
                fields = raw[raw.rindex(")") + 2:].split()
                if int(fields[19]) == started and fields[0] != "Z":
                    alive.append(pid)
        return alive

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(OSError):
                self.sample()
