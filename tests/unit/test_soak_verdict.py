"""scripts/soak's verdict: a one-off step is warm-up, a steady climb is a leak."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "scripts")]

from soak import verdict  # noqa: E402


def rows(rss: object, fds: object) -> list[dict[str, float]]:
    return [{"t_s": t, "child": 0, "pid": 1, "rss_bytes": rss(t), "fds": fds(t),  # type: ignore[operator]
             "sockets": 14, "temp_files": 0} for t in range(0, 1800, 10)]


def test_a_pool_that_fills_once_is_stable() -> None:
    assert verdict(rows(lambda t: 150e6 + (5e6 if t > 60 else 0),
                        lambda t: 26 if t > 120 else 23)) == []


def test_memory_and_fds_that_keep_climbing_are_reported_per_child() -> None:
    found = verdict(rows(lambda t: 150e6 + t * 2e4, lambda t: 20 + t // 60))
    assert any(line.startswith("child 0: RSS") for line in found)
    assert any(line.startswith("child 0: fds") for line in found)


def test_a_replaced_child_starts_over_instead_of_counting_as_growth() -> None:
    data = rows(lambda t: 150e6, lambda t: 25)
    for row in data:
        if row["t_s"] >= 1200:
            row["pid"], row["rss_bytes"] = 2, 120e6
    assert verdict(data) == []
