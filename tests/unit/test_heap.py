"""keep_freed_memory: a process reuses the memory it freed instead of faulting it in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alertd.heap import keep_freed_memory

# Eight 1 MiB blocks allocated and freed, over and over: the shape of a
# download's body chunks or libav's frame buffers, alert after alert.
CYCLES = """
import resource, sys
from alertd.heap import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else None)
def cycle():
    blocks = [b"x" * 2**20 for _ in range(8)]
    del blocks
for _ in range(10):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def faults_per_cycle(mode: str, **env: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CYCLES, mode], check=True, capture_output=True, text=True,
        env={**os.environ, **env},
    ).stdout.split()
    return out[0], float(out[1])


def test_freed_blocks_are_reused_without_faulting_their_pages_in_again() -> None:
    # glibc's defaults give the 8 MiB back at every free; 2048 pages per cycle.
    _, default = faults_per_cycle("default")
    set_, kept = faults_per_cycle("keep")

    assert default > 1000
    assert set_ == "True" and kept < 10


@pytest.mark.parametrize("env", [
    {"MALLOC_TRIM_THRESHOLD_": "131072"},
    {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
])
def test_an_operators_own_malloc_settings_are_left_alone(env: dict[str, str]) -> None:
    set_, faults = faults_per_cycle("keep", **env)

    assert set_ == "False" and faults > 1000


def test_a_c_library_without_mallopt_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    class NotGlibc:  # ctypes.CDLL(None) of a C library that has no mallopt
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    monkeypatch.setattr("alertd.heap.ctypes.CDLL", lambda name: NotGlibc())

    assert keep_freed_memory() is False
