"""The fault proxy itself: it forwards, stalls without closing, and cuts."""

from __future__ import annotations

import socket

import pytest

from tests.faultproxy import FaultProxy


@pytest.fixture()
def echo_server() -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))
    return srv


def test_the_proxy_forwards_stalls_and_cuts(echo_server: socket.socket) -> None:
    with FaultProxy("127.0.0.1", echo_server.getsockname()[1]) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        peer, _ = echo_server.accept()
        client.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        proxy.stall()
        client.sendall(b"lost?")
        peer.settimeout(0.5)
        with pytest.raises(TimeoutError):
            peer.recv(5)
        proxy.resume()
        peer.settimeout(2)
        assert peer.recv(5) == b"lost?"
        proxy.cut()
        client.settimeout(2)
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            if client.recv(1) == b"":
                raise ConnectionResetError
        client.close()
        peer.close()
    echo_server.close()


def test_a_proxy_that_is_down_resets_new_connections_until_it_resumes(
    echo_server: socket.socket,
) -> None:
    with FaultProxy("127.0.0.1", echo_server.getsockname()[1]) as proxy:
        proxy.down()
        # The reset may come while connecting, sending or receiving.
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)), \
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as client:
            client.sendall(b"x")
            if client.recv(1) == b"":
                raise ConnectionResetError
        proxy.resume()
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        peer, _ = echo_server.accept()
        client.sendall(b"ok")
        assert peer.recv(2) == b"ok"
        client.close()
        peer.close()
    echo_server.close()
