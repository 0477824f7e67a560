"""The master's totals: children's cumulative snapshots folded into monotonic counters."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from alertd.aggregate import Aggregate
from alertd.domain import Stage
from alertd.stats import LATENCY_BUCKETS, ChildStats


def beat(stats: ChildStats, cpu_s: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A heartbeat as a child sends it (only the fields the aggregate reads)."""
    return {"cpu_s": cpu_s, "children_cpu_s": 0.0, **stats.snapshot(), **extra}


def done(stats: ChildStats, n: int = 1) -> None:
    for _ in range(n):
        stats.count("alerts", "done", "")


def test_totals_keep_what_a_dead_child_counted_and_add_its_replacement() -> None:
    agg = Aggregate()
    first = ChildStats()
    done(first, 3)
    agg.add(100, beat(first))
    done(first, 2)
    agg.add(100, beat(first))
    agg.child_gone(100)

    second = ChildStats()  # the replacement starts counting from zero
    done(second, 1)
    agg.add(200, beat(second))
    assert agg.processed() == (6, 0)
    second.count("alerts", "failed", "not_a_video")
    agg.add(200, beat(second))
    assert agg.processed() == (6, 1)


def test_a_repeated_heartbeat_adds_nothing() -> None:
    agg = Aggregate()
    stats = ChildStats()
    done(stats, 4)
    for _ in range(3):
        agg.add(100, beat(stats, cpu_s=1.5))
    assert agg.processed() == (4, 0)
    assert agg.cpu_s == pytest.approx(1.5)


def test_a_reused_pid_after_child_gone_counts_from_zero() -> None:
    agg = Aggregate()
    old = ChildStats()
    done(old, 5)
    agg.add(100, beat(old))
    agg.child_gone(100)
    new = ChildStats()
    done(new, 2)
    agg.add(100, beat(new))
    assert agg.processed() == (7, 0)


def test_a_heartbeat_without_counters_or_cpu_does_not_make_the_next_one_count_twice() -> None:
    agg = Aggregate()
    stats = ChildStats()
    done(stats, 3)
    agg.add(100, beat(stats, cpu_s=2.0))
    agg.add(100, {"state": "stopped"})  # e.g. a bare state report
    agg.add(100, beat(stats, cpu_s=2.0))
    assert agg.processed() == (3, 0)
    assert agg.cpu_s == pytest.approx(2.0)


def test_histograms_add_up_observations_across_children_in_the_right_buckets() -> None:
    agg = Aggregate()
    a, b = ChildStats(), ChildStats()
    a.observe("download", 0.02)
    agg.add(1, beat(a))
    a.observe("download", 0.02)
    a.observe("download", 7.0)
    agg.add(1, beat(a))
    agg.child_gone(1)
    b.observe("download", 0.02)
    b.observe("probe", 0.004)
    agg.add(2, beat(b))

    counts = agg.hist_counts["download"]
    assert sum(counts) == 4
    assert counts[LATENCY_BUCKETS.index(0.025)] == 3
    assert counts[LATENCY_BUCKETS.index(10.0)] == 1
    assert agg.hist_sums["download"] == pytest.approx(7.06)
    assert agg.hist_counts["probe"][0] == 1


def test_stage_time_observed_by_a_child_reaches_the_masters_histogram() -> None:
    agg = Aggregate()
    stats = ChildStats()
    slot = stats.open_slot()
    stats.enter_stage(slot, Stage.DOWNLOAD)
    stats.close_slot(slot)
    # Through the pipe as a child sends it: orjson refuses keys that are not plain str.
    agg.add(1, orjson.loads(orjson.dumps(beat(stats))))
    assert sum(agg.hist_counts[str(Stage.DOWNLOAD)]) == 1


def test_a_busy_slots_stage_crosses_the_pipe_by_name() -> None:
    stats = ChildStats()
    slot = stats.open_slot()
    stats.enter_stage(slot, Stage.PROBE)
    snapshot = orjson.loads(orjson.dumps(stats.snapshot()))
    assert [s["stage"] for s in snapshot["slots"]] == ["probe"]


def test_cpu_seconds_include_probe_processes_and_never_go_back() -> None:
    agg = Aggregate()
    stats = ChildStats()
    agg.add(1, {**beat(stats), "cpu_s": 1.0, "children_cpu_s": 0.5})
    agg.add(1, {**beat(stats), "cpu_s": 0.9, "children_cpu_s": 0.5})  # clock noise
    agg.add(1, {**beat(stats), "cpu_s": 2.0, "children_cpu_s": 1.0})
    agg.child_gone(1)
    agg.add(2, {**beat(stats), "cpu_s": 0.25, "children_cpu_s": 0.0})
    assert agg.cpu_s == pytest.approx(3.25)


def test_last_success_is_stamped_only_when_an_alert_is_done() -> None:
    agg = Aggregate()
    stats = ChildStats()
    stats.count("alerts", "failed", "download_not_found")
    agg.add(1, beat(stats))
    assert agg.last_success_ts == 0.0
    done(stats)
    agg.add(1, beat(stats))
    assert agg.last_success_ts > 0


def test_summary_reports_throughput_over_the_window_since_the_last_summary() -> None:
    agg = Aggregate()
    stats = ChildStats()
    done(stats, 30)
    agg.add(1, beat(stats))
    assert agg.summary([], 60.0).startswith("throughput 0.50 alerts/s; ")
    done(stats, 6)
    agg.add(1, beat(stats))
    assert agg.summary([], 60.0).startswith("throughput 0.10 alerts/s; ")
    assert "36 done, 0 failed, 0 restarts" in agg.status_line([])


def test_live_helper_cpu_counts_and_a_reaped_helper_is_not_counted_twice() -> None:
    agg = Aggregate()
    stats = ChildStats()
    agg.add(7, beat(stats, cpu_s=1.0, helpers_cpu_s=2.0))
    assert agg.cpu_s == pytest.approx(3.0)
    # The helper exits and is reaped: its 2.5 s move to children_cpu_s.
    agg.add(7, beat(stats, cpu_s=1.5, children_cpu_s=2.5, helpers_cpu_s=0.0))
    assert agg.cpu_s == pytest.approx(4.0)


def test_the_backlog_gauge_is_the_largest_a_live_child_reports_and_leaves_with_it() -> None:
    agg = Aggregate()
    one, two = ChildStats(), ChildStats()
    one.gauges["outbox_backlog"], two.gauges["outbox_backlog"] = 4, 9
    agg.add(1, beat(one))
    agg.add(2, beat(two))
    assert agg.gauge_max("outbox_backlog") == 9
    agg.child_gone(2)
    assert agg.gauge_max("outbox_backlog") == 4
    agg.child_gone(1)
    assert agg.gauge_max("outbox_backlog") is None


def test_restarts_are_counted_per_slot_and_a_gone_slot_leaves_the_fleet_total() -> None:
    agg = Aggregate()
    for index in (0, 1, 0):
        agg.count_restart(index)
    assert agg.restarts == 3 and agg.slot_restarts == {0: 2, 1: 1}
    agg.slot_gone(1)
    assert agg.restarts == 3 and agg.slot_restarts == {0: 2}
