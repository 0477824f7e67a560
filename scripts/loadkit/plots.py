"""The report's figures (matplotlib, Agg): throughput heatmap, latency and CPU per alert."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadkit.raw import RawResult
from loadkit.results import RunResult
from loadkit.spread import Spread

HEATMAP = "throughput_heatmap.png"
LATENCY = "latency_vs_concurrency.png"
CPU = "cpu_per_alert.png"


def draw_all(runs: list[RunResult], raws: list[RawResult], out: Path, title: str) -> list[str]:
    """Write the three PNGs into ``out``; returns their file names.

    Every prober measured (and "noop" for no-op adapter runs) is a series of its own:
    a heatmap panel, its own latency lines, its own bars. With --repeat a heatmap cell
    and a raw line are medians; every run keeps its own bar.
    """
    heatmap(runs, out / HEATMAP, title)
    latency(runs, out / LATENCY, title)
    cpu_per_alert(runs, raws, out / CPU, title)
    return [HEATMAP, LATENCY, CPU]


def _series(runs: list[RunResult]) -> list[str]:
    return list(dict.fromkeys(r.prober for r in runs))


def heatmap(runs: list[RunResult], path: Path, title: str) -> None:
    workers = sorted({r.workers for r in runs})
    conc = sorted({r.concurrency for r in runs})
    series = _series(runs)
    fig, axes = plt.subplots(1, len(series), squeeze=False, figsize=(
        max(3.6, 1.6 + 1.3 * len(conc)) * len(series), 1.6 + 0.9 * len(workers)))
    for ax, prober in zip(axes[0], series, strict=True):
        cells: dict[tuple[int, int], list[float]] = {}
        for r in runs:
            if r.prober == prober:
                cells.setdefault((workers.index(r.workers), conc.index(r.concurrency)),
                                 []).append(r.alerts_per_s)
        grid = [[Spread.of(cells.get((i, j), [])).median for j in range(len(conc))]
                for i in range(len(workers))]
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(conc)), [str(c) for c in conc])
        ax.set_yticks(range(len(workers)), [str(w) for w in workers])
        ax.set_xlabel("--concurrency (slots per child)")
        ax.set_ylabel("--workers (children)")
        finite = [v for row in grid for v in row if math.isfinite(v)]
        middle = (min(finite) + max(finite)) / 2 if finite else 0.0
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                text = "-" if not math.isfinite(value) else f"{value:.1f}"
                ax.text(j, i, text, ha="center", va="center",
                        color="black" if math.isfinite(value) and value > middle else "white")
        fig.colorbar(image, ax=ax, label="alerts/s")
        ax.set_title(prober if len(series) > 1 else f"{title}: throughput")
    if len(series) > 1:
        fig.suptitle(f"{title}: throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(runs: list[RunResult], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = _series(runs)
    for prober in series:
        for w in sorted({r.workers for r in runs}):
            line = sorted((r for r in runs if r.workers == w and r.prober == prober),
                          key=lambda r: r.concurrency)
            if not any(math.isfinite(r.latency_p99_ms) for r in line):
                continue  # no-op runs have no webhooks, so no latency
            name = f"{w} workers" + (f" {prober}" if len(series) > 1 else "")
            xs = [r.concurrency for r in line]
            p99 = ax.plot(xs, [r.latency_p99_ms for r in line], marker="o",
                          label=f"{name}, p99")
            ax.plot(xs, [r.latency_p50_ms for r in line], marker=".", linestyle="--",
                    color=p99[0].get_color(), label=f"{name}, p50")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.concurrency for r in runs}),
                  [str(c) for c in sorted({r.concurrency for r in runs})])
    ax.set_xlabel("--concurrency (slots per child)")
    ax.set_ylabel("publish -> webhook latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(f"{title}: latency under full load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_per_alert(runs: list[RunResult], raws: list[RawResult], path: Path,
                  title: str) -> None:
    series = _series(runs)
    ordered = sorted(runs, key=lambda r: (r.workers, r.concurrency, series.index(r.prober)))
    repeated = any(r.repeat > 1 for r in runs)  # a bar each, in run order (sorted is stable)
    names = [f"{r.workers}x{r.concurrency}" + (f"\n{r.prober}" if len(series) > 1 else "")
             + (f" #{r.repeat}" if repeated else "") for r in ordered]
    parts = [("alertd (whole tree)", [r.cpu_ms_per_alert for r in ordered]),
             ("RabbitMQ", [r.broker_ms_per_alert for r in ordered]),
             ("PostgreSQL", [r.database_ms_per_alert for r in ordered])]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.8 * len(names)), 4.2))
    bottom = [0.0] * len(names)
    for name, values in parts:
        clean = [v if math.isfinite(v) else 0.0 for v in values]
        ax.bar(names, clean, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, clean, strict=True)]
    by_prefetch: dict[int, list[float]] = {}
    for raw in raws:
        by_prefetch.setdefault(raw.prefetch, []).append(raw.cpu_ms_per_message)
    styles = (":", "-.", "--", (0, (1, 3)))
    for (prefetch, values), style in zip(by_prefetch.items(), styles, strict=False):
        cpu = Spread.of(values)
        median = f", median of {len(values)}" if len(values) > 1 else ""
        ax.axhline(cpu.median, color="black", linestyle=style,
                   label=f"raw aiormq consumer, prefetch {prefetch}{median} "
                   f"({cpu.median:.3f} ms/msg)")
    ax.set_xlabel("workers x concurrency")
    ax.set_ylabel("CPU ms per alert")
    ax.set_ylim(0, max([*bottom, 0.1]) * 1.4)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{title}: CPU per alert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
