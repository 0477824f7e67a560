"""Repeated measurements of one figure (``--repeat``): the median and the min-max range."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """The finite values of one figure over repeated runs, in run order.

    A failed run's figure is nan: it is left out, so ``n`` can be smaller than
    the number of runs. With no value left every statistic is nan.
    """

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        return cls(tuple(v for v in values if math.isfinite(v)))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        """The middle value; of an even count, the mean of the two middle ones."""
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min(self.values, default=math.nan)

    @property
    def high(self) -> float:
        return max(self.values, default=math.nan)

    def span(self, spec: str, *, sep: str = "-", unit: str = "") -> str:
        """"0.128-0.179" with spec ".3f"; signed percentages read better as "+12% to +30%"."""
        if not self.values:
            return "-"
        return f"{self.low:{spec}}{unit}{sep}{self.high:{spec}}{unit}"


def overhead_pct(alertd_ms: float, raw_ms: float) -> float:
    """How much more CPU per message alertd used than the raw consumer, in % (nan if unknown)."""
    if not (math.isfinite(alertd_ms) and math.isfinite(raw_ms)) or raw_ms <= 0:
        return math.nan
    return 100 * (alertd_ms / raw_ms - 1)
