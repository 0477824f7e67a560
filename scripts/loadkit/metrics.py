"""alertd's own /metrics: scrape, subtract two scrapes, read counters and histograms.

Every figure the report takes from alertd (counts by outcome, per-stage
latency, alertd's CPU counter) is a difference of two scrapes taken at quiet
points around the measured window.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
STAGES = ("dedup", "download", "probe", "store", "notify")


@dataclass(frozen=True)
class Scrape:
    """Samples by (sample name, sorted labels)."""

    samples: dict[tuple[str, Labels], float]

    def minus(self, earlier: Scrape) -> Scrape:
        keys = set(self.samples) | set(earlier.samples)
        return Scrape({k: self.samples.get(k, 0.0) - earlier.samples.get(k, 0.0) for k in keys})

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by_label(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """Sum of ``name`` per combination of ``label_names`` (zeros left out)."""
        out: dict[tuple[str, ...], float] = {}
        for (sample, labels), value in self.samples.items():
            if sample != name or not value:
                continue
            given = dict(labels)
            key = tuple(given.get(n, "") for n in label_names)
            out[key] = out.get(key, 0.0) + value
        return out

    def histogram(self, name: str, **labels: str) -> Histogram:
        wanted = set(labels.items())
        buckets = []
        for (sample, have), value in self.samples.items():
            if sample == f"{name}_bucket" and wanted <= set(have):
                le = dict(have)["le"]
                buckets.append((math.inf if le == "+Inf" else float(le), value))
        return Histogram(sorted(buckets), self.value(f"{name}_sum", **labels),
                         self.value(f"{name}_count", **labels))


@dataclass(frozen=True)
class Histogram:
    buckets: list[tuple[float, float]]  # (upper bound, cumulative count)
    sum: float
    count: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear within the bucket that holds rank q."""
        if not self.count or not self.buckets:
            return math.nan
        rank = q * self.buckets[-1][1]
        lower_bound, lower_count = 0.0, 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower_bound
                inside = cumulative - lower_count
                share = (rank - lower_count) / inside if inside else 1.0
                return lower_bound + (bound - lower_bound) * share
            lower_bound, lower_count = bound, cumulative
        return lower_bound


def scrape(port: int, timeout: float = 5.0) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return Scrape(samples)


def processed(delta: Scrape) -> dict[tuple[str, str], int]:
    """Alerts with a stored outcome in ``delta``, by (outcome, code)."""
    return {(k[0], k[1]): round(v) for k, v in
            delta.by_label("alertd_alerts_processed_total", "outcome", "code").items()}


def webhook_attempts(delta: Scrape) -> dict[str, int]:
    """Webhook delivery attempts in ``delta`` by outcome (delivered, retry, failed, gone)."""
    return {k[0]: round(v) for k, v in
            delta.by_label("alertd_webhook_deliveries_total", "outcome").items()}
