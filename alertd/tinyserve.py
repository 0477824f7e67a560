"""A tiny non-blocking request/response server for the master's select loop.

The master has no threads and no event loop (it forks), so its HTTP endpoint
(/metrics, /healthz, /readyz) and its control socket (``alertd status``) are
served from its own selector: accept, read one request, write one response,
close. Slow or idle clients are dropped after a deadline; they can never stall
the loop that supervises the children.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024
CLIENT_DEADLINE_S = 5.0
ACCEPT_ERROR_LOG_EVERY_S = 10.0

# (method, path) -> (status, content type, body)
HttpHandler = Callable[[str, str], tuple[int, str, bytes]]
LineHandler = Callable[[str], bytes]

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
           503: "Service Unavailable"}


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""
    sent: int = 0


class TinyServer:
    """One listening socket, answered by ``respond`` once a full request arrived."""

    def __init__(self, listener: socket.socket, selector: selectors.BaseSelector, *,
                 http: HttpHandler | None = None, line: LineHandler | None = None) -> None:
        assert (http is None) != (line is None)
        self.listener = listener
        self._selector = selector
        self._http = http
        self._line = line
        self._clients: dict[int, _Client] = {}
        self._accept_error_logged = 0.0
        self._unix: tuple[str, int] | None = None  # path and inode of a socket we bound
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, self._accept)

    @classmethod
    def tcp(cls, host: str, port: int, selector: selectors.BaseSelector,
            http: HttpHandler) -> TinyServer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        return cls(sock, selector, http=http)

    @classmethod
    def unix(cls, path: str, selector: selectors.BaseSelector, line: LineHandler) -> TinyServer:
        """Listen on ``path``, replacing a stale socket file but never a live one.

        A socket file nobody answers on is what a killed master leaves. One
        that answers belongs to a running master (a second instance started
        with the same ``--control-socket``): taking it over would leave that
        master unreachable by ``alertd status`` and, once it stops, unlink
        the path under this one.
        """
        if _answers(path):
            raise OSError(errno.EADDRINUSE, "another process (a running alertd master?) "
                          "answers on it")
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                # A typo'd path naming a file (the master often runs as root):
                # never delete what is not a socket.
                raise OSError(errno.EEXIST, "it exists and is not a socket; not replacing it")
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
            inode = os.stat(path).st_ino
        except OSError:
            sock.close()
            raise
        server = cls(sock, selector, line=line)
        server._unix = (path, inode)
        return server

    def fds(self) -> list[int]:
        return [self.listener.fileno(), *self._clients]

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.listener)
        if self._unix is not None:
            path, inode = self._unix
            # Only our own file: if it was replaced since, it is someone else's now.
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        self.listener.close()

    def expire(self) -> None:
        """Drop clients past their deadline (called on every master tick)."""
        now = time.monotonic()
        for fd, client in list(self._clients.items()):
            if client.deadline < now:
                self._drop(fd)

    def _accept(self, mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE, ENOBUFS...: the master must live on
            now = time.monotonic()
            if now - self._accept_error_logged >= ACCEPT_ERROR_LOG_EVERY_S:
                self._accept_error_logged = now
                log.warning("cannot accept on %s: %s", self.listener.getsockname(), exc)
            return
        sock.setblocking(False)
        fd = sock.fileno()
        self._clients[fd] = _Client(sock, time.monotonic() + CLIENT_DEADLINE_S)
        self._selector.register(sock, selectors.EVENT_READ, lambda mask: self._on_event(mask, fd))

    def _on_event(self, mask: int, fd: int) -> None:
        client = self._clients.get(fd)
        if client is None:
            return
        try:
            if mask & selectors.EVENT_READ and not client.outbox:
                self._read(client)
            elif mask & selectors.EVENT_WRITE:
                self._write(client)
        except (BlockingIOError, InterruptedError):
            return  # not ready after all; the selector says when
        except OSError:
            self._drop(fd)

    def _read(self, client: _Client) -> None:
        chunk = client.sock.recv(4096)
        if not chunk:
            self._drop(client.sock.fileno())
            return
        client.inbox += chunk
        request = self._complete_request(client.inbox)
        if request is None:
            if len(client.inbox) > MAX_REQUEST_BYTES:
                self._drop(client.sock.fileno())
            return
        client.outbox = self._respond(request)
        fd = client.sock.fileno()
        self._selector.modify(client.sock, selectors.EVENT_WRITE,
                              lambda mask: self._on_event(mask, fd))
        self._write(client)

    def _complete_request(self, inbox: bytearray) -> bytes | None:
        marker = b"\r\n\r\n" if self._http else b"\n"
        end = inbox.find(marker)
        return None if end < 0 else bytes(inbox[:end])

    def _respond(self, request: bytes) -> bytes:
        # A failing view is answered with an error; it must not take down the
        # master, whose loop this runs on.
        if self._line is not None:
            try:
                return self._line(request.decode("utf-8", "replace").strip())
            except Exception:
                log.exception("control request %r failed", request[:100])
                return b'{"error": "internal error, see the master\'s log"}\n'
        assert self._http is not None
        try:
            method, target, _ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except ValueError:
            status, ctype, body = 400, "text/plain", b"bad request\n"
        else:
            try:
                status, ctype, body = self._http(method, target.split("?", 1)[0])
            except Exception:
                log.exception("HTTP %s %s failed", method, target[:200])
                status, ctype, body = 500, "text/plain", b"internal error\n"
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n")
        return head.encode() + body

    def _write(self, client: _Client) -> None:
        client.sent += client.sock.send(client.outbox[client.sent:])
        if client.sent >= len(client.outbox):
            self._drop(client.sock.fileno())

    def _drop(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()


def _answers(path: str) -> bool:
    """Whether something may listen on the Unix socket ``path``.

    Only a refusal (a stale socket file, or a file that is no socket) or no
    file at all is "nobody": a full accept backlog (EAGAIN: a master busy in
    a tick), a timeout or no permission may hide a live master.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True
    return True
