"""scripts/bench_hotpath.py runs end to end on a tiny clip: every step measured, sane figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

STEPS = ("download: receive", "download: sha256", "download: write", "HttpVideoFetcher",
         "probe: PyAVProber", "store: dedup", "store: outcome", "outbox: claim",
         "webhook: sign", "outbox: record", "handler + use case")


def test_every_step_of_an_alert_gets_a_cpu_figure(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"), "--calls", "20",
         "--clip", "tiny"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for step in STEPS:
        [line] = [line for line in lines if step in line]
        user, system, total = (float(x) for x in re.findall(r"\d+\.\d+", line)[-3:])
        assert user >= 0 and system >= 0 and total == pytest.approx(user + system, abs=0.002)
    [floor] = [line for line in lines if line.startswith("sum per alert")]
    assert 0 < float(floor.split()[-1]) < 1000
