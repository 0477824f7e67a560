"""A PyAV probe helper with faults on demand, for the isolation tests.

Run as a script in place of ``python -m alertd.probehelper``. The clip's file
name picks the fault, after the helper writes its pid to ``<path>.pid``:
``crash*`` dies by SIGSEGV (as a libav bug would), ``exit*`` exits with
status 3, ``hang*`` sleeps for an hour. Any other name is probed for real.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from alertd import probehelper


def faulty_probe(path: str) -> dict[str, Any]:
    clip = Path(path)
    if clip.name.startswith(("crash", "exit", "hang")):
        Path(f"{path}.pid").write_text(str(os.getpid()))
    if clip.name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if clip.name.startswith("exit"):
        os._exit(3)
    if clip.name.startswith("hang"):
        time.sleep(3600)
    return probehelper.probe_path(path)


if __name__ == "__main__":
    probehelper.main(faulty_probe)
