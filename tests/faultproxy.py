"""A TCP proxy on loopback that injects network faults between alertd and a service.

Modes: ``pass`` forwards bytes; ``stall`` keeps every connection open but
forwards nothing (a broker or database that stops answering without closing,
which only heartbeats or keepalives can detect); ``down`` resets every
connection and every new one at once (a service that is gone); ``cut()``
resets the current connections only. It runs its own event loop in a thread so synchronous
end-to-end tests can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"
                 ) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.mode = "pass"
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()

    def __enter__(self) -> Self:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self.mode = "stall"
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        """Back to forwarding (after ``stall`` or ``down``)."""
        self.mode = "pass"
        self._loop.call_soon_threadsafe(self._flowing.set)

    def down(self) -> None:
        """Reset every connection, and every new one as soon as it arrives."""
        self.mode = "down"
        self._call(self._cut())

    def cut(self) -> None:
        """Reset every open connection (new ones are still accepted)."""
        self._call(self._cut())

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()

    async def _cut(self) -> None:
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # SO_LINGER 0: close with RST, as a crashed peer would.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.close()
        self._writers.clear()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
                     ) -> None:
        self.accepted += 1
        if self.mode == "down":
            self._writers.add(client_w)
            await self._cut()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}
        await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w),
                             return_exceptions=True)
        for writer in (client_w, server_w):
            self._writers.discard(writer)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()
