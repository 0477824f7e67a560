"""``--py-spy SECONDS``: py-spy records alertd's processes during a run's measured window.

One ``py-spy record --nonblocking`` per process: the master, every child and
one PyAV helper (``python -m alertd.probehelper``) when there is one. Raw
(collapsed-stack) files go to ``<results>/pyspy/``; :mod:`loadkit.spy` turns
them into profile.md. ``--nonblocking`` reads the processes' memory without
pausing them, so alertd runs at its own pace; py-spy's own CPU is the load
generator's (it shares the machine's cores, so figures of a profiled run are
a little lower than those of an unprofiled one).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loadkit.proctree import descendants, scan

RATE_HZ = 200
HELPER_MODULE = "alertd.probehelper"
EXTRA_WAIT_S = 20.0  # py-spy's start-up and writing the file, on a loaded machine


def py_spy_binary() -> str:
    """py-spy next to this Python (the venv's), else on PATH; raises if there is none."""
    sibling = Path(sys.executable).with_name("py-spy")
    found = str(sibling) if sibling.is_file() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--py-spy needs py-spy: .venv/bin/pip install py-spy")
    return found


@dataclass(frozen=True)
class Target:
    role: str  # master, child-0, child-1, ..., pyav-helper
    pid: int


def targets(root: int) -> list[Target]:
    """The master ``root``, its children (by pid order) and the first PyAV helper found."""
    procs = scan()
    tree = descendants(procs, root)
    children = sorted(p for p in tree if procs[p].ppid == root)
    found = [Target("master", root)] + [Target(f"child-{i}", p) for i, p in enumerate(children)]
    for pid in sorted(tree - {root, *children}):
        with contextlib.suppress(OSError):
            if HELPER_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                    errors="replace").replace("\0", " "):
                found.append(Target("pyav-helper", pid))
                break
    return found


@dataclass(frozen=True)
class SpyPlan:
    """Record ``seconds`` at ``rate_hz`` into ``directory`` (``<results>/pyspy``)."""

    seconds: float
    directory: Path
    rate_hz: int = RATE_HZ

    def start(self, root: int, tag: str) -> Recording:
        return Recording(self, tag).start(root)


@dataclass
class Recording:
    """The py-spy processes of one run; :meth:`wait` returns the files they wrote."""

    plan: SpyPlan
    tag: str
    procs: list[tuple[Target, Path, subprocess.Popen[bytes]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def start(self, root: int) -> Recording:
        binary = py_spy_binary()
        self.plan.directory.mkdir(parents=True, exist_ok=True)
        for target in targets(root):
            out = self.plan.directory / f"{self.tag}-{target.role}-{target.pid}.txt"
            argv = [binary, "record", "-p", str(target.pid), "--duration",
                    f"{max(1, round(self.plan.seconds))}", "--rate", str(self.plan.rate_hz),
                    "-f", "raw", "-o", str(out), "--nonblocking"]
            with open(out.with_suffix(".log"), "wb") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
            self.procs.append((target, out, proc))
        return self

    def wait(self) -> dict[str, str]:
        """Wait for every recorder (killed if late); role -> raw file (relative to the
        results folder) of those that wrote one."""
        written = {}
        for target, out, proc in self.procs:
            try:
                proc.wait(self.plan.seconds + EXTRA_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log = out.with_suffix(".log")
            text = log.read_text(errors="replace") if log.is_file() else ""
            idle = proc.returncode == 0 and "Samples: 0 " in text
            if idle:
                # Recorded, but the process never ran in the window (an idle
                # master over a short one): an empty profile, not a failure.
                out.write_bytes(b"")
            if idle or (out.is_file() and out.stat().st_size > 0):
                written[target.role] = str(out.relative_to(self.plan.directory.parent))
                log.unlink(missing_ok=True)
            else:
                tail = text.strip().splitlines()[-1:]
                self.problems.append(f"py-spy on {target.role} pid {target.pid} wrote nothing "
                                     f"(exit {proc.returncode}): {' '.join(tail)}")
        return written
