"""The load's two HTTP ends: a slow clip server and a webhook sink that times every arrival.

Both extend tests/servers.py and run on one uvloop loop in a background
thread (:class:`ServerThread`), next to the publisher in the main thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import uvloop
from aiohttp import web

from loadkit.profiles import Profile
from tests.servers import ClipServer, WebhookSink

T = TypeVar("T")
PACE_TICK_S = 0.02  # a capped response is sent in slices of this many seconds of bandwidth


class LoadClipServer(ClipServer):
    """``/load/<name>``: waits latency + uniform(0, jitter), then sends the clip at <= bandwidth."""

    def __init__(self, files: Mapping[str, Path], profile: Profile, *, seed: int = 1) -> None:
        super().__init__({name: str(path) for name, path in files.items()})
        self.blobs = {name: Path(path).read_bytes() for name, path in files.items()}
        self.profile = profile
        self._rng = random.Random(seed)
        self.app.router.add_get("/load/{name}", self._load)

    async def _load(self, request: web.Request) -> web.StreamResponse:
        blob = self.blobs.get(request.match_info["name"])
        if blob is None:
            raise web.HTTPNotFound()
        p = self.profile
        wait = p.clip_latency_s + self._rng.uniform(0.0, p.clip_jitter_s)
        if wait > 0:
            await asyncio.sleep(wait)
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = len(blob)
        await response.prepare(request)
        if not p.bandwidth_bps:
            await response.write(blob)
        else:
            await _paced_write(response, blob, p.bandwidth_bps)
        await response.write_eof()
        return response


async def _paced_write(response: web.StreamResponse, blob: bytes, bandwidth_bps: float) -> None:
    """Send ``blob`` so that this connection never runs ahead of ``bandwidth_bps``."""
    loop = asyncio.get_running_loop()
    chunk = max(4096, int(bandwidth_bps * PACE_TICK_S))
    started, sent = loop.time(), 0
    for at in range(0, len(blob), chunk):
        piece = blob[at:at + chunk]
        await response.write(piece)
        sent += len(piece)
        ahead = sent / bandwidth_bps - (loop.time() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)


@dataclass(frozen=True)
class Receipt:
    """One webhook attempt as the sink saw it; times are ``time.time()`` seconds."""

    alert_id: str
    status: str  # "done" / "failed", from the payload
    code: str  # the error code of a failed alert, "" when done
    published_at: float  # from the alert's attributes, echoed back by alertd
    processed_at: float  # the payload's processed_at: the outcome's time, just before its commit
    received_at: float  # when the request arrived, before the sink's own latency
    answered: int  # 200, or 500 for an injected failure


def _epoch(rfc3339: object) -> float:
    try:
        return dt.datetime.fromisoformat(str(rfc3339)).timestamp()
    except ValueError:
        return math.nan


class LoadSink(WebhookSink):
    """Answers after latency + jitter; 500 for ``failure_rate`` of attempts, else 200.

    ``on_receipt`` runs on the server's loop for every attempt; keep it short.
    """

    def __init__(self, profile: Profile, *, seed: int = 2) -> None:
        super().__init__()
        self.profile = profile
        self.receipts: list[Receipt] = []
        self.on_receipt: Callable[[Receipt], None] | None = None
        self._rng = random.Random(seed)

    async def _answer(self, request: web.Request) -> web.Response:
        received = time.time()
        doc = orjson.loads(await request.read())  # the recording middleware cached the body
        attributes = doc.get("attributes") or {}
        error = doc.get("error") or {}
        p = self.profile
        answered = 500 if self._rng.random() < p.sink_failure_rate else 200
        receipt = Receipt(
            alert_id=str(doc.get("alert_id")), status=str(doc.get("status")),
            code=str(error.get("code") or ""),
            published_at=float(attributes.get("published_at", 0.0)),
            processed_at=_epoch(doc.get("processed_at")), received_at=received,
            answered=answered)
        self.receipts.append(receipt)
        if self.on_receipt is not None:
            self.on_receipt(receipt)
        wait = p.sink_latency_s + self._rng.uniform(0.0, p.sink_jitter_s)
        if wait > 0:
            await asyncio.sleep(wait)
        return web.Response(status=answered, text="ok\n" if answered == 200 else "injected\n")

    def forget(self) -> None:
        """Drop what was recorded so far (between runs)."""
        self.receipts = []
        self.requests.clear()


class ServerThread:
    """The clip server and the sink on a uvloop loop in a daemon thread."""

    def __init__(self, clips: LoadClipServer, sink: LoadSink) -> None:
        self.clips = clips
        self.sink = sink
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="servers",
                                        daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self.clips.__aenter__())
        self.call(self.sink.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.sink.__aexit__(None, None, None))
        self.call(self.clips.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def forget(self) -> None:
        """Clear both servers' records, on their own loop (they append there)."""
        async def clear() -> None:
            self.sink.forget()
            self.clips.requests.clear()
        self.call(clear())

    def receipts(self) -> list[Receipt]:
        """A copy of the sink's receipts, taken on the servers' loop."""
        async def copy() -> list[Receipt]:
            return list(self.sink.receipts)
        return self.call(copy())

    def clip_url(self, name: str) -> str:
        return self.clips.url(f"/load/{name}")

    def hook_url(self) -> str:
        return self.sink.url("/hook")
