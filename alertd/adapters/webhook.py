"""Webhook delivery over HTTP: one signed POST per attempt, its outcome as a DeliveryResult."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import time
from types import TracebackType

import aiohttp
from yarl import URL

from alertd import __version__
from alertd.config import Settings
from alertd.errors import PermanentError
from alertd.netguard import AddressGuard, GuardedResolver, check_url, describe_error
from alertd.ports import DeliveryResult, PendingDelivery
from alertd.signing import sign

# Response bodies are read up to this much so the connection can go back to
# the pool; a receiver that sends more gets its connection closed instead.
DRAIN_BYTES = 64 * 1024
# Reading what follows the status line is a courtesy to keep the connection
# (the answer is in the status): a body that stalls or breaks is cut short.
DRAIN_TIMEOUT_S = 1.0


class HttpWebhookSender:
    """Fits ``ports.WebhookSender``. Call :meth:`open` inside the running loop before use.

    With no secrets the POST carries no ``webhook-signature`` header. That
    unsigned mode exists for local testing against a throwaway receiver;
    production receivers should reject unsigned requests.
    """

    def __init__(
        self, *, guard: AddressGuard, secrets: tuple[bytes, ...], timeout: float,
        connect_timeout: float, pool_limit: int = 100,
    ) -> None:
        self._guard = guard
        self._secrets = secrets
        self._timeout = timeout
        self._connect_timeout = min(connect_timeout, timeout)
        self._pool_limit = pool_limit
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, guard: AddressGuard | None = None,
    ) -> HttpWebhookSender:
        return cls(
            guard=guard or AddressGuard(settings.allow_networks),
            secrets=settings.webhook_secrets,
            timeout=settings.webhook_timeout,
            connect_timeout=settings.connect_timeout,
        )

    async def open(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            # One pool for all receivers: keep-alive saves a handshake per
            # delivery to the same receiver. Connections only ever go to
            # addresses the GuardedResolver vetted.
            connector=aiohttp.TCPConnector(
                resolver=GuardedResolver(self._guard), limit=self._pool_limit,
            ),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            # The body is only drained, never read: no decompression, and ask
            # for none (a compressed bomb then costs at most DRAIN_BYTES).
            headers={"User-Agent": f"alertd/{__version__}", "Accept-Encoding": "identity"},
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self._timeout, sock_connect=self._connect_timeout),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpWebhookSender:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def deliver(self, delivery: PendingDelivery) -> DeliveryResult:
        if self._session is None:
            raise RuntimeError("HttpWebhookSender.open() must be awaited before deliver()")
        started = time.monotonic()

        def failed(error: str, *, permanent: bool = False) -> DeliveryResult:
            return DeliveryResult(
                ok=False, error=error, permanent=permanent,
                duration_s=time.monotonic() - started,
            )

        try:
            url = URL(delivery.url)
            await check_url(url, self._guard, resolve_names=False)
            async with self._session.post(
                url, data=delivery.body, headers=self._headers(delivery), allow_redirects=False,
            ) as response:
                # The status decides: a 2xx whose body then stalls, ends
                # early or is garbled was delivered all the same.
                result = _result(response, time.monotonic() - started)
                await _drain(response)
                return result
        except PermanentError as exc:
            return failed(exc.message, permanent=True)
        except TimeoutError:
            return failed(f"timeout after {self._timeout:g}s")
        except (aiohttp.InvalidURL, ValueError) as exc:
            return failed(f"invalid URL: {describe_error(exc, path_is_secret=True)}",
                          permanent=True)
        except (aiohttp.ClientError, OSError) as exc:
            return failed(f"{type(exc).__name__}: {describe_error(exc, path_is_secret=True)}")

    def _headers(self, delivery: PendingDelivery) -> dict[str, str]:
        # The timestamp is this attempt's, so a retry hours later still falls
        # inside the receiver's replay window; the id stays the same for dedup.
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._secrets:
            headers["webhook-signature"] = sign(
                self._secrets, delivery.webhook_id, timestamp, delivery.body,
            )
        return headers


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read up to DRAIN_BYTES of the body so the connection can serve the next
    delivery; on a stall or a broken body, close it instead (never raises)."""
    remaining = DRAIN_BYTES
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while remaining > 0:
                chunk = await response.content.readany()
                if not chunk:
                    return
                remaining -= len(chunk)
    except (TimeoutError, aiohttp.ClientError, OSError):
        response.close()


def _result(response: aiohttp.ClientResponse, duration_s: float) -> DeliveryResult:
    status = response.status
    if 200 <= status < 300:
        return DeliveryResult(ok=True, status_code=status, duration_s=duration_s)
    error = f"HTTP {status}"
    if 300 <= status < 400:
        # Following would send a signed body somewhere the sender never chose.
        error += " (redirects are not followed)"
    return DeliveryResult(
        ok=False, status_code=status, error=error, gone=status == 410,
        retry_after=parse_retry_after(response.headers.get("Retry-After"), now=time.time()),
        duration_s=duration_s,
    )


RETRY_AFTER_MAX_S = 366 * 86400


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None.

    A date in the past means "now" (0.0); anything unparseable is ignored.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        # Beyond a year it means "much later" (the outbox caps it anyway); a
        # receiver's thousand-digit value must not overflow int() or float().
        return float(RETRY_AFTER_MAX_S if len(text) > 12 else min(int(text), RETRY_AFTER_MAX_S))
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)  # HTTP-dates are GMT by definition
        return max(0.0, when.timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        # OverflowError: a zone offset or year of twenty digits.
        return None
