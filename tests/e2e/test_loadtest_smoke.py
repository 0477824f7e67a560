"""scripts/loadtest --smoke: the load test tool still runs end to end and agrees with /metrics."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("throughput_heatmap.png", "latency_vs_concurrency.png", "cpu_per_alert.png")


def test_smoke_run_writes_a_consistent_report_with_sane_numbers(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--smoke", "--out", str(out),
         "--clips-dir", str(tmp_path / "clips")],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    doc = json.loads((out / "results.json").read_text())
    runs = doc["runs"]
    assert [(r["workers"], r["concurrency"]) for r in runs] == [(1, 4), (2, 4)]
    assert doc["consistent"] is True
    for r in runs:
        assert r["status"] == "ok" and r["consistent"] and r["checks"] == [], r
        assert r["alerts_delivered"] == r["alerts_requested"] == 30
        assert r["outcomes"] == {"done": 30}
        assert 0 < r["alerts_per_s"] < 5000
        assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"] <= r["latency_p99_ms"] < 30_000
        assert 0 < r["cpu_ms_per_alert"] < 1000
        assert r["stage_probe_ms"] > 0 and r["stage_store_ms"] > 0
        assert r["alert_duration_mean_ms"] > 0 and r["busy_slots"] > 0
        assert len(r["peak_rss_per_child_mb"]) == r["workers"]
        assert 10 < r["peak_rss_child_mb"] < 2000
        assert r["exit_code"] == 0 and r["stragglers_killed"] == 0
        assert r["dead_lettered"] == 0 and r["rows_failed"] == 0
    assert doc["raw"]["messages"] == 30 and doc["raw"]["per_s"] > 0
    assert doc["recommendation"]["pick"] in {"1 x 4", "2 x 4"}

    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and math.isclose(float(rows[0]["alerts_per_s"]),
                                           runs[0]["alerts_per_s"], rel_tol=1e-3)
    report = (out / "report.md").read_text()
    assert "## Recommendation" in report and "Consistency check" in report
    assert "Passed:" in report and "FAILED" not in report
    assert "scripts/loadtest --smoke" in report
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"]({name})" in report
