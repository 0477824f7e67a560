"""The results folder: results.csv, results.json and report.md (with the figures' links).

Every run is a row, each of ``--repeat``'s too (``#i`` in report.md, ``repeat``
in the files); report.md adds their medians and ranges.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadkit.compare import Overhead, ProberComparison, noop_medians, raw_for
from loadkit.raw import RawResult
from loadkit.recommend import Recommendation, label, several_probers
from loadkit.results import RunResult
from loadkit.spread import Spread, overhead_pct


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
              raws: list[RawResult], rec: Recommendation, figures: list[str],
              probers: list[ProberComparison], overheads: list[Overhead]) -> None:
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(runs[0].flat()))
        writer.writeheader()
        for r in runs:
            writer.writerow({k: (round(v, 3) if isinstance(v, float) else v)
                             for k, v in r.flat().items()})
    many = several_probers(runs)
    doc = {**meta, "runs": [vars(r) for r in runs],
           "raw": asdict(raws[0]) if raws else None,  # the first, as before several
           "raw_runs": [asdict(r) for r in raws],
           "prober_comparison": [c.as_dict() for c in probers],
           "framework_overhead": [o.as_dict() for o in overheads],
           "recommendation": {
               "pick": label(rec.pick, prober=many) if rec.pick else None,
               "best": label(rec.best, prober=many) if rec.best else None,
               "max_p99_ms": rec.max_p99_ms, "p99_rule": rec.p99_rule,
               "candidates": [label(r, prober=many) for r in rec.candidates],
               "reasoning": rec.reasoning},
           "consistent": all(r.consistent for r in runs)}
    (out / "results.json").write_text(json.dumps(_clean(doc), indent=2) + "\n")
    (out / "report.md").write_text(markdown(meta, runs, raws=raws, rec=rec, figures=figures,
                                            probers=probers, overheads=overheads))


def markdown(meta: dict[str, Any], runs: list[RunResult], *, raws: list[RawResult],
             rec: Recommendation, figures: list[str], probers: list[ProberComparison],
             overheads: list[Overhead]) -> str:
    many = several_probers(runs)
    repeated = any(r.repeat > 1 for r in runs)

    def nth(r: RunResult) -> str:
        return f" #{r.repeat}" if repeated else ""

    def name(r: RunResult) -> str:
        return label(r, prober=many) + nth(r)

    lines = [f"# alertd load test: {meta['profile']['name']}", "",
             f"Command: `{meta['command']}`", "",
             f"{meta['date']} on {meta['host']} ({meta['cpus']} CPUs, "
             f"{meta['memory_gib']:.0f} GiB), alertd {meta['alertd_version']} "
             f"(commit {meta['commit']}), prober `{meta['prober']}`"
             + (", no-op adapters (framework overhead)" if meta.get("noop_adapters") else "")
             + ".", "",
             f"**Profile `{meta['profile']['name']}`**: {meta['profile']['summary']}. "
             f"{meta['profile_text']}.", "",
             f"**Method**: {meta['method']}", "",
             "## Results", "",
             "| workers | concurrency | prober | slots | alerts | alerts/s | p50 ms | p95 ms "
             "| p99 ms | CPU ms/alert | alertd cores | machine cores | busy slots "
             "| child RSS MB | tree RSS MB | failed | DLQ | webhook 500s "
             "| load 1m start -> end | status |",
             "|---:|---:|---|" + "---:|" * 16 + "---|"]
    for r in runs:
        lines.append(
            f"| {r.workers} | {r.concurrency} | {r.prober}{nth(r)} | {r.slots} "
            f"| {r.alerts_delivered} "
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
            f"| {name(r)} | {_num(r.stage_dedup_ms)} | {_num(r.stage_download_ms)} "
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
            f"| {name(r)} | {_num(r.cpu_ms_per_alert, 2)} "
            f"| {_num(r.cpu_metric_ms_per_alert, 2)} | {_num(r.broker_ms_per_alert, 2)} "
            f"| {_num(r.database_ms_per_alert, 2)} | {_num(r.loadgen_ms_per_alert, 2)} "
            f"| {_num(r.busiest_child_cores, 2)} | {_num(r.cores_other, 2)} |")
    lines += ["", "alertd tree = the master, its children and all their descendants (PyAV "
              "helpers, ffprobe runs) from /proc/<pid>/stat; alertd_cpu_seconds_total is "
              "alertd's own counter. Busiest child = one child's own CPU "
              "(its event loop, without its probe processes) over the window: near 1 core, "
              "that child cannot go faster."]
    if probers:
        lines += ["", "## Probers side by side", "",
                  "Same machine, same configuration, runs back to back (their order "
                  "alternating from one configuration to the next):", ""]
        lines += [f"- {c.line()}" for c in probers]
    if any(r.adapters == "noop" for r in runs):
        lines += _overhead_section(runs, raws, overheads, name)
    if raws:
        lines += _raw_section(runs, raws, name)
    spied = [r for r in runs if r.py_spy_files]
    if spied or any(r.notes for r in runs):
        lines += ["", "## py-spy", ""]
        if spied:
            lines += ["Profiles of the measured windows: [profile.md](profile.md) (raw "
                      "files in `pyspy/`, summarize again with `python -m loadkit.spy`)."]
        lines += [f"- {name(r)}: {note}" for r in runs for note in r.notes]
    lines += ["", "## Recommendation", "", *[f"- {line}" for line in rec.reasoning]]
    lines += ["", "## Consistency check", ""]
    failed = [(r, c) for r in runs for c in r.checks]
    if failed:
        lines += ["**FAILED**: the tool's counts disagree with alertd's /metrics:", ""]
        lines += [f"- {name(r)}: {c}" for r, c in failed]
    else:
        lines.append("Passed: for every run, alerts processed by outcome and code, webhook "
                     "deliveries and 500s, alert-duration observations and database rows "
                     "equal alertd's /metrics deltas and the sink's receipts (no-op runs: "
                     "/metrics counts every prefilled message as done, none left or "
                     "dead-lettered).")
    outcomes = "; ".join(f"{name(r)}: " + ", ".join(f"{k} {v}" for k, v in r.outcomes.items())
                         for r in runs)
    lines += ["", f"Outcomes: {outcomes}.", "", "## Figures", ""]
    lines += [f"![{figure}]({figure})" for figure in figures]
    return "\n".join(lines) + "\n"


def _overhead_section(runs: list[RunResult], raws: list[RawResult], overheads: list[Overhead],
                      name: Callable[[RunResult], str]) -> list[str]:
    lines = ["", "## Framework overhead (no-op adapters)", "",
             "alertd as in production (master, children, AMQP consumer, handler, use case, "
             "stats, /metrics) with adapters that do nothing: no download, probe, database or "
             "webhook. Like the raw consumer it took a prefilled queue: alertd was stopped "
             "(SIGSTOP, whole process group) while the queue was filled with the same alert "
             "bodies, then resumed; CPU = the whole tree (master + children) from resume until "
             "the queue was empty and /metrics counted every message, per message. "
             "msgs/s = messages / (resume -> no message ready).", "",
             "| config | messages | msgs/s | alertd CPU ms/msg | of it master | raw ms/msg "
             "(prefetch) | overhead | idle tree cores | paused s |",
             "|---|" + "---:|" * 8]
    for r in (r for r in runs if r.adapters == "noop"):
        ref = raw_for(r, raws)
        raw = pct = "-"
        if ref is not None and ref.cpu_ms_per_message:
            raw = f"{ref.cpu_ms_per_message:.3f} ({ref.prefetch})"
            pct = f"{overhead_pct(r.cpu_ms_per_alert, ref.cpu_ms_per_message):+.0f}%"
        lines.append(f"| {name(r)} | {r.alerts_delivered} | {_num(r.alerts_per_s, 0)} "
                     f"| {_num(r.cpu_ms_per_alert, 3)} | {_num(r.master_ms_per_alert, 3)} "
                     f"| {raw} | {pct} | {_num(r.idle_cores_alertd, 3)} "
                     f"| {_num(r.paused_s, 1)} |")
    lines.append("")
    if any(r.repeat > 1 for r in runs) and overheads:
        lines += ["Each row is one run, set against the raw run of its round (#i, run just "
                  "after that round's no-op runs of its prefetch). Per configuration: medians "
                  "(min-max) of its runs and of their raw runs, the overhead median against "
                  "median, and the range of the per-pair overheads:", ""]
    if overheads:
        lines += [f"- {o.line()}" for o in overheads]
    else:
        lines += [f"- {line}" for line in noop_medians(runs)]
        lines.append("No raw consumer to compare with: add `--compare-raw`.")
    lines += ["", "Idle tree cores: alertd's CPU while it had nothing to do (heartbeats, the "
              "master's tick, the outbox poll), read for 1 s before the pause (/proc counts "
              "10 ms ticks: 0.000 is below 0.01 cores); it runs during the measured window "
              "too and is part of the figure."]
    return lines


def _raw_section(runs: list[RunResult], raws: list[RawResult],
                 name: Callable[[RunResult], str]) -> list[str]:
    lines = ["", "## Against the raw client limit", "",
             f"A bare aiormq + uvloop consumer (parse the JSON, ack) took {raws[0].messages} "
             "messages of the same shape from a prefilled quorum queue of the same broker:", ""]
    if any(raw.repeat > 1 for raw in raws):
        lines += _raw_medians(raws)
        lines += ["", "Each run is set against the raw run of its round (#i) with its prefetch "
                  "(= its concurrency), else against that round's first."]
    else:
        for raw in raws:
            lines.append(
                f"- prefetch {raw.prefetch}: **{raw.per_s:.0f} messages/s** at "
                f"**{raw.cpu_ms_per_message:.3f} CPU ms/message** (RabbitMQ "
                f"{raw.broker_ms_per_message:.3f} ms/message)")
        if len(raws) > 1:
            lines += ["", "Each run is set against the raw run with its prefetch (= its "
                      "concurrency), else against the first."]
    lines += ["", "| config | alerts/s | % of raw rate | CPU ms/alert | x raw CPU |",
              "|---|---:|---:|---:|---:|"]
    for r in runs:
        ref = raw_for(r, raws)
        assert ref is not None
        share = r.alerts_per_s / ref.per_s if ref.per_s else math.nan
        lines.append(f"| {name(r)} | {_num(r.alerts_per_s)} | {_num(100 * share, 1)}% "
                     f"| {_num(r.cpu_ms_per_alert, 2)} | {_num(r.cpu_x_raw, 2)} |")
    return lines


def _raw_medians(raws: list[RawResult]) -> list[str]:
    """With --repeat: per prefetch, the median (min-max) of its raw runs, in the order run."""
    by_prefetch: dict[int, list[RawResult]] = {}
    for raw in raws:
        by_prefetch.setdefault(raw.prefetch, []).append(raw)
    lines = []
    for prefetch, found in by_prefetch.items():
        rate = Spread.of(r.per_s for r in found)
        cpu = Spread.of(r.cpu_ms_per_message for r in found)
        broker = Spread.of(r.broker_ms_per_message for r in found)
        lines.append(
            f"- prefetch {prefetch}, median of {len(found)} runs: **{_num(rate.median, 0)} "
            f"messages/s** ({rate.span('.0f')}) at **{_num(cpu.median, 3)} CPU "
            f"ms/message** ({cpu.span('.3f')}); RabbitMQ {_num(broker.median, 3)} ms/message")
    return lines
