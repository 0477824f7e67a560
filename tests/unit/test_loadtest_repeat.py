"""scripts/loadtest --repeat: no-op and raw runs interleaved; medians, ranges, per-pair ratios."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "scripts")]

from loadkit import main, plots, report  # noqa: E402
from loadkit.compare import framework_overhead, noop_medians, raw_for  # noqa: E402
from loadkit.matrix import RawPlan, schedule  # noqa: E402
from loadkit.raw import RawResult  # noqa: E402
from loadkit.recommend import recommend  # noqa: E402
from loadkit.results import RunResult  # noqa: E402
from loadkit.run import RunPlan  # noqa: E402
from loadkit.spread import Spread, overhead_pct  # noqa: E402


def noop_run(workers: int, concurrency: int, repeat: int, cpu: float) -> RunResult:
    return RunResult(profile="overhead", prober="noop", adapters="noop", workers=workers,
                     concurrency=concurrency, slots=workers * concurrency, window=300,
                     alerts_requested=300, alerts_measured=300, alerts_delivered=300,
                     repeat=repeat, alerts_per_s=3000.0, cpu_ms_per_alert=cpu,
                     master_ms_per_alert=cpu / 10, consistent=True,
                     load_start="0.1 0.1 0.1", load_end="0.2 0.1 0.1")


def raw_run(prefetch: int, repeat: int, cpu: float) -> RawResult:
    return RawResult(messages=300, prefetch=prefetch, seconds=0.1, per_s=3000 + repeat,
                     cpu_ms_per_message=cpu, broker_ms_per_message=0.3, repeat=repeat)


def schedule_args(**given: object) -> argparse.Namespace:
    args = argparse.Namespace(
        workers="1,2", concurrency="8,32", probers=["pyav"], alerts=300, warmup=0, window=0,
        duration_cap=30.0, alertd_args="", noop_adapters=True, smoke=False, compare_raw=True,
        raw_prefetch=None, repeat=1)
    vars(args).update(given)
    return args


def order(steps: list[RunPlan | RawPlan]) -> list[tuple[object, ...]]:
    return [("raw", s.prefetch, s.repeat) if isinstance(s, RawPlan)
            else (s.workers, s.concurrency, s.repeat) for s in steps]


def test_spread_gives_median_and_range_and_leaves_a_failed_run_out() -> None:
    cpu = Spread.of([0.179, 0.128, math.nan, 0.150])
    assert (cpu.n, cpu.median, cpu.low, cpu.high) == (3, 0.150, 0.128, 0.179)
    assert cpu.span(".3f") == "0.128-0.179"
    assert Spread.of([-5.0, 30.0]).span("+.0f", sep=" to ", unit="%") == "-5% to +30%"
    assert Spread.of([0.1, 0.2, 0.4, 0.3]).median == pytest.approx(0.25)  # even: the middle two
    empty = Spread.of([math.nan])
    assert empty.n == 0 and all(math.isnan(v) for v in (empty.median, empty.low, empty.high))
    assert empty.span(".3f") == "-"
    assert overhead_pct(0.3, 0.2) == pytest.approx(50.0)
    assert math.isnan(overhead_pct(math.nan, 0.2)) and math.isnan(overhead_pct(0.3, 0.0))


def test_overhead_is_median_against_median_and_each_run_against_the_raw_run_of_its_repeat(
) -> None:
    # As --repeat 3 runs them: per prefetch, (1 x 8, 2 x 8, raw 8) three times.
    alertd = {1: [0.30, 0.36, 0.33], 2: [0.40, 0.44, 0.42]}
    raws = [raw_run(8, 1, 0.20), raw_run(8, 2, 0.15), raw_run(8, 3, 0.22),
            raw_run(32, 1, 0.90), raw_run(32, 2, 0.90), raw_run(32, 3, 0.90)]
    runs = [noop_run(w, 8, i + 1, alertd[w][i]) for i in range(3) for w in (1, 2)]
    assert [raw_for(r, raws) for r in runs[:2]] == [raws[0], raws[0]]
    assert raw_for(runs[5], raws) is raws[2]

    one, two = framework_overhead(runs, raws)
    assert (one.workers, one.concurrency, one.raw_prefetch) == (1, 8, 8)
    assert (one.alertd.median, one.raw.median) == (0.33, 0.20)
    assert one.overhead_pct == pytest.approx(65.0)  # 0.33 / 0.20, not a median of the pairs
    assert one.pairs.values == pytest.approx((50.0, 140.0, 50.0))  # 0.30/0.20, 0.36/0.15, ...
    assert one.line() == ("1 x 8: framework overhead: alertd 0.330 ms/msg (0.300-0.360) vs raw "
                          "0.200 ms/msg (0.150-0.220), medians of 3 runs = +65% (per pair "
                          "+50% to +140%)")
    assert two.raw == one.raw and two.alertd.median == 0.42
    doc = one.as_dict()
    assert doc["runs"] == doc["raw_runs"] == 3
    assert doc["alertd_ms_per_message_range"] == [0.30, 0.36]
    assert doc["pair_overhead_pcts"] == pytest.approx([50.0, 140.0, 50.0])


def test_one_run_each_keeps_the_figures_and_line_it_had_before_repeat() -> None:
    [overhead] = framework_overhead([noop_run(2, 4, 1, 0.3)], [raw_run(4, 1, 0.2)])
    assert overhead.line() == ("2 x 4: framework overhead: alertd 0.300 ms/msg vs raw "
                               "0.200 ms/msg = +50%")
    doc = overhead.as_dict()
    assert (doc["alertd_ms_per_message"], doc["master_ms_per_message"],
            doc["raw_ms_per_message"], doc["raw_prefetch"]) == (0.3, 0.03, 0.2, 4)
    assert doc["overhead_pct"] == pytest.approx(50.0)


def test_a_failed_run_is_left_out_of_its_configurations_medians() -> None:
    runs = [noop_run(1, 8, 1, 0.30), noop_run(1, 8, 2, math.nan), noop_run(1, 8, 3, 0.34)]
    raws = [raw_run(8, i, 0.2) for i in (1, 2, 3)]
    [overhead] = framework_overhead(runs, raws)
    assert overhead.alertd.n == 2 and overhead.alertd.median == pytest.approx(0.32)
    assert overhead.pairs.n == 2
    assert "medians of 2 and 3 runs = +60%" in overhead.line()


def test_with_raw_prefetch_each_run_is_paired_with_the_raw_run_of_its_repeat() -> None:
    raws = [raw_run(16, 1, 0.2), raw_run(16, 2, 0.25)]
    assert raw_for(noop_run(1, 8, 2, 0.3), raws) is raws[1]
    assert raw_for(noop_run(1, 8, 1, 0.3), raws[:1]) is raws[0]  # without --repeat: the first


def test_without_raw_runs_the_repeats_still_get_their_median() -> None:
    runs = [noop_run(1, 8, i, cpu) for i, cpu in enumerate((0.31, 0.35, 0.33), 1)]
    assert framework_overhead(runs, []) == []
    assert noop_medians(runs) == ["1 x 8: alertd 0.330 ms/msg (0.310-0.350), median of 3 runs"]
    assert noop_medians(runs[:1]) == []  # one run: nothing to summarize


def test_without_repeat_the_raw_runs_follow_all_no_op_runs_as_before() -> None:
    assert order(schedule(schedule_args())) == [
        (1, 8, 1), (1, 32, 1), (2, 8, 1), (2, 32, 1), ("raw", 8, 1), ("raw", 32, 1)]
    assert order(schedule(schedule_args(compare_raw=False))) == [
        (1, 8, 1), (1, 32, 1), (2, 8, 1), (2, 32, 1)]


def test_repeat_alternates_the_no_op_runs_of_a_prefetch_with_its_raw_runs() -> None:
    assert order(schedule(schedule_args(repeat=2))) == [
        (1, 8, 1), (2, 8, 1), ("raw", 8, 1), (1, 8, 2), (2, 8, 2), ("raw", 8, 2),
        (1, 32, 1), (2, 32, 1), ("raw", 32, 1), (1, 32, 2), (2, 32, 2), ("raw", 32, 2)]
    assert order(schedule(schedule_args(repeat=2, raw_prefetch=16, workers="1"))) == [
        (1, 8, 1), (1, 32, 1), ("raw", 16, 1), (1, 8, 2), (1, 32, 2), ("raw", 16, 2)]
    assert order(schedule(schedule_args(repeat=2, compare_raw=False, workers="1"))) == [
        (1, 8, 1), (1, 8, 2), (1, 32, 1), (1, 32, 2)]


@pytest.mark.parametrize(("argv", "error"), [
    (["--repeat", "2"], "--repeat repeats the no-op and raw runs: use it with --noop-adapters"),
    (["--smoke", "--repeat", "2"], "use it with --noop-adapters"),
    (["--profile", "io-bound", "--compare-raw", "--repeat", "3"], "use it with --noop-adapters"),
    (["--noop-adapters", "--repeat", "0"], "--repeat takes a number of runs >= 1"),
])
def test_repeat_is_refused_in_one_line_where_it_has_no_meaning(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main.parse_args(argv)
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("scripts/loadtest: error: ") and error in last


def test_repeat_is_one_unless_given_and_taken_with_noop_adapters() -> None:
    assert main.parse_args([]).repeat == 1
    assert main.parse_args(["--smoke"]).repeat == 1
    args = main.parse_args(["--noop-adapters", "--compare-raw", "--repeat", "3"])
    assert (args.repeat, args.compare_raw, args.profile) == (3, True, "overhead")


def test_repeated_runs_each_keep_their_row_and_the_report_gives_medians(tmp_path: Path) -> None:
    alertd = [0.30, 0.36, 0.33]
    runs = [noop_run(1, 8, i, cpu) for i, cpu in enumerate(alertd, 1)]
    raws = [raw_run(8, i, cpu) for i, cpu in enumerate((0.20, 0.15, 0.22), 1)]
    overheads = framework_overhead(runs, raws)
    meta = {"command": "scripts/loadtest --noop-adapters --compare-raw --repeat 3",
            "date": "today", "host": "h", "cpus": 2, "memory_gib": 1.0, "alertd_version": "0",
            "commit": "abc", "prober": "noop", "noop_adapters": True, "repeat": 3,
            "profile": {"name": "overhead", "summary": "s"}, "profile_text": "t",
            "method": "m"}
    figures = plots.draw_all(runs, raws, tmp_path, "overhead (noop)")
    report.write_all(tmp_path, meta, runs, raws=raws, rec=recommend(runs), figures=figures,
                     probers=[], overheads=overheads)

    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(row["workers"], row["repeat"], row["cpu_ms_per_alert"]) for row in rows] == [
        ("1", "1", "0.3"), ("1", "2", "0.36"), ("1", "3", "0.33")]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["repeat"] for r in doc["runs"]] == [1, 2, 3]
    assert [r["repeat"] for r in doc["raw_runs"]] == [1, 2, 3]
    assert doc["framework_overhead"][0]["line"] == overheads[0].line()
    text = (tmp_path / "report.md").read_text()
    assert "| 1 x 8 noop #2 | 300 | 3000 | 0.360 | 0.036 | 0.150 (8) | +140% |" in text
    assert f"- {overheads[0].line()}" in text
    assert ("- prefetch 8, median of 3 runs: **3002 messages/s** (3001-3003) at "
            "**0.200 CPU ms/message** (0.150-0.220)") in text
