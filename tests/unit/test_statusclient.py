"""alertd status's text view of the master's status document."""

from __future__ import annotations

from typing import Any

from alertd.statusclient import render_status


def document(**extra: Any) -> dict[str, Any]:
    return {
        "master_pid": 10, "uptime_s": 61.0, "workers": 2, "concurrency": 4, "stopping": None,
        "restarts": 1, "processed": 9, "failed": 2, **extra,
        "children": [{"index": 0, "pid": 11, "state": "consuming", "retiring": False,
                      "age_s": 60.0, "rss_bytes": 52_000_000, "loop_lag_s": 0.0012,
                      "restarts": 3, "processed": 9, "failed": 2,
                      "slots": [{"alert_id": "a-1", "stage": "probe", "elapsed_s": 0.4}]}],
    }


def test_the_view_shows_children_and_what_each_busy_slot_is_doing() -> None:
    text = render_status(document())
    assert "master pid 10" in text and "2 children x 4 slots" in text and "1 restarts" in text
    assert "consuming" in text and "52.0" in text
    assert "slot: a-1 probe 0.4s" in text


def test_each_child_row_shows_the_restarts_of_its_slot() -> None:
    header, row = render_status(document()).splitlines()[1:3]
    assert header.split()[3:5] == ["AGE", "RESTARTS"]
    assert row.split()[3:5] == ["60s", "3"]
    older = document()  # a master started before the field existed
    del older["children"][0]["restarts"]
    assert render_status(older).splitlines()[2].split()[3:5] == ["60s", "-"]


def test_the_view_shows_autoscale_bounds_target_and_decisions_when_on() -> None:
    scaling = {"min": 1, "max": 4, "target": 3, "queue_ready": 120,
               "decisions": {"up": 2, "down": 0}}
    text = render_status(document(autoscale=scaling))
    assert "autoscale 1..4: target 3, queue ready 120, decisions up 2 / down 0" in text
    assert "autoscale" not in render_status(document(autoscale=None))
