"""HTTP clip downloads: address-guarded, size-capped, time-boxed, streamed to a private file."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType

import aiohttp
from aiohttp.http import HttpProcessingError
from yarl import URL

from alertd import __version__
from alertd.config import Settings
from alertd.domain import DownloadedVideo
from alertd.errors import ErrorCode, PermanentError, TransientError
from alertd.netguard import AddressGuard, GuardedResolver, check_url, describe_error, safe_url

log = logging.getLogger(__name__)

DIR_PREFIX = "alertd-dl-"

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_PARSER_DETAIL = 200  # characters of aiohttp's parser message kept (it quotes the bad line)


class HttpVideoFetcher:
    """Fits ``ports.VideoFetcher``. Call :meth:`open` inside the running loop before use.

    One ``ClientSession`` is shared by all downloads of this adapter; it is
    created in :meth:`open`, never at import or before a fork, because a
    session belongs to the loop it was created in.
    """

    def __init__(
        self, *, guard: AddressGuard, max_bytes: int, connect_timeout: float,
        read_timeout: float, total_timeout: float, download_dir: str | None = None,
        max_redirects: int = MAX_REDIRECTS,
    ) -> None:
        self._guard = guard
        self._max_bytes = max_bytes
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._total_timeout = total_timeout
        self._download_dir = download_dir
        self._max_redirects = max_redirects
        self._session: aiohttp.ClientSession | None = None
        self._dir: str | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, guard: AddressGuard | None = None,
    ) -> HttpVideoFetcher:
        # A server silent for as long as we would wait for it to accept a
        # connection is treated as stalled: there is no separate read setting.
        return cls(
            guard=guard or AddressGuard(settings.allow_networks),
            max_bytes=settings.max_download_bytes,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.connect_timeout,
            total_timeout=settings.download_timeout,
            download_dir=settings.download_dir,
        )

    @property
    def temp_dir(self) -> str | None:
        """The private (0700) directory clips are written to while open."""
        return self._dir

    async def open(self) -> None:
        if self._session is not None:
            return
        parent = self._download_dir or tempfile.gettempdir()
        remove_orphaned_dirs(parent)
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=parent)
        self._session = aiohttp.ClientSession(
            # limit=0: the slots already bound how many downloads run at once.
            # aiohttp's default of 100 connections made slots past it wait for
            # one inside their download deadline (--concurrency goes far higher).
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(self._guard), limit=0),
            # No proxies or .netrc from the environment, no cookies carried from
            # one alert's URL to the next, and the bytes exactly as served.
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            headers={"User-Agent": f"alertd/{__version__}", "Accept-Encoding": "identity"},
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout,
            ),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> HttpVideoFetcher:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def fetch_video(self, url: str) -> AsyncIterator[DownloadedVideo]:
        if self._session is None or self._dir is None:
            raise RuntimeError("HttpVideoFetcher.open() must be awaited before fetch_video()")
        path = os.path.join(self._dir, f"{secrets.token_hex(8)}.clip")
        try:
            yield await self._download(self._session, url, path)
        finally:
            # Every exit: success after the block, error, cancellation.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _download(
        self, session: aiohttp.ClientSession, url: str, path: str,
    ) -> DownloadedVideo:
        try:
            async with asyncio.timeout(self._total_timeout):
                response = await self._final_response(session, URL(url))
                try:
                    video = await self._stream_to_file(response, path)
                except BaseException:
                    response.close()  # drop the connection, the rest of the body is unwanted
                    raise
                response.release()
                return video
        except TimeoutError as exc:
            # asyncio.timeout's error has no text; aiohttp's name the phase that stalled.
            detail = describe_error(exc) if str(exc) else f"over {self._total_timeout:g}s in total"
            raise TransientError(
                ErrorCode.DOWNLOAD_TIMEOUT, f"{safe_url(url)}: {detail}",
            ) from None
        except (aiohttp.InvalidURL, ValueError) as exc:
            raise PermanentError(
                ErrorCode.DOWNLOAD_FAILED, f"invalid URL {safe_url(url)}: {describe_error(exc)}",
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            # Only network errors get here: local disk errors were translated
            # where the file is written, so they cannot be mistaken for these.
            raise TransientError(
                ErrorCode.DOWNLOAD_FAILED, f"{safe_url(url)}: {_network_detail(exc)}",
            ) from None

    async def _final_response(
        self, session: aiohttp.ClientSession, url: URL,
    ) -> aiohttp.ClientResponse:
        """Follow redirects by hand so every hop's address is checked before it is contacted."""
        for hop in range(self._max_redirects + 1):
            # Names are vetted by the connector's GuardedResolver; this covers
            # scheme and the literal IPs aiohttp never hands to a resolver.
            await check_url(url, self._guard, resolve_names=False)
            response = await session.get(url, allow_redirects=False)
            if response.status not in REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise PermanentError(
                    ErrorCode.DOWNLOAD_FAILED,
                    f"HTTP {response.status} without Location from {safe_url(url)}",
                )
            url = url.join(URL(location))
            log.debug("redirect %d to %s", hop + 1, safe_url(url))
        raise PermanentError(
            ErrorCode.DOWNLOAD_FAILED, f"too many redirects (more than {self._max_redirects})",
        )

    async def _stream_to_file(self, response: aiohttp.ClientResponse, path: str) -> DownloadedVideo:
        _check_status(response)
        declared = response.content_length
        if declared is not None and declared > self._max_bytes:
            raise PermanentError(
                ErrorCode.DOWNLOAD_TOO_LARGE,
                f"Content-Length {declared} exceeds the limit of {self._max_bytes} bytes",
            )
        digest = hashlib.sha256()
        size = 0
        try:
            fd = _create_private_file(path)
        except OSError as exc:
            raise _disk_error(exc) from None
        try:
            # Chunks as they arrived: re-cutting them to a fixed size costs a
            # copy and an iteration each (~1 ms of CPU per 2 MB clip).
            async for chunk in response.content.iter_any():
                # Counted always: Content-Length may be absent or lie.
                size += len(chunk)
                if size > self._max_bytes:
                    raise PermanentError(
                        ErrorCode.DOWNLOAD_TOO_LARGE,
                        f"body exceeds the limit of {self._max_bytes} bytes",
                    )
                digest.update(chunk)
                # A chunk is what was buffered (~128 KiB at most, the read
                # pauses above that); writing it to a local file takes
                # microseconds, no executor needed.
                try:
                    _write_all(fd, chunk)
                except OSError as exc:
                    raise _disk_error(exc) from None
        finally:
            os.close(fd)
        if declared is not None and size != declared:
            raise TransientError(
                ErrorCode.DOWNLOAD_FAILED, f"body truncated: {size} of {declared} bytes",
            )
        return DownloadedVideo(path=path, size_bytes=size, sha256=digest.hexdigest())


def _network_detail(exc: BaseException) -> str:
    """The text a network error is stored with: URLs without secrets, parser errors named."""
    if isinstance(exc, aiohttp.ClientResponseError) and isinstance(
        exc.__cause__, HttpProcessingError,
    ):
        # aiohttp's parser refused the response (status line, header count or
        # size, Content-Length with Transfer-Encoding, chunk framing). The 400
        # in its text is aiohttp's own code, not a status the server sent.
        # Still transient: a proxy or a server restarting mid-write can garble
        # one response, and retries are bounded by --max-attempts.
        lines = (line.strip() for line in exc.message.splitlines())
        detail = " ".join(line for line in lines if line and line != "^")
        if len(detail) > MAX_PARSER_DETAIL:
            detail = f"{detail[:MAX_PARSER_DETAIL]}..."
        return f"malformed HTTP response: {describe_error(ValueError(detail))}"
    return describe_error(exc)


def _check_status(response: aiohttp.ClientResponse) -> None:
    status = response.status
    if 200 <= status < 300 and status != 206:
        return
    message = f"HTTP {status} from {safe_url(response.url)}"
    if status == 206:
        # alertd never sends Range, so a 206 body is a part of the clip, not the
        # clip. Permanent: the server answers the same request the same way,
        # and retrying would only delay the failure by the whole backoff.
        raise PermanentError(
            ErrorCode.DOWNLOAD_FAILED, f"{message}: Partial Content, though no Range was asked",
        )
    if status in (404, 410):
        raise PermanentError(ErrorCode.DOWNLOAD_NOT_FOUND, message)
    if status in (408, 429) or status >= 500:
        raise TransientError(ErrorCode.DOWNLOAD_FAILED, message)
    raise PermanentError(ErrorCode.DOWNLOAD_FAILED, message)


def _create_private_file(path: str) -> int:
    # O_EXCL|O_NOFOLLOW: never write through a file or link planted in advance.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags, 0o600)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _disk_error(exc: OSError) -> TransientError:
    # ENOSPC, EDQUOT, EIO: our disk, not the server; worth retrying later.
    return TransientError(ErrorCode.DOWNLOAD_FAILED, f"local disk: {exc.strerror or exc}")


def remove_orphaned_dirs(parent: str) -> None:
    """Delete download dirs left by processes that died without closing (SIGKILL, OOM).

    Each dir's name carries its owner's pid; one whose owner is gone holds
    only partial clips nobody will read, and would fill the disk over crashes.
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(DIR_PREFIX):
            continue
        pid_text = name[len(DIR_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
