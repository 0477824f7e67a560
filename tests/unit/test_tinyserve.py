"""The master's tiny request/response server, driven by hand on a real selector."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alertd.tinyserve import TinyServer


@pytest.fixture()
def selector() -> Iterator[selectors.BaseSelector]:
    sel = selectors.DefaultSelector()
    yield sel
    sel.close()


def exchange(selector: selectors.BaseSelector, client: socket.socket, request: bytes,
             timeout: float = 5.0) -> bytes:
    """Send ``request``, run the selector as the master's tick does, return the reply."""
    client.sendall(request)
    client.setblocking(False)
    reply = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key, mask in selector.select(0.05):
            key.data(mask)
        try:
            chunk = client.recv(65536)
        except BlockingIOError:
            continue
        if not chunk:
            return reply
        reply += chunk
    raise AssertionError(f"no complete reply within {timeout}s: {reply!r}")


def test_a_view_that_raises_gets_a_500_and_the_server_keeps_answering(
    selector: selectors.BaseSelector,
) -> None:
    calls: list[str] = []

    def http(method: str, path: str) -> tuple[int, str, bytes]:
        calls.append(path)
        if path == "/boom":
            raise RuntimeError("a bug in a view")
        return 200, "text/plain", b"ok\n"

    server = TinyServer.tcp("127.0.0.1", 0, selector, http)
    port = server.listener.getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            reply = exchange(selector, client, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        with socket.create_connection(("127.0.0.1", port)) as client:
            reply = exchange(selector, client, b"GET /healthz?x=1 HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nok\n")
        assert calls == ["/boom", "/healthz"]
    finally:
        server.close()


def test_a_control_command_that_raises_gets_an_error_line(
    selector: selectors.BaseSelector, tmp_path: Path,
) -> None:
    def line(command: str) -> bytes:
        raise KeyError(command)

    path = str(tmp_path / "control.sock")
    server = TinyServer.unix(path, selector, line)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            assert b'"error"' in exchange(selector, client, b"status\n")
    finally:
        server.close()
    assert not Path(path).exists()


def test_an_idle_client_is_dropped_at_its_deadline(
    selector: selectors.BaseSelector, monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = TinyServer.tcp("127.0.0.1", 0, selector,
                            lambda method, path: (200, "text/plain", b""))
    port = server.listener.getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET / HTTP/1.1\r\n")  # never finished
            for key, mask in selector.select(1):
                key.data(mask)
            assert len(server.fds()) == 2
            real = time.monotonic
            monkeypatch.setattr(time, "monotonic", lambda: real() + 10)  # past 5 s
            server.expire()
            monkeypatch.undo()
            assert server.fds() == [server.listener.fileno()]
            client.settimeout(2)
            # Closed without an answer (a reset, as it had sent unread bytes).
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(100) == b""
    finally:
        server.close()


def test_an_accept_error_is_logged_not_raised_into_the_masters_loop(
    selector: selectors.BaseSelector, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = TinyServer.tcp("127.0.0.1", 0, selector,
                            lambda method, path: (200, "text/plain", b""))

    class Exhausted:
        def accept(self) -> tuple[socket.socket, object]:
            raise OSError(24, "Too many open files")

        def getsockname(self) -> object:
            return ("127.0.0.1", 1)

    real_listener = server.listener
    monkeypatch.setattr(server, "listener", Exhausted())
    server._accept(selectors.EVENT_READ)
    server._accept(selectors.EVENT_READ)
    assert [r.message for r in caplog.records].count(
        "cannot accept on ('127.0.0.1', 1): [Errno 24] Too many open files") == 1
    monkeypatch.setattr(server, "listener", real_listener)
    server.close()


def test_a_live_control_socket_is_not_taken_over_and_a_stale_one_is(
    selector: selectors.BaseSelector, tmp_path: Path,
) -> None:
    path = str(tmp_path / "control.sock")
    first = TinyServer.unix(path, selector, lambda command: b'{"who": "first"}\n')
    try:
        # A second master with the same --control-socket is refused...
        with pytest.raises(OSError, match="answers on it"):
            TinyServer.unix(path, selector, lambda command: b"{}\n")
        # ...and the first still answers on its path.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            assert b"first" in exchange(selector, client, b"status\n")
    finally:
        first.close()
    # What a SIGKILLed master leaves: a socket file nobody listens on.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    assert Path(path).exists()
    second = TinyServer.unix(path, selector, lambda command: b'{"who": "second"}\n')
    second.close()


def test_closing_leaves_a_socket_file_that_is_no_longer_ours(
    selector: selectors.BaseSelector, tmp_path: Path,
) -> None:
    path = str(tmp_path / "control.sock")
    old = TinyServer.unix(path, selector, lambda command: b"{}\n")
    Path(path).unlink()  # e.g. a tmp cleaner; then another master binds the path
    new = TinyServer.unix(path, selector, lambda command: b"{}\n")
    try:
        old.close()
        assert Path(path).exists()
    finally:
        new.close()
    assert not Path(path).exists()


def test_a_master_too_busy_to_accept_still_keeps_its_control_socket(
    selector: selectors.BaseSelector, tmp_path: Path,
) -> None:
    # A live master stuck in a tick with its accept backlog full makes connect()
    # fail with EAGAIN, not "refused": that is not a stale socket file.
    path = str(tmp_path / "control.sock")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(path)
    busy.listen(0)
    waiting = []
    try:
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(path)
            except BlockingIOError:
                break
        with pytest.raises(OSError, match="answers on it"):
            TinyServer.unix(path, selector, lambda command: b"{}\n")
        assert Path(path).exists()
    finally:
        for client in waiting:
            client.close()
        busy.close()


def test_a_control_socket_path_naming_a_file_that_is_no_socket_is_refused_not_deleted(
    selector: selectors.BaseSelector, tmp_path: Path,
) -> None:
    # A typo'd --control-socket; the master often runs as root.
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")

    with pytest.raises(OSError, match="not a socket"):
        TinyServer.unix(str(precious), selector, lambda command: b"{}\n")
    assert precious.read_text() == "keep me"
