"""HttpVideoFetcher against real local servers: status mapping, caps, timeouts, redirects, guard."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from alertd.adapters import download
from alertd.adapters.download import HttpVideoFetcher
from alertd.errors import ErrorCode, PermanentError, ProcessingError, TransientError
from alertd.netguard import AddressGuard
from tests.e2e.harness import eventually
from tests.fakes import FakeDns
from tests.ports import free_port
from tests.servers import ClipServer, payload, sha256_of

# Loopback as the servers use it; ::1 too since "localhost" may resolve to it.
# 127.0.0.2 stays outside: it plays the private address that must never be reached.
ONLY_127_0_0_1 = AddressGuard((ip_network("127.0.0.1/32"), ip_network("::1/128")))


def make_fetcher(directory: Path, **overrides: Any) -> HttpVideoFetcher:
    options: dict[str, Any] = {
        "guard": ONLY_127_0_0_1, "max_bytes": 100_000, "connect_timeout": 2.0,
        "read_timeout": 2.0, "total_timeout": 5.0, "download_dir": str(directory),
    }
    options.update(overrides)
    return HttpVideoFetcher(**options)


@pytest.fixture()
async def fetcher(tmp_path: Path) -> AsyncIterator[HttpVideoFetcher]:
    async with make_fetcher(tmp_path) as fetcher:
        yield fetcher


@pytest.fixture()
async def clip_server(tmp_path: Path) -> AsyncIterator[ClipServer]:
    clip = tmp_path / "clip.bin"
    clip.write_bytes(payload(50_000))
    async with ClipServer({"clip.bin": clip}) as server:
        yield server


@pytest.fixture()
async def other_loopback() -> AsyncIterator[ClipServer]:
    """A server on 127.0.0.2, outside the allow list: it must never see a request."""
    async with ClipServer(host="127.0.0.2") as server:
        yield server


@asynccontextmanager
async def connections_to(host: str, port: int) -> AsyncIterator[list[object]]:
    """Listen on ``host``:``port`` and record every connection accepted (none is answered)."""
    accepted: list[object] = []

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(accept, host, port)
    try:
        yield accepted
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def answering_raw(response: bytes) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 answering any request with ``response`` as is; yields a URL."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/clip.mp4"
    finally:
        server.close()
        await server.wait_closed()


def leftovers(fetcher: HttpVideoFetcher) -> list[str]:
    assert fetcher.temp_dir is not None
    return os.listdir(fetcher.temp_dir)


async def download_error(fetcher: HttpVideoFetcher, url: str) -> ProcessingError:
    with pytest.raises(ProcessingError) as info:
        async with fetcher.fetch_video(url):
            pytest.fail("the download should have failed")
    assert leftovers(fetcher) == []
    return info.value


def exists(path: str) -> bool:
    return os.path.exists(path)


async def test_download_yields_a_private_file_with_size_and_sha256_removed_after_the_block(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    async with fetcher.fetch_video(clip_server.url("/clips/clip.bin")) as video:
        with open(video.path, "rb") as fh:  # noqa: ASYNC230 - a test reading 50 kB
            assert fh.read() == payload(50_000)
        assert video.size_bytes == 50_000
        assert video.sha256 == sha256_of(payload(50_000))
        assert stat.S_IMODE(os.stat(video.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(video.path)).st_mode) == 0o700
    assert not exists(video.path)
    assert leftovers(fetcher) == []


async def test_an_error_inside_the_block_still_removes_the_file(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    with pytest.raises(ZeroDivisionError):
        async with fetcher.fetch_video(clip_server.url("/bytes/1000")) as video:
            _ = 1 / 0
    assert not exists(video.path)


async def test_closing_the_fetcher_removes_its_temp_dir(tmp_path: Path) -> None:
    fetcher = make_fetcher(tmp_path)
    await fetcher.open()
    directory = fetcher.temp_dir
    assert directory is not None and os.path.basename(directory).startswith("alertd-")
    await fetcher.close()
    assert not exists(directory)


@pytest.mark.parametrize("status", [404, 410])
async def test_missing_or_gone_clip_is_permanent_not_found(
    fetcher: HttpVideoFetcher, clip_server: ClipServer, status: int,
) -> None:
    error = await download_error(fetcher, clip_server.url(f"/status/{status}"))
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.DOWNLOAD_NOT_FOUND


@pytest.mark.parametrize("status", [400, 401, 403, 451])
async def test_other_client_errors_are_permanent_download_failures(
    fetcher: HttpVideoFetcher, clip_server: ClipServer, status: int,
) -> None:
    error = await download_error(fetcher, clip_server.url(f"/status/{status}"))
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.DOWNLOAD_FAILED
    assert f"HTTP {status}" in error.message


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_server_errors_and_throttling_are_transient(
    fetcher: HttpVideoFetcher, clip_server: ClipServer, status: int,
) -> None:
    error = await download_error(fetcher, clip_server.url(f"/status/{status}"))
    assert isinstance(error, TransientError)
    assert error.code is ErrorCode.DOWNLOAD_FAILED


async def test_query_strings_of_signed_urls_never_reach_error_messages(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    error = await download_error(fetcher, clip_server.url("/status/403?X-Signature=s3cr3t"))
    assert "s3cr3t" not in str(error)
    assert "/status/403" in error.message


async def test_connection_refused_is_transient(fetcher: HttpVideoFetcher) -> None:
    error = await download_error(fetcher, f"http://127.0.0.1:{free_port()}/clip")
    assert isinstance(error, TransientError)
    assert error.code is ErrorCode.DOWNLOAD_FAILED


async def test_declared_length_over_the_cap_is_refused_without_reading_the_body(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    # One byte every 5 s: reading the body would end in a timeout, not in too-large.
    started = time.monotonic()
    error = await download_error(fetcher, clip_server.url("/drip?bytes=100001&interval=5"))
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.DOWNLOAD_TOO_LARGE
    assert "Content-Length 100001" in error.message
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("path", ["/no-length/100001", "/endless"])
async def test_download_past_the_cap_is_refused_and_leaves_no_file(
    fetcher: HttpVideoFetcher, clip_server: ClipServer, path: str,
) -> None:
    error = await download_error(fetcher, clip_server.url(path))
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.DOWNLOAD_TOO_LARGE


async def test_a_body_exactly_at_the_cap_is_accepted(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    async with fetcher.fetch_video(clip_server.url("/no-length/100000")) as video:
        assert video.size_bytes == 100_000
        assert video.sha256 == sha256_of(payload(100_000))


@pytest.mark.parametrize("path", ["/lying-length", "/reset"])
async def test_a_body_cut_short_is_transient(
    fetcher: HttpVideoFetcher, clip_server: ClipServer, path: str,
) -> None:
    error = await download_error(fetcher, clip_server.url(path))
    assert isinstance(error, TransientError)
    assert error.code is ErrorCode.DOWNLOAD_FAILED


MALFORMED_RESPONSES = {
    "garbage status line": (b"HELLO WORLD\r\n\r\n", "Bad status line"),
    "non-numeric status": (b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok", "Bad status line"),
    "too many headers": (
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200))
        + b"Content-Length: 2\r\n\r\nok",
        "Too many headers",
    ),
    "a header too big": (
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 2\r\n\r\nok",
        "Got more than 8190 bytes",
    ),
    "Content-Length with Transfer-Encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        "Transfer-Encoding can't be present with Content-Length",
    ),
    "a bad chunk size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        "Invalid character in chunk size",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED_RESPONSES))
async def test_a_malformed_response_is_transient_and_named_so_not_as_an_http_400(
    fetcher: HttpVideoFetcher, name: str,
) -> None:
    response, detail = MALFORMED_RESPONSES[name]
    async with answering_raw(response) as url:
        error = await download_error(fetcher, url)
    assert isinstance(error, TransientError)
    assert error.code is ErrorCode.DOWNLOAD_FAILED
    assert error.message.startswith(f"{url}: malformed HTTP response: {detail}")
    assert "\n" not in error.message and len(error.message) < len(url) + 250


async def test_partial_content_is_refused_as_a_permanent_failure(
    fetcher: HttpVideoFetcher,
) -> None:
    # Part of a clip, though no Range was asked for.
    response = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1/10\r\n" \
        b"Content-Length: 2\r\n\r\nok"
    async with answering_raw(response) as url:
        error = await download_error(fetcher, url)
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.DOWNLOAD_FAILED
    assert error.message.startswith(f"HTTP 206 from {url}: Partial Content")


async def test_a_drip_past_the_total_timeout_is_a_download_timeout(
    tmp_path: Path, clip_server: ClipServer,
) -> None:
    # Each byte arrives well within the read timeout; only the total limit can stop it.
    async with make_fetcher(tmp_path, read_timeout=5.0, total_timeout=1.0) as fetcher:
        started = time.monotonic()
        error = await download_error(fetcher, clip_server.url("/drip?bytes=50&interval=0.1"))
    assert isinstance(error, TransientError)
    assert error.code is ErrorCode.DOWNLOAD_TIMEOUT
    assert time.monotonic() - started < 2.0


async def test_more_downloads_at_once_than_aiohttps_default_pool_all_finish_in_time(
    tmp_path: Path, clip_server: ClipServer,
) -> None:
    # aiohttp's connector allows 100 connections unless told otherwise: the
    # 20 downloads past them would wait for one inside their deadline.
    async def fetch_one() -> int:
        async with fetcher.fetch_video(clip_server.url("/slow-headers?s=0.7")) as video:
            return video.size_bytes

    async with make_fetcher(tmp_path, total_timeout=1.2) as fetcher:
        sizes = await asyncio.gather(*(fetch_one() for _ in range(120)))
    assert sizes == [len(b"late")] * 120


@pytest.mark.parametrize("path", ["/slow-headers?s=5", "/drip?bytes=10&interval=5"])
async def test_a_silent_server_hits_the_read_timeout(
    tmp_path: Path, clip_server: ClipServer, path: str,
) -> None:
    async with make_fetcher(tmp_path, read_timeout=0.5, total_timeout=10.0) as fetcher:
        started = time.monotonic()
        error = await download_error(fetcher, clip_server.url(path))
    assert isinstance(error, TransientError)
    assert error.code is ErrorCode.DOWNLOAD_TIMEOUT
    assert time.monotonic() - started < 2.0


async def test_five_redirects_are_followed(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    async with fetcher.fetch_video(clip_server.url("/redirect/5?size=3000")) as video:
        assert video.sha256 == sha256_of(payload(3000))
    assert len(clip_server.requests) == 6


async def test_a_sixth_redirect_is_refused_without_following_it(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    error = await download_error(fetcher, clip_server.url("/redirect/6"))
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.DOWNLOAD_FAILED
    assert "too many redirects" in error.message
    assert "/redirect/0?size=1000" not in clip_server.paths()


@pytest.mark.parametrize("host", ["127.0.0.2", "0x7f000002", "2130706434", "0177.0.0.2"])
async def test_a_redirect_to_a_forbidden_address_is_refused_before_contacting_it(
    fetcher: HttpVideoFetcher, clip_server: ClipServer, other_loopback: ClipServer, host: str,
) -> None:
    target = f"http://{host}:{other_loopback.port}/bytes/10"
    error = await download_error(fetcher, clip_server.url(f"/redirect-to?url={target}"))
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.FORBIDDEN_ADDRESS
    assert "127.0.0.2" in error.message
    assert other_loopback.requests == []


@pytest.mark.parametrize("host", ["127.0.0.2", "[::ffff:127.0.0.2]", "0x7f000002"])
async def test_a_forbidden_literal_or_numeric_host_is_refused_without_contact(
    fetcher: HttpVideoFetcher, other_loopback: ClipServer, host: str,
) -> None:
    error = await download_error(fetcher, f"http://{host}:{other_loopback.port}/bytes/10")
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.FORBIDDEN_ADDRESS
    assert other_loopback.requests == []


@pytest.mark.parametrize("via_redirect", [False, True])
async def test_a_numeric_host_with_a_trailing_dot_is_a_permanent_invalid_url_without_dns(
    fetcher: HttpVideoFetcher, clip_server: ClipServer, other_loopback: ClipServer,
    monkeypatch: pytest.MonkeyPatch, via_redirect: bool,
) -> None:
    target = f"http://127.0.0.2.:{other_loopback.port}/bytes/10"
    url = clip_server.url(f"/redirect-to?url={target}") if via_redirect else target
    dns = FakeDns({})  # a lookup other than a numeric-only one fails the test
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", dns)
    error = await download_error(fetcher, url)
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.DOWNLOAD_FAILED
    assert error.message.startswith("invalid URL ")
    assert "'127.0.0.2.' looks like an IP address but is not one" in error.message
    assert dns.lookups == []
    assert other_loopback.requests == []


async def test_a_name_resolving_to_a_forbidden_address_is_refused_without_contact(
    tmp_path: Path, clip_server: ClipServer,
) -> None:
    async with make_fetcher(tmp_path, guard=AddressGuard()) as fetcher:
        error = await download_error(fetcher, clip_server.url("/bytes/10").replace(
            "127.0.0.1", "localhost"))
    assert error.code is ErrorCode.FORBIDDEN_ADDRESS
    assert "localhost" in error.message and "127.0.0.1" in error.message
    assert clip_server.requests == []


async def test_a_name_resolving_to_an_allowed_address_is_downloaded(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    url = clip_server.url("/bytes/10").replace("127.0.0.1", "localhost")
    async with fetcher.fetch_video(url) as video:
        assert video.size_bytes == 10


@pytest.mark.parametrize("refused", ["127.0.0.2", "::1"])
async def test_a_name_with_refused_answers_is_downloaded_from_its_allowed_address_only(
    tmp_path: Path, clip_server: ClipServer, monkeypatch: pytest.MonkeyPatch, refused: str,
) -> None:
    # The README's --allow-network 127.0.0.1/32 on a stock Debian host, where
    # localhost is ::1 and 127.0.0.1. The refused answer comes first and has a
    # listener on the clip server's port: a connection to it would be recorded.
    guard = AddressGuard((ip_network("127.0.0.1/32"),))
    dns = FakeDns({"clips.test": [refused, "127.0.0.1"]})
    base = f"http://clips.test:{clip_server.port}"
    async with connections_to(refused, clip_server.port) as refused_connections, \
            make_fetcher(tmp_path, guard=guard) as fetcher:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", dns)

        async def fetch_size(path: str) -> int:
            async with fetcher.fetch_video(base + path) as video:
                return video.size_bytes

        assert await fetch_size("/bytes/10") == 10
        # At once, so new connections are opened from aiohttp's DNS cache; each
        # follows two redirects, each hop connecting again through the connector.
        sizes = await asyncio.gather(*(fetch_size("/redirect/2?size=10") for _ in range(4)))
    assert sizes == [10] * 4
    assert dns.lookups == ["clips.test"]  # the rest came from the cache
    assert refused_connections == []
    assert len(clip_server.requests) == 1 + 4 * 3


async def test_a_redirect_to_another_scheme_is_refused(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    error = await download_error(fetcher, clip_server.url("/redirect-to?url=file:///etc/passwd"))
    assert isinstance(error, PermanentError)
    assert error.code is ErrorCode.FORBIDDEN_ADDRESS


async def test_cancelling_mid_download_leaves_the_temp_dir_empty(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    async def consume() -> None:
        async with fetcher.fetch_video(clip_server.url("/drip?bytes=100&interval=0.05")):
            pytest.fail("the download should have been cancelled")

    task = asyncio.create_task(consume())
    await eventually(lambda: leftovers(fetcher))  # the partial file exists: we are mid-body
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(fetcher) == []


async def test_cancelling_inside_the_block_removes_the_file(
    fetcher: HttpVideoFetcher, clip_server: ClipServer,
) -> None:
    paths: list[str] = []
    inside = asyncio.Event()

    async def consume() -> None:
        async with fetcher.fetch_video(clip_server.url("/bytes/1000")) as video:
            paths.append(video.path)
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not exists(paths[0])
    assert leftovers(fetcher) == []


@pytest.fixture()
def tiny_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 64 KiB tmpfs when we may mount (root); otherwise writes fail with ENOSPC past 64 KiB."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True, check=False,
    ).returncode == 0
    if not mounted:
        written = {"bytes": 0}
        real_write_all = download._write_all

        def write_until_full(fd: int, data: bytes) -> None:
            if written["bytes"] + len(data) > 64 * 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written["bytes"] += len(data)
            real_write_all(fd, data)

        monkeypatch.setattr(download, "_write_all", write_until_full)
    yield mount_point
    if mounted:
        subprocess.run(["umount", str(mount_point)], check=False)


async def test_a_full_local_disk_is_transient_and_leaves_no_partial_file(
    tiny_disk: Path, clip_server: ClipServer,
) -> None:
    async with make_fetcher(tiny_disk, max_bytes=1_000_000) as fetcher:
        error = await download_error(fetcher, clip_server.url("/bytes/300000"))
        assert isinstance(error, TransientError)
        assert error.code is ErrorCode.DOWNLOAD_FAILED
        assert error.message.startswith("local disk: ")
        assert "No space left" in error.message


async def test_opening_removes_download_dirs_of_dead_processes_only(tmp_path: Path) -> None:
    dead = tmp_path / f"{download.DIR_PREFIX}4194999-abc"  # above any pid_max: never alive
    alive = tmp_path / f"{download.DIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / "unrelated"
    for directory in (dead, alive, other):
        directory.mkdir()
        (directory / "partial.clip").write_bytes(b"x" * 10)
    fetcher = HttpVideoFetcher(guard=AddressGuard(), max_bytes=1000, connect_timeout=1,
                               read_timeout=1, total_timeout=1, download_dir=str(tmp_path))
    await fetcher.open()
    try:
        assert not dead.exists()
        assert alive.exists() and other.exists()
    finally:
        await fetcher.close()
