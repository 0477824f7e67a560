"""alertd and ffprobe under the kernel restrictions of alertd.service, for real.

tests/deploy/sandbox.py applies the unit's MemoryDenyWriteExecute= and
SystemCallFilter= (with its SystemCallErrorNumber=) through the same kernel
interfaces systemd uses, so these tests show that the sandbox the unit
declares lets ffprobe and the whole pipeline work, and that it does bite.
Skipped, with the reason, only where the kernel (< 6.3: no PR_SET_MDWE) or
the machine (no systemd-analyze or libseccomp) cannot apply it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.files import REPO, run, tool

SANDBOX = [sys.executable, str(Path(__file__).with_name("sandbox.py")), "--"]
UNAVAILABLE = 77


def sandboxed(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if tool("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: cannot expand the unit's syscall groups")
    result = run([*SANDBOX, *argv])
    if result.returncode == UNAVAILABLE:
        pytest.skip(result.stderr.strip())
    return result


def test_the_sandbox_refuses_write_execute_memory_and_filtered_calls() -> None:
    script = """
import mmap, os
for name, call in [
    ("wx", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
    ("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)),
    ("setuid", lambda: os.setuid(os.getuid())),
]:
    try:
        call()
        print(name, "allowed")
    except PermissionError as exc:
        print(name, "refused", exc.errno)
"""
    result = sandboxed([sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["wx refused 13", "setpriority refused 1",
                                             "setuid refused 1"]


def test_the_ffprobe_adapter_probes_every_sample_clip_in_the_sandbox(
        clips: dict[str, Path]) -> None:
    # The adapter's own subprocess (new session, pipes) on a uvloop, as in a child.
    names = ["mp4", "webm", "mkv", "mov", "audio_only"]
    script = f"""
import sys, uvloop, orjson
sys.path.insert(0, {str(REPO)!r})
from alertd.adapters.ffprobe import FfprobeProber

async def main():
    prober = FfprobeProber(timeout=30)
    for path in sys.argv[1:]:
        print(orjson.dumps(await prober.probe(path)).decode())

uvloop.run(main())
"""
    result = sandboxed([sys.executable, "-c", script, *(str(clips[n]) for n in names)])
    assert result.returncode == 0, result.stderr
    reports = result.stdout.splitlines()
    assert len(reports) == len(names)
    assert all('"format_name"' in r for r in reports)


@pytest.mark.e2e
def test_alertd_processes_alerts_in_the_sandbox(
        tmp_path: Path, fresh_vhost: str, fresh_db: str, clips: dict[str, Path]) -> None:
    from tests.e2e.harness import Alertd, Servers, alert, publish, rows, wait_until

    sandboxed(["true"])  # skips here, not inside the harness, when unavailable
    alertd = Alertd(tmp_path, fresh_vhost, fresh_db, workers=2, concurrency=4)
    alertd.argv = [*SANDBOX, *alertd.argv]
    with Servers(clips) as srv, alertd as proc:
        proc.wait_consuming()
        pids = [proc.pid, *(c["pid"] for c in proc.children())]
        assert all(seccomp_mode(pid) == "2" for pid in pids), "master and children filtered"
        ids = [f"sandboxed-{n}" for n in ("mp4", "webm", "mkv", "mov")]
        publish(fresh_vhost, [alert(i, srv.clip_url(i.split("-")[1]), srv.hook_url())
                              for i in ids])
        wait_until(lambda: all(rows(fresh_db).get(i, {}).get("status") == "done" for i in ids),
                   60, "the alerts to be stored as done")
        wait_until(lambda: len(srv.webhooks()) >= len(ids), 30, "a webhook per alert")
        proc.stop()
        assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


def seccomp_mode(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:"))


def test_pyav_opens_a_clip_in_the_sandbox(clips: dict[str, Path]) -> None:
    # PyAV brings its own build of the FFmpeg libraries: they must load under W^X too.
    script = "import sys, av; c = av.open(sys.argv[1]); print(c.format.name, len(c.streams))"
    result = sandboxed([sys.executable, "-c", script, str(clips["mp4"])])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("mov,mp4")
