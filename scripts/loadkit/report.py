"""The results folder: results.csv, results.json and report.md (with the figures' links)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadkit.raw import RawResult
from loadkit.recommend import Recommendation, label
from loadkit.results import RunResult


def _num(value: float, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _clean(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_all(out: Path, meta: dict[str, Any], runs: list[RunResult], *,
              raw: RawResult | None, rec: Recommendation, figures: list[str]) -> None:
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(runs[0].flat()))
        writer.writeheader()
        for r in runs:
            writer.writerow({k: (round(v, 3) if isinstance(v, float) else v)
                             for k, v in r.flat().items()})
    doc = {**meta, "runs": [vars(r) for r in runs], "raw": asdict(raw) if raw else None,
           "recommendation": {
               "pick": label(rec.pick) if rec.pick else None,
               "best": label(rec.best) if rec.best else None,
               "max_p99_ms": rec.max_p99_ms, "p99_rule": rec.p99_rule,
               "candidates": [label(r) for r in rec.candidates],
               "reasoning": rec.reasoning},
           "consistent": all(r.consistent for r in runs)}
    (out / "results.json").write_text(json.dumps(_clean(doc), indent=2) + "\n")
    (out / "report.md").write_text(markdown(meta, runs, raw=raw, rec=rec, figures=figures))


def markdown(meta: dict[str, Any], runs: list[RunResult], *, raw: RawResult | None,
             rec: Recommendation, figures: list[str]) -> str:
    lines = [f"# alertd load test: {meta['profile']['name']}", "",
             f"Command: `{meta['command']}`", "",
             f"{meta['date']} on {meta['host']} ({meta['cpus']} CPUs, "
             f"{meta['memory_gib']:.0f} GiB), alertd {meta['alertd_version']} "
             f"(commit {meta['commit']}), prober `{meta['prober']}`.", "",
             f"**Profile `{meta['profile']['name']}`**: {meta['profile']['summary']}. "
             f"{meta['profile_text']}.", "",
             f"**Method**: {meta['method']}", "",
             "## Results", "",
             "| workers | concurrency | slots | alerts | alerts/s | p50 ms | p95 ms | p99 ms "
             "| CPU ms/alert | alertd cores | machine cores | busy slots | child RSS MB "
             "| tree RSS MB | failed | DLQ | webhook 500s | load 1m start -> end | status |",
             "|" + "---:|" * 18 + "---|"]
    for r in runs:
        lines.append(
            f"| {r.workers} | {r.concurrency} | {r.slots} | {r.alerts_delivered} "
            f"| {_num(r.alerts_per_s)} | {_num(r.latency_p50_ms, 0)} "
            f"| {_num(r.latency_p95_ms, 0)} | {_num(r.latency_p99_ms, 0)} "
            f"| {_num(r.cpu_ms_per_alert, 2)} | {_num(r.cores_alertd, 2)} "
            f"| {_num(r.cores_machine, 2)} | {_num(r.busy_slots)} "
            f"| {_num(r.peak_rss_child_mb, 0)} | {_num(r.peak_rss_total_mb, 0)} "
            f"| {r.rows_failed} | {r.dead_lettered} | {r.webhook_500s} "
            f"| {r.load_start.split(' ')[0]} -> {r.load_end.split(' ')[0]} | {r.status} |")
    lines += ["", "## Time per stage (means from alertd's /metrics over the window, ms)", "",
              "| config | dedup | download | probe | store | notify (per attempt) "
              "| alert: take -> commit | publish -> processed_at | processed_at -> webhook "
              "p50 / p99 | publish -> webhook |", "|---|" + "---:|" * 9]
    for r in runs:
        lines.append(
            f"| {label(r)} | {_num(r.stage_dedup_ms)} | {_num(r.stage_download_ms)} "
            f"| {_num(r.stage_probe_ms)} | {_num(r.stage_store_ms)} "
            f"| {_num(r.stage_notify_ms)} | {_num(r.alert_duration_mean_ms)} "
            f"| {_num(r.to_processed_mean_ms)} | {_num(r.outbox_lag_p50_ms)} / "
            f"{_num(r.outbox_lag_p99_ms)} | {_num(r.latency_mean_ms)} |")
    lines += ["", "## Where the CPU went (ms per alert; cores = CPU s / window s)", "",
              "| config | alertd tree (/proc) | alertd_cpu_seconds_total | RabbitMQ "
              "| PostgreSQL | load generator | busiest child (cores) | other processes (cores) |",
              "|---|" + "---:|" * 7]
    for r in runs:
        lines.append(
            f"| {label(r)} | {_num(r.cpu_ms_per_alert, 2)} "
            f"| {_num(r.cpu_metric_ms_per_alert, 2)} | {_num(r.broker_ms_per_alert, 2)} "
            f"| {_num(r.database_ms_per_alert, 2)} | {_num(r.loadgen_ms_per_alert, 2)} "
            f"| {_num(r.busiest_child_cores, 2)} | {_num(r.cores_other, 2)} |")
    lines += ["", "alertd tree = the master, its children and all their descendants (PyAV "
              "helpers, ffprobe runs) from /proc/<pid>/stat; alertd_cpu_seconds_total is "
              "alertd's own counter. Busiest child = one child's own CPU "
              "(its event loop, without its probe processes) over the window: near 1 core, "
              "that child cannot go faster."]
    if raw is not None:
        lines += _raw_section(runs, raw)
    lines += ["", "## Recommendation", "", *[f"- {line}" for line in rec.reasoning]]
    lines += ["", "## Consistency check", ""]
    failed = [(r, c) for r in runs for c in r.checks]
    if failed:
        lines += ["**FAILED**: the tool's counts disagree with alertd's /metrics:", ""]
        lines += [f"- {label(r)}: {c}" for r, c in failed]
    else:
        lines.append("Passed: for every run, alerts processed by outcome and code, webhook "
                     "deliveries and 500s, alert-duration observations and database rows "
                     "equal alertd's /metrics deltas and the sink's receipts.")
    outcomes = "; ".join(f"{label(r)}: " + ", ".join(f"{k} {v}" for k, v in r.outcomes.items())
                         for r in runs)
    lines += ["", f"Outcomes: {outcomes}.", "", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def _raw_section(runs: list[RunResult], raw: RawResult) -> list[str]:
    lines = ["", "## Against the raw client limit", "",
             f"A bare aiormq + uvloop consumer (parse the JSON, ack; prefetch {raw.prefetch}) "
             f"took {raw.messages} messages of the same shape from a prefilled quorum queue "
             f"of the same broker: **{raw.per_s:.0f} messages/s** at "
             f"**{raw.cpu_ms_per_message:.3f} CPU ms/message** (RabbitMQ "
             f"{raw.broker_ms_per_message:.3f} ms/message).", "",
             "| config | alerts/s | % of raw rate | CPU ms/alert | x raw CPU |",
             "|---|---:|---:|---:|---:|"]
    for r in runs:
        share = r.alerts_per_s / raw.per_s if raw.per_s else math.nan
        times = r.cpu_ms_per_alert / raw.cpu_ms_per_message if raw.cpu_ms_per_message else 0
        lines.append(f"| {label(r)} | {_num(r.alerts_per_s)} | {_num(100 * share, 1)}% "
                     f"| {_num(r.cpu_ms_per_alert, 2)} | {_num(times, 1)} |")
    return lines
