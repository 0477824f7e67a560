"""``alertd status``: ask the master's control socket and render what it says."""

from __future__ import annotations

import socket
from typing import Any

import orjson

from alertd.errors import AlertdError


def fetch_status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"status\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise AlertdError(f"no master answers on {path}: {exc.strerror or exc}") from None
    try:
        doc: dict[str, Any] = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise AlertdError(f"the master on {path} answered something that is not JSON") from None
    if "error" in doc:
        raise AlertdError(f"the master on {path} refused: {doc['error']}")
    return doc


def render_status(doc: dict[str, Any]) -> str:
    lines = [
        f"master pid {doc['master_pid']}, up {doc['uptime_s']:.0f}s, "
        f"{doc['workers']} children x {doc['concurrency']} slots, "
        f"{doc['processed']} processed, {doc['failed']} failed, {doc['restarts']} restarts"
        + (f", stopping ({doc['stopping']})" if doc.get("stopping") else ""),
        f"{'CHILD':>5} {'PID':>7} {'STATE':<10} {'AGE':>7} {'RESTARTS':>8} {'RSS MB':>7} "
        f"{'LAG ms':>7} {'PROCESSED':>9} {'FAILED':>6}",
    ]
    scaling = doc.get("autoscale")
    if scaling:
        lines.insert(1, f"autoscale {scaling['min']}..{scaling['max']}: target "
                        f"{scaling['target']}, queue ready {scaling['queue_ready']}, decisions "
                        f"up {scaling['decisions']['up']} / down {scaling['decisions']['down']}")
    for c in doc["children"]:
        lines.append(
            f"{c['index']:>5} {c['pid']:>7} {c['state'] + ('*' if c['retiring'] else ''):<10} "
            # A master started before per-child restarts has no such field: "-".
            f"{c['age_s']:>6.0f}s {c.get('restarts', '-'):>8} {c['rss_bytes'] / 1e6:>7.1f} "
            f"{c['loop_lag_s'] * 1000:>7.1f} {c['processed']:>9} {c['failed']:>6}")
        for slot in c["slots"]:
            lines.append(f"{'':>14}slot: {slot['alert_id'] or '-'} {slot['stage']} "
                         f"{slot['elapsed_s']:.1f}s")
    return "\n".join(lines)
