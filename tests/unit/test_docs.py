"""The docs point at tests and options that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_named_in_the_reliability_table_exists() -> None:
    doc = (ROOT / "docs" / "reliability.md").read_text()
    refs = re.findall(r"`([a-z_]+\.py)::([a-z0-9_]+)`", doc)
    assert len(refs) > 30
    sources = {p.name: p.read_text() for p in (ROOT / "tests").rglob("test_*.py")}
    missing = [(f, t) for f, t in refs if f"def {t}(" not in sources.get(f, "")]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
