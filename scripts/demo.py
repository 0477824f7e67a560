"""scripts/demo's helper: the demo's local servers, its alerts, and the check of the result.

Subcommands (each run by scripts/demo, which owns the processes and cleanup):

  serve           clip server (tests/servers.py ClipServer, with failing routes) and a
                  webhook sink that verifies Standard Webhooks signatures; runs until TERM
  alerts          print the demo's alert bodies, one per line, for ``alertd publish -f``
  wait-consuming  wait until every child of the master answers "consuming"
  report          wait (bounded) for every outcome, webhook and dead letter, print the
                  tables, exit 1 unless everything is what the demo expects
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pika
import pika.exceptions
import psycopg
from aiohttp import web
from psycopg.rows import dict_row

from alertd.adapters.amqp import topology
from alertd.config import Settings, parse_webhook_secrets
from alertd.deadletters import list_dead_letters
from alertd.errors import AlertdError
from alertd.signing import verify
from alertd.statusclient import fetch_status

ROOT = Path(__file__).resolve().parent.parent
FLAKY_HOOK = "/hook/flaky"  # answers 503 + Retry-After: 1 to a webhook-id's first attempt


@dataclass(frozen=True)
class Expected:
    """One valid alert of the demo and the outcome alertd must store and deliver for it."""

    alert_id: str
    clip: str  # path on the clip server; "//127.0.0.2" prefix = same server, other address
    status: str
    code: str = ""
    attempts: int = 1
    codec: str = ""
    resolution: str = ""
    duration_s: float | None = None
    hook: str = "/hook"


VALID = (
    Expected("ok-mp4", "/clips/mp4", "done", codec="h264", resolution="320x240",
             duration_s=2.0),
    Expected("ok-webm", "/clips/webm", "done", codec="vp8", resolution="320x240",
             duration_s=1.0),
    Expected("ok-mkv", "/clips/mkv", "done", codec="h264", resolution="320x240",
             duration_s=1.0, hook=FLAKY_HOOK),
    Expected("ok-audio", "/clips/audio_only", "done", codec="aac (audio only)",
             resolution="-", duration_s=1.0),
    Expected("e-404", "/status/404", "failed", "download_not_found"),
    Expected("e-notvideo", "/clips/not_a_video", "failed", "not_a_video"),
    Expected("e-ssrf", "//127.0.0.2/clips/mp4", "failed", "forbidden_address"),
    Expected("e-toolarge", "/clips/large", "failed", "download_too_large"),
    Expected("e-timeout", "/drip?bytes=100&interval=0.2", "failed", "download_timeout",
             attempts=2),
)
# (label, what x-alertd-reason must start with)
INVALID = (("invalid JSON", "invalid_json:"), ("no alert_id", "missing_field: alert_id"))


def servers(state: Path) -> dict[str, int]:
    ports: dict[str, int] = orjson.loads((state / "servers.json").read_bytes())
    return ports


def clip_url(ports: dict[str, int], clip: str) -> str:
    if clip.startswith("//"):
        host, _, path = clip[2:].partition("/")
        return f"http://{host}:{ports['clips']}/{path}"
    return f"http://127.0.0.1:{ports['clips']}{clip}"


def alert_bodies(ports: dict[str, int]) -> list[bytes]:
    sink = f"http://127.0.0.1:{ports['sink']}"
    bodies = [orjson.dumps({
        "alert_id": e.alert_id, "video_url": clip_url(ports, e.clip),
        "webhook_url": sink + e.hook, "source": "demo-camera-1",
        "occurred_at": "2024-05-01T12:00:00Z", "attributes": {"demo": True},
    }) for e in VALID]
    bodies.append(b'{"alert_id": "broken", "video_url": ')  # invalid JSON
    bodies.append(orjson.dumps({"video_url": clip_url(ports, "/clips/mp4"),
                                "webhook_url": sink + "/hook"}))  # no alert_id
    bodies.append(bodies[0])  # a duplicate of ok-mp4: one row, one webhook
    return bodies


# -- serve -------------------------------------------------------------------------


async def serve(state: Path, clips_dir: Path) -> None:
    sys.path.insert(0, str(ROOT))  # tests/ is not installed; its servers are reused
    from tests.servers import ClipServer

    secrets = parse_webhook_secrets(os.environ.get("ALERTD_WEBHOOK_SECRET"))
    files = {"mp4": clips_dir / "clip.mp4", "webm": clips_dir / "clip.webm",
             "mkv": clips_dir / "clip.mkv", "audio_only": clips_dir / "audio_only.m4a",
             "not_a_video": clips_dir / "not_a_video.mp4", "large": clips_dir / "large.mp4"}
    log = (state / "webhooks.jsonl").open("ab")
    seen_ids: set[str] = set()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        webhook_id = headers.get("webhook-id", "")
        try:
            signature_ok = verify(secrets, webhook_id, int(headers.get("webhook-timestamp", "")),
                                  body, headers.get("webhook-signature", ""), now=time.time())
        except ValueError:
            signature_ok = False
        answer = 200 if signature_ok else 401
        if signature_ok and request.path == FLAKY_HOOK and webhook_id not in seen_ids:
            answer = 503
        seen_ids.add(webhook_id)
        doc = orjson.loads(body) if body.startswith(b"{") else {}
        log.write(orjson.dumps({
            "alert_id": doc.get("alert_id"), "type": doc.get("type"),
            "webhook_id": webhook_id, "signature_ok": signature_ok, "answered": answer,
        }) + b"\n")
        log.flush()
        return web.Response(status=answer, headers={"Retry-After": "1"} if answer == 503 else {})

    sink = web.Application()
    sink.router.add_post("/{tail:.*}", receive)
    runner = web.AppRunner(sink, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with ClipServer({k: str(v) for k, v in files.items()}) as clips:
        ready = {"clips": clips.port, "sink": runner.addresses[0][1]}
        (state / "servers.tmp").write_bytes(orjson.dumps(ready))
        (state / "servers.tmp").rename(state / "servers.json")
        await stop.wait()
    await runner.cleanup()
    log.close()


# -- wait-consuming ----------------------------------------------------------------


def wait_consuming(control_socket: str, workers: int, pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"alertd (pid {pid}) exited before consuming", file=sys.stderr)
            return 1
        with contextlib.suppress(AlertdError, ValueError):
            kids = fetch_status(control_socket, timeout=2)["children"]
            if sum(c["state"] == "consuming" for c in kids) >= workers:
                return 0
        time.sleep(0.3)
    print(f"alertd children not consuming after {timeout:.0f}s", file=sys.stderr)
    return 1


# -- report ------------------------------------------------------------------------


def fetch_rows(dsn: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        alerts = {r["alert_id"]: r for r in conn.execute("SELECT * FROM alerts")}
        outbox = list(conn.execute(
            "SELECT alert_id, webhook_id, status, attempts FROM webhook_outbox ORDER BY id"))
    return alerts, outbox


def fetch_webhooks(state: Path) -> list[dict[str, Any]]:
    path = state / "webhooks.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def queue_counts(settings: Settings) -> dict[str, int]:
    """Ready messages per queue alertd declared (main, delay queues, DLQ)."""
    counts = {}
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        for name, _ in topology(settings):
            channel = connection.channel()
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                counts[name] = channel.queue_declare(name, passive=True).method.message_count
                channel.close()
    finally:
        connection.close()
    return counts


def settled(settings: Settings, dsn: str, state: Path) -> bool:
    alerts, outbox = fetch_rows(dsn)
    delivered = {h["alert_id"] for h in fetch_webhooks(state) if h["answered"] == 200}
    counts = queue_counts(settings)
    dlq = counts.pop(f"{settings.queue}.dlq", 0)
    return (set(alerts) == {e.alert_id for e in VALID} and delivered == set(alerts)
            and all(o["status"] != "pending" for o in outbox)
            and dlq >= len(INVALID) and not any(counts.values()))


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("{:<%d}" % w for w in widths)  # noqa: UP031 - widths are data
    rule = "  ".join("-" * w for w in widths)
    return "\n".join(x.rstrip() for x in [line.format(*header), rule,
                                           *(line.format(*r) for r in rows)])


def describe(row: dict[str, Any] | None) -> tuple[str, str, str, str, str]:
    """status, error code, duration, resolution, codec of a stored row."""
    if row is None:
        return "MISSING", "", "", "", ""
    meta, error = row["metadata"] or {}, row["error"] or {}
    video, audio = meta.get("video"), meta.get("audio")
    duration = f"{meta['duration_s']:.3f}s" if meta.get("duration_s") is not None else "-"
    resolution = f"{video['width']}x{video['height']}" if video else "-"
    codec = video["codec"] if video else f"{audio['codec']} (audio only)" if audio else "-"
    if not meta:
        duration = resolution = codec = "-"
    return row["status"], error.get("code", "-"), duration, resolution, codec


def report(settings: Settings, dsn: str, state: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not settled(settings, dsn, state):
        if time.monotonic() > deadline:
            print(f"!! not settled after {timeout:.0f}s; reporting what there is")
            break
        time.sleep(0.5)
    time.sleep(1.5)  # a second webhook or row for the duplicate would show up by now
    alerts, outbox = fetch_rows(dsn)
    hooks = fetch_webhooks(state)
    counts = queue_counts(settings)
    dead = list_dead_letters(settings)  # looks only: they stay in the DLQ
    problems: list[str] = []

    def expect(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    rows = []
    for e in VALID:
        row = alerts.get(e.alert_id)
        status, code, duration, resolution, codec = describe(row)
        got = [h for h in hooks if h["alert_id"] == e.alert_id]
        ids = {h["webhook_id"] for h in got}
        signed = bool(got) and all(h["signature_ok"] for h in got)
        answered = [str(h["answered"]) for h in got]
        delivered = "200" in answered
        hook = ("yes" if delivered else "no") + (f" after {', '.join(answered[:-1])}"
                                                  if len(answered) > 1 else "")
        hook += ", signature ok" if signed else ", SIGNATURE BAD" if got else ""
        attempts = str(row["attempts"]) if row else "-"
        rows.append((e.alert_id, status, code, attempts, duration, resolution, codec, hook))
        want = (e.status, e.code or "-", str(e.attempts))
        expect((status, code, attempts) == want,
               f"{e.alert_id}: status/code/attempts {(status, code, attempts)} != {want}")
        if e.status == "done":
            expect((resolution, codec) == (e.resolution, e.codec),
                   f"{e.alert_id}: {resolution} {codec} != {e.resolution} {e.codec}")
            expect(e.duration_s is not None and abs(float(duration[:-1]) - e.duration_s) < 0.1,
                   f"{e.alert_id}: duration {duration} != {e.duration_s}s")
        expect(delivered and signed, f"{e.alert_id}: webhook delivered={delivered} "
                                     f"signed={signed}")
        expect(len(ids) == 1, f"{e.alert_id}: {len(ids)} webhook-ids (want 1, retries reuse it)")
        expect(answered.count("200") == 1, f"{e.alert_id}: {answered.count('200')} deliveries")
    expect(sum(o["alert_id"] == "ok-mp4" for o in outbox) == 1, "duplicate got a 2nd outbox row")
    expect(all(o["status"] == "delivered" for o in outbox), "an outbox row is not delivered")
    expect(not any(v for k, v in counts.items() if not k.endswith(".dlq")),
           f"messages left in queues: {counts}")

    print("Alerts (table alerts + webhooks received by the local sink)")
    print(table(("alert", "status", "error code", "tries", "duration", "resolution", "codec",
                 "webhook delivered"), rows))
    print()
    print(f"Dead-letter queue {settings.queue}.dlq")
    reasons = [str(letter.headers.get("x-alertd-reason", "")) for letter in dead]
    print(table(("body", "x-alertd-reason"),
                [(_short(letter.body), reason) for letter, reason in zip(dead, reasons,
                                                                          strict=True)]))
    for label, prefix in INVALID:
        expect(sum(r.startswith(prefix) for r in reasons) == 1, f"DLQ: no '{prefix}' ({label})")
    expect(len(dead) == len(INVALID), f"DLQ holds {len(dead)} messages, want {len(INVALID)}")
    print()
    print(f"Duplicate of ok-mp4: {sum(a == 'ok-mp4' for a in alerts)} row, "
          f"{sum(o['alert_id'] == 'ok-mp4' for o in outbox)} outbox row, "
          f"{sum(h['alert_id'] == 'ok-mp4' for h in hooks)} webhook")
    print("Queues (ready): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print()
    if problems:
        print("DEMO FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"DEMO OK: {len(VALID)} alerts stored and delivered as expected, "
          f"{len(dead)} dead letters, 1 duplicate absorbed")
    return 0


def _short(body: bytes, width: int = 48) -> str:
    text = body.decode("utf-8", "replace")
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, required=True, help="the demo run's directory")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve").add_argument("--clips", type=Path, required=True)
    sub.add_parser("alerts")
    waiting = sub.add_parser("wait-consuming")
    waiting.add_argument("--control-socket", required=True)
    waiting.add_argument("--workers", type=int, required=True)
    waiting.add_argument("--pid", type=int, required=True)
    waiting.add_argument("--timeout", type=float, default=30)
    checking = sub.add_parser("report")
    checking.add_argument("--max-attempts", type=int, required=True)
    checking.add_argument("--retry-delay", type=float, required=True)
    checking.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()

    commands: dict[str, Callable[[], int | None]] = {
        "serve": lambda: asyncio.run(serve(args.state, args.clips)),
        "alerts": lambda: print("\n".join(b.decode() for b in alert_bodies(servers(args.state)))),
        "wait-consuming": lambda: wait_consuming(args.control_socket, args.workers, args.pid,
                                                 args.timeout),
        "report": lambda: report(
            Settings(amqp_url=os.environ["ALERTD_AMQP_URL"],
                     queue=os.environ.get("ALERTD_QUEUE", "alerts"),
                     max_attempts=args.max_attempts, retry_delay=args.retry_delay),
            os.environ["ALERTD_DSN"], args.state, args.timeout),
    }
    return commands[args.command]() or 0


if __name__ == "__main__":
    sys.exit(main())
