"""Local aiohttp servers for tests, demos and load tests: a faulty clip server and a webhook sink.

Both bind to loopback on an ephemeral port, record every request they get
(so a test can prove a host was never contacted) and are async context
managers::

    async with ClipServer({"a.mp4": path}) as srv:
        srv.url("/clips/a.mp4")
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web

DRIP_INTERVAL_S = 0.2
SEEN_INDEX = web.RequestKey("seen_index", int)  # position of a request in ``requests``


def payload(size: int) -> bytes:
    """Deterministic pseudo-random bytes; ``/bytes/<n>`` and friends serve exactly these."""
    return random.Random(size).randbytes(size)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int] | None = None  # client address: same peer = reused connection


class _LocalServer:
    """Runs ``self.app`` on ``host``:ephemeral port and records each request before handling it."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.requests: list[SeenRequest] = []
        self._arrived = asyncio.Condition()
        self.app = web.Application(middlewares=[self._record])
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [r.path_qs for r in self.requests]

    async def wait_for(self, count: int, within_s: float = 5.0) -> list[SeenRequest]:
        """Wait until ``count`` requests have arrived; return them all."""
        async with asyncio.timeout(within_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    @web.middleware
    async def _record(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        body = await request.read()
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = (str(peername[0]), int(peername[1])) if peername else None
        async with self._arrived:
            request[SEEN_INDEX] = len(self.requests)
            self.requests.append(
                SeenRequest(request.method, request.path_qs, dict(request.headers), body, peer)
            )
            self._arrived.notify_all()
        return await handler(request)

    async def __aenter__(self) -> Self:
        # handler_cancellation: a client that gives up (timeout, too large)
        # must stop /endless and /drip instead of leaving them running.
        self._runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class ClipServer(_LocalServer):
    """Serves files by name at ``/clips/<name>`` plus routes that misbehave on purpose."""

    def __init__(self, files: Mapping[str, str | Path] | None = None, *,
                 host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.files = dict(files or {})
        self.app.add_routes([
            web.get("/clips/{name}", self._clip),
            web.get("/bytes/{size:\\d+}", self._bytes),
            web.get("/status/{code:\\d+}", self._status),
            web.get("/redirect/{n:\\d+}", self._redirect_chain),
            web.get("/redirect-to", self._redirect_to),
            web.get("/slow-headers", self._slow_headers),
            web.get("/drip", self._drip),
            web.get("/endless", self._endless),
            web.get("/reset", self._reset),
            web.get("/lying-length", self._lying_length),
            web.get("/no-length/{size:\\d+}", self._no_length),
        ])

    async def _clip(self, request: web.Request) -> web.StreamResponse:
        path = self.files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _bytes(self, request: web.Request) -> web.Response:
        """``size`` bytes of :func:`payload` with a correct Content-Length."""
        return web.Response(body=payload(int(request.match_info["size"])))

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        retry_after = request.query.get("retry_after")
        headers = {"Retry-After": retry_after} if retry_after else {}
        return web.Response(status=code, text=f"status {code}\n", headers=headers)

    async def _redirect_chain(self, request: web.Request) -> web.Response:
        """``/redirect/<n>``: n relative 302s, then ``?size=`` bytes of payload (default 1000)."""
        n = int(request.match_info["n"])
        size = int(request.query.get("size", "1000"))
        if n == 0:
            return web.Response(body=payload(size))
        raise web.HTTPFound(f"/redirect/{n - 1}?size={size}")

    async def _redirect_to(self, request: web.Request) -> web.Response:
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["url"]})

    async def _slow_headers(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "30")))
        return web.Response(body=b"late")

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        """Declares ``?bytes=`` (default 100) then sends one byte per ``?interval=`` seconds."""
        size = int(request.query.get("bytes", "100"))
        interval = float(request.query.get("interval", str(DRIP_INTERVAL_S)))
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for byte in payload(size):
            await response.write(bytes([byte]))
            await asyncio.sleep(interval)
        return response

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no length to refuse early
        await response.prepare(request)
        chunk = payload(64 * 1024)
        while True:
            await response.write(chunk)

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        """Chunked body, then an abortive close (RST) after ``?bytes=`` (default 10000)."""
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(payload(int(request.query.get("bytes", "10000"))))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _lying_length(self, request: web.Request) -> web.StreamResponse:
        """Content-Length twice ``?bytes=`` (default 10000), half sent, then a clean close."""
        size = int(request.query.get("bytes", "10000"))
        response = web.StreamResponse()
        response.content_length = size * 2
        await response.prepare(request)
        await response.write(payload(size))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response

    async def _no_length(self, request: web.Request) -> web.StreamResponse:
        """Exactly ``size`` bytes of :func:`payload`, chunked, without Content-Length."""
        data = payload(int(request.match_info["size"]))
        response = web.StreamResponse()
        await response.prepare(request)
        for start in range(0, len(data), 16 * 1024):
            await response.write(data[start:start + 16 * 1024])
        await response.write_eof()
        return response


@dataclass(frozen=True)
class Reply:
    """One scripted answer of the sink."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes = b""


class WebhookSink(_LocalServer):
    """Records every request and answers from ``script`` in order; the last answer repeats."""

    def __init__(self, script: Sequence[int | Reply] = (200,), *,
                 host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.script = [r if isinstance(r, Reply) else Reply(r) for r in script] or [Reply()]
        self.app.router.add_route("*", "/{tail:.*}", self._answer)

    async def _answer(self, request: web.Request) -> web.Response:
        reply = self.script[min(request[SEEN_INDEX], len(self.script) - 1)]
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return web.Response(status=reply.status, headers=dict(reply.headers), body=reply.body)
