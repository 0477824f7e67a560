"""scripts/loadtest: --smoke and --repeat end to end, and the tool's parts offline."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("throughput_heatmap.png", "latency_vs_concurrency.png", "cpu_per_alert.png")


def loadkit(module: str) -> ModuleType:
    """A loadkit module (scripts/ is not a package on the default path)."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(f"loadkit.{module}")


def test_smoke_run_writes_a_consistent_report_with_sane_numbers(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # py-spy comes with the [test] extra: the profile is part of what is checked.
    spy = ["--py-spy", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--smoke", "--out", str(out),
         "--clips-dir", str(tmp_path / "clips"), *spy],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    doc = json.loads((out / "results.json").read_text())
    runs = doc["runs"]
    assert [(r["workers"], r["concurrency"], r["prober"], r["adapters"]) for r in runs] == [
        (1, 4, "pyav", "real"), (2, 4, "pyav", "real"), (2, 4, "noop", "noop")]
    assert doc["consistent"] is True
    assert [r["repeat"] for r in runs] == [1, 1, 1] and doc["repeat"] == 1  # no --repeat
    real, noop = runs[:2], runs[2]
    for r in real:
        assert r["status"] == "ok" and r["consistent"] and r["checks"] == [], r
        assert r["alerts_delivered"] == r["alerts_requested"] == 30
        assert r["outcomes"] == {"done": 30}
        assert 0 < r["alerts_per_s"] < 5000
        assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"] <= r["latency_p99_ms"] < 30_000
        assert 0 < r["cpu_ms_per_alert"] < 1000
        assert 0 <= r["master_ms_per_alert"] < r["cpu_ms_per_alert"]
        assert r["stage_probe_ms"] > 0 and r["stage_store_ms"] > 0
        assert r["alert_duration_mean_ms"] > 0 and r["busy_slots"] > 0
        assert len(r["peak_rss_per_child_mb"]) == r["workers"]
        assert 10 < r["peak_rss_child_mb"] < 2000
        assert r["exit_code"] == 0 and r["stragglers_killed"] == 0
        assert r["dead_lettered"] == 0 and r["rows_failed"] == 0

    # The no-op run: every prefilled message processed by the real framework, nothing stored.
    assert noop["status"] == "ok" and noop["consistent"] and noop["checks"] == [], noop
    assert noop["alerts_delivered"] == noop["alerts_requested"] == 300
    assert noop["outcomes"] == {"done": 300}
    assert 0 < noop["cpu_ms_per_alert"] < real[0]["cpu_ms_per_alert"]
    assert 0 < noop["paused_s"] < 20 and noop["idle_cores_alertd"] >= 0
    assert noop["exit_code"] == 0 and noop["dead_lettered"] == 0
    assert doc["raw"]["messages"] == 300 and doc["raw"]["prefetch"] == 4
    assert doc["raw"]["per_s"] > 0 and doc["raw"]["repeat"] == 1
    [overhead] = doc["framework_overhead"]
    assert (overhead["workers"], overhead["concurrency"]) == (2, 4)
    assert math.isclose(overhead["alertd_ms_per_message"], noop["cpu_ms_per_alert"])
    assert doc["recommendation"]["pick"] in {"1 x 4", "2 x 4"}

    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and math.isclose(float(rows[0]["alerts_per_s"]),
                                           runs[0]["alerts_per_s"], rel_tol=1e-3)
    assert [(row["prober"], row["adapters"], row["repeat"]) for row in rows] == [
        ("pyav", "real", "1"), ("pyav", "real", "1"), ("noop", "noop", "1")]
    report = (out / "report.md").read_text()
    assert "## Recommendation" in report and "Consistency check" in report
    assert "Passed:" in report and "FAILED" not in report
    assert "scripts/loadtest --smoke" in report
    assert "## Framework overhead (no-op adapters)" in report
    assert "2 x 4: framework overhead: alertd " in report and " ms/msg vs raw " in report
    assert "noop #" not in report and "medians of" not in report  # as before --repeat
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"]({name})" in report
    if spy:
        assert set(real[1]["py_spy_files"]) >= {"master", "child-0", "child-1"}
        for r in runs:
            assert all((out / path).is_file() for path in r["py_spy_files"].values())
        # Any one process may sleep through a 1 s window: the master, the PyAV helper
        # between tiny probes, a child once the no-op run's 300 messages (~0.1 s)
        # are done. The real runs' children work through it: one at least was seen.
        for r in real:
            assert any((out / path).stat().st_size > 0 for role, path in
                       r["py_spy_files"].items() if role.startswith("child-")), r["py_spy_files"]
        profile = (out / "profile.md").read_text()
        assert "### child-0" in profile and "#### Hot path by stage" in profile


def test_repeat_alternates_no_op_and_raw_runs_and_reports_their_medians(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--noop-adapters",
         "--compare-raw", "--workers", "1", "--concurrency", "4", "--alerts", "300",
         "--repeat", "2", "--wait-load", "0", "--out", str(out),
         "--clips-dir", str(tmp_path / "clips")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    ran = [line.split(":")[0].strip() for line in done.stdout.splitlines()
           if ", repeat " in line.split(":")[0]]
    assert ran == ["1w x 4c noop adapters, repeat 1/2", "raw aiormq consumer, prefetch 4, "
                   "repeat 1/2", "1w x 4c noop adapters, repeat 2/2",
                   "raw aiormq consumer, prefetch 4, repeat 2/2"]

    doc = json.loads((out / "results.json").read_text())
    runs, raws = doc["runs"], doc["raw_runs"]
    assert [(r["repeat"], r["status"], r["consistent"]) for r in runs] == [
        (1, "ok", True), (2, "ok", True)]
    assert [(r["prefetch"], r["repeat"]) for r in raws] == [(4, 1), (4, 2)]
    [overhead] = doc["framework_overhead"]
    assert overhead["runs"] == overhead["raw_runs"] == 2
    assert overhead["alertd_ms_per_message"] == pytest.approx(  # of two, the mean
        (runs[0]["cpu_ms_per_alert"] + runs[1]["cpu_ms_per_alert"]) / 2)
    assert overhead["pair_overhead_pcts"] == pytest.approx(
        [100 * (r["cpu_ms_per_alert"] / raw["cpu_ms_per_message"] - 1)
         for r, raw in zip(runs, raws, strict=True)])
    with open(out / "results.csv", newline="") as fh:
        assert [row["repeat"] for row in csv.DictReader(fh)] == ["1", "2"]
    report = (out / "report.md").read_text()
    assert "| 1 x 4 noop #2 |" in report and "medians of 2 runs = " in report
    assert overhead["line"] in done.stdout and overhead["line"] in report


def test_probers_of_one_configuration_run_back_to_back_in_alternating_order() -> None:
    matrix = loadkit("matrix")
    args = argparse.Namespace(
        workers="1,2", concurrency="8", probers=["pyav", "ffprobe"], alerts=100, warmup=0,
        window=0, duration_cap=30.0, alertd_args="", noop_adapters=False, smoke=False)
    order = [(p.workers, p.concurrency, p.prober) for p in matrix.plans(args)]
    assert order == [(1, 8, "pyav"), (1, 8, "ffprobe"), (2, 8, "ffprobe"), (2, 8, "pyav")]

    args.noop_adapters, args.probers = True, ["pyav"]
    noop = matrix.plans(args)
    assert [(p.workers, p.adapters, p.alerts) for p in noop] == [(1, "noop", 100),
                                                                  (2, "noop", 100)]
    with pytest.raises(ValueError, match="distinct probers"):
        matrix.probers_of("pyav,pyav")
    with pytest.raises(ValueError, match="distinct probers"):
        matrix.probers_of("pyav,gstreamer")


def test_report_sets_the_probers_side_by_side_for_each_configuration(tmp_path: Path) -> None:
    results, compare, report, plots = (loadkit(m) for m in ("results", "compare", "report",
                                                            "plots"))
    recommend = loadkit("recommend")

    def run(prober: str, workers: int, rate: float, cpu: float) -> object:
        return results.RunResult(profile="cpu-bound", prober=prober, adapters="real",
                              workers=workers, concurrency=8, slots=8 * workers, window=12,
                              alerts_requested=100, alerts_delivered=100, alerts_per_s=rate,
                              cpu_ms_per_alert=cpu, latency_p50_ms=100.0, latency_p95_ms=150.0,
                              latency_p99_ms=200.0, alert_duration_mean_ms=80.0,
                              busy_slots=4.0, slot_utilisation=0.5, cores_machine=1.0,
                              consistent=True, load_start="0.1 0.1 0.1", load_end="0.2 0.1 0.1")

    runs = [run("pyav", 1, 74.3, 16.4), run("ffprobe", 1, 11.3, 140.0),
            run("ffprobe", 2, 12.0, 150.0), run("pyav", 2, 76.5, 17.0)]
    comparisons = compare.prober_comparisons(runs, ["pyav", "ffprobe"])
    assert [c.line() for c in comparisons] == [
        "1 x 8: pyav vs ffprobe: 6.6x alerts/s, CPU ms/alert 16.40 vs 140.00",
        "2 x 8: pyav vs ffprobe: 6.4x alerts/s, CPU ms/alert 17.00 vs 150.00"]
    rec = recommend.recommend(runs, cpus=2)
    assert recommend.label(rec.pick, prober=True) == "1 x 8 pyav"
    figures = plots.draw_all(runs, [], tmp_path, "cpu-bound (pyav,ffprobe)")
    meta = {"command": "scripts/loadtest --prober pyav,ffprobe", "date": "today",
            "host": "h", "cpus": 2, "memory_gib": 1.0, "alertd_version": "0",
            "commit": "abc", "prober": "pyav,ffprobe",
            "profile": {"name": "cpu-bound", "summary": "s"}, "profile_text": "t",
            "method": "m"}
    report.write_all(tmp_path, meta, runs, raws=[], rec=rec, figures=figures,
                     probers=comparisons, overheads=[])
    text = (tmp_path / "report.md").read_text()
    assert "## Probers side by side" in text
    assert "- 1 x 8: pyav vs ffprobe: 6.6x alerts/s, CPU ms/alert 16.40 vs 140.00" in text
    assert "| 1 x 8 ffprobe |" in text and "**1 x 8 pyav**" in text
    with open(tmp_path / "results.csv", newline="") as fh:
        assert [row["prober"] for row in csv.DictReader(fh)] == [
            "pyav", "ffprobe", "ffprobe", "pyav"]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["prober_comparison"][0]["alerts_per_s_ratio"] == pytest.approx(74.3 / 11.3)
    for name in figures:
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


STACK = ("<module> (loadkit/noopalertd.py:113);main (alertd/cli.py:390);"
         "Child.run (alertd/child.py:97);Runner.run (asyncio/runners.py:118)")
RAW_PROFILE = "\n".join([
    f"{STACK} 50",
    f"{STACK};AmqpConsumer._run_delivery (alertd/adapters/amqp.py:250);"
    "AlertHandler.__call__ (alertd/handler.py:100);process_alert (alertd/service.py:80);"
    "PostgresStore.recorded_fingerprint (alertd/adapters/postgres.py:10);"
    "BaseCursor.execute (psycopg/cursor.py:5) 20",
    f"{STACK};AmqpConsumer._run_delivery (alertd/adapters/amqp.py:250);"
    "AlertHandler.__call__ (alertd/handler.py:100);ChildStats.count (alertd/stats.py:5) 10",
    f"{STACK};AmqpConsumer._run_delivery (alertd/adapters/amqp.py:251);"
    "Channel.basic_ack (aiormq/channel.py:9) 15",
    f"{STACK};OutboxDispatcher.run (alertd/outbox.py:5);"
    "NoopStore.claim_due (loadkit/noopalertd.py:70) 5",
    "Queue.put (asyncio/queues.py:185) 4",  # read without its callers
    "not a stack line",
]) + "\n"


def test_spy_summary_rolls_samples_up_by_stage_and_frame(tmp_path: Path) -> None:
    spy = loadkit("spy")
    raw = tmp_path / "child.txt"
    raw.write_text(RAW_PROFILE)

    profile = spy.summarize_file(raw, "child-0")
    assert profile.total == 104
    assert dict(profile.stages) == {
        "event loop (self)": 50, "store (dedup, record_outcome)": 20,
        "child: heartbeat, stats, logging": 10, "AMQP consume / ack": 15,
        "outbox / webhook": 5, "asyncio, caller not read": 4}
    assert profile.self_samples.most_common(1) == [(("Runner.run", "asyncio/runners.py"), 50)]
    # Two lines of one function count once per sample, lines merged.
    assert profile.inclusive[("AmqpConsumer._run_delivery", "alertd/adapters/amqp.py")] == 45
    assert len(profile.scaffold) == 4 and profile.partial == 4

    text = "\n".join(spy.markdown(profile, rate_hz=200))
    assert "Total samples: **104** (~0.5 s of busy samples at 200 Hz)" in text
    assert "| event loop (self) | 50 | 48.1 |" in text
    assert "| 43.3 | 45 | `AmqpConsumer._run_delivery` | alertd/adapters/amqp.py |" in text
    assert "`Runner.run`" not in text.split("inclusive frames")[1]
    assert "Left out: 4 scaffolding frames" in text
    assert "4 % of the samples came without the event loop's frame" in text

    out = tmp_path / "profile.md"
    assert spy.main([str(raw), "--out", str(out), "--rate", "200"]) == 0
    assert "### Hot path by stage" in out.read_text()


async def test_noop_world_lets_the_use_case_run_without_any_io() -> None:
    noopalertd = loadkit("noopalertd")
    from alertd.config import Settings
    from alertd.domain import Status, parse_alert
    from alertd.service import Attempt, Recorded, process_alert, utc_now
    from tests.fakes import no_sleep

    world = await noopalertd.open_noop_world(Settings())
    alert = parse_alert(b'{"alert_id": "a-1", "video_url": "http://127.0.0.1/x.mp4", '
                        b'"webhook_url": "http://127.0.0.1/hook"}', default_webhook_url=None)
    decision = await process_alert(alert, attempt=Attempt(1, 3, utc_now()),
                                   fetcher=world.fetcher, prober=world.prober,
                                   store=world.store, sleep=no_sleep)
    assert isinstance(decision, Recorded)
    assert decision.outcome.status is Status.DONE
    assert await world.outbox.claim_due(16, 60.0) == ()
    await world.postgres.check_schema()
    await world.close()


def test_a_process_idle_through_the_window_gets_an_empty_profile_not_a_problem(
    tmp_path: Path,
) -> None:
    spyrecord = loadkit("spyrecord")
    plan = spyrecord.SpyPlan(seconds=1, directory=tmp_path / "pyspy")
    plan.directory.mkdir()
    recording = spyrecord.Recording(plan, "t")
    for role, log, code in [("master", "Wrote raw flamegraph data to 'x'. Samples: 0 Errors: 0",
                             "true"),
                            ("child-0", "Error: Failed to find python version", "false")]:
        out = plan.directory / f"t-{role}.txt"
        out.with_suffix(".log").write_text(log + "\n")
        recording.procs.append((spyrecord.Target(role, 1), out, subprocess.Popen([code])))
    written = recording.wait()
    assert written == {"master": "pyspy/t-master.txt"}
    assert (plan.directory / "t-master.txt").read_bytes() == b""
    [problem] = recording.problems
    assert "child-0" in problem and "Failed to find python version" in problem
