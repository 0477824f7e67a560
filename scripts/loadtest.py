"""scripts/loadtest's entry point: puts the repository and scripts/ on the path, runs loadkit."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # loadkit, then alertd and tests (not installed)

from loadkit.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
