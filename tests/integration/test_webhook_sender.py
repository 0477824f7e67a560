"""HttpWebhookSender against a local sink: signatures, outcomes, redirects, guard, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator
from ipaddress import ip_network
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from alertd import __version__, signing
from alertd.adapters.webhook import RETRY_AFTER_MAX_S, HttpWebhookSender, parse_retry_after
from alertd.netguard import AddressGuard
from alertd.ports import PendingDelivery
from tests.ports import free_port
from tests.servers import Reply, WebhookSink

LOOPBACK_ONE = AddressGuard((ip_network("127.0.0.1/32"),))
SECRET_OLD = b"old-secret-of-32-bytes-.........."
SECRET_NEW = b"new-secret-of-32-bytes-.........."
BODY = b'{"type":"alert.processed","alert_id":"a-1"}'


def pending(url: str, *, body: bytes = BODY, webhook_id: str = "msg_0123abcd") -> PendingDelivery:
    return PendingDelivery(delivery_id=1, webhook_id=webhook_id, alert_id="a-1", url=url,
                           body=body, attempts=0)


def make_sender(**overrides: Any) -> HttpWebhookSender:
    options: dict[str, Any] = {
        "guard": LOOPBACK_ONE, "secrets": (SECRET_OLD,), "timeout": 2.0, "connect_timeout": 1.0,
    }
    options.update(overrides)
    return HttpWebhookSender(**options)


@pytest.fixture()
async def sender() -> AsyncIterator[HttpWebhookSender]:
    async with make_sender() as sender:
        yield sender


async def test_the_signature_verifies_with_the_reference_library(
    sender: HttpWebhookSender,
) -> None:
    async with WebhookSink([200]) as sink:
        result = await sender.deliver(pending(sink.url("/hooks/alerts")))
    assert result.ok and result.status_code == 200
    [seen] = sink.requests
    assert seen.method == "POST" and seen.path_qs == "/hooks/alerts"
    assert seen.body == BODY
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["User-Agent"] == f"alertd/{__version__}"
    assert seen.headers["webhook-id"] == "msg_0123abcd"
    assert abs(int(seen.headers["webhook-timestamp"]) - time.time()) < 5
    assert Webhook(SECRET_OLD).verify(seen.body, seen.headers) == {
        "type": "alert.processed", "alert_id": "a-1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_NEW).verify(seen.body, seen.headers)


async def test_two_secrets_give_two_signatures_each_verifiable_alone() -> None:
    async with make_sender(secrets=(SECRET_OLD, SECRET_NEW)) as sender, WebhookSink() as sink:
        await sender.deliver(pending(sink.url()))
    [seen] = sink.requests
    signatures = seen.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    for secret, signature in zip((SECRET_OLD, SECRET_NEW), signatures, strict=True):
        alone = {**seen.headers, "webhook-signature": signature}
        Webhook(secret).verify(seen.body, alone)
        assert signing.verify((secret,), seen.headers["webhook-id"],
                              int(seen.headers["webhook-timestamp"]), seen.body, signature,
                              now=time.time())
    assert not signing.verify((b"x" * 32,), seen.headers["webhook-id"],
                              int(seen.headers["webhook-timestamp"]), seen.body,
                              seen.headers["webhook-signature"], now=time.time())


async def test_without_secrets_the_request_is_sent_unsigned() -> None:
    async with make_sender(secrets=()) as sender, WebhookSink() as sink:
        result = await sender.deliver(pending(sink.url()))
    assert result.ok
    assert "webhook-signature" not in {k.lower() for k in sink.requests[0].headers}
    assert "webhook-id" in sink.requests[0].headers


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_any_2xx_is_ok(sender: HttpWebhookSender, status: int) -> None:
    async with WebhookSink([status]) as sink:
        result = await sender.deliver(pending(sink.url()))
    assert result.ok and result.status_code == status and result.error is None


@pytest.mark.parametrize("status", [400, 404, 500, 503])
async def test_other_statuses_are_failures_to_retry(sender: HttpWebhookSender, status: int) -> None:
    async with WebhookSink([status]) as sink:
        result = await sender.deliver(pending(sink.url()))
    assert not result.ok and not result.gone and not result.permanent
    assert result.status_code == status and result.error == f"HTTP {status}"


async def test_410_marks_the_receiver_gone(sender: HttpWebhookSender) -> None:
    async with WebhookSink([410]) as sink:
        result = await sender.deliver(pending(sink.url()))
    assert not result.ok and result.gone and result.status_code == 410


async def test_retry_after_in_seconds_or_as_a_date_is_reported(sender: HttpWebhookSender) -> None:
    in_90_s = email.utils.formatdate(time.time() + 90, usegmt=True)
    script = [Reply(429, {"Retry-After": "120"}), Reply(503, {"Retry-After": in_90_s})]
    async with WebhookSink(script) as sink:
        first = await sender.deliver(pending(sink.url()))
        second = await sender.deliver(pending(sink.url()))
    assert first.retry_after == 120.0
    assert second.retry_after is not None and 85 <= second.retry_after <= 91


def test_retry_after_parsing_handles_past_dates_and_garbage() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("0", now=now) == 0.0
    assert parse_retry_after(" 7 ", now=now) == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    # A receiver's absurd value means "much later", neither an overflow nor a crash.
    assert parse_retry_after("9" * 400, now=now) == parse_retry_after("9" * 5000, now=now) \
        == RETRY_AFTER_MAX_S
    assert parse_retry_after("-5", now=now) is None
    assert parse_retry_after(None, now=now) is None
    # OverflowError inside email.utils: ignored, not a crash of deliver().
    assert parse_retry_after("1 Jan 2025 00:00:00 +99999999999999999999", now=now) is None


async def test_a_redirect_is_a_failure_and_is_not_followed(sender: HttpWebhookSender) -> None:
    async with WebhookSink() as target:
        async with WebhookSink([Reply(302, {"Location": target.url("/elsewhere")})]) as sink:
            result = await sender.deliver(pending(sink.url()))
        assert not result.ok and result.status_code == 302
        assert result.error is not None and "not followed" in result.error
        assert target.requests == []


@pytest.mark.parametrize("host", ["127.0.0.2", "0x7f000002"])
async def test_a_forbidden_address_is_permanent_and_never_contacted(
    sender: HttpWebhookSender, host: str,
) -> None:
    async with WebhookSink(host="127.0.0.2") as forbidden:
        result = await sender.deliver(pending(f"http://{host}:{forbidden.port}/hook"))
    assert not result.ok and result.permanent
    assert result.error is not None and "127.0.0.2" in result.error
    assert forbidden.requests == []


async def test_a_slow_receiver_times_out_as_a_failure() -> None:
    async with make_sender(timeout=0.5) as sender, WebhookSink([Reply(delay_s=3)]) as sink:
        started = time.monotonic()
        result = await sender.deliver(pending(sink.url()))
    assert not result.ok and not result.permanent and result.status_code is None
    assert result.error is not None and "timeout" in result.error
    assert time.monotonic() - started < 1.5


async def test_connection_refused_is_a_failure_to_retry(sender: HttpWebhookSender) -> None:
    result = await sender.deliver(pending(f"http://127.0.0.1:{free_port()}/hook"))
    assert not result.ok and not result.permanent and result.error


async def test_consecutive_deliveries_reuse_one_pooled_connection(
    sender: HttpWebhookSender,
) -> None:
    async with WebhookSink([Reply(200, body=b"thanks")]) as sink:
        for _ in range(3):
            assert (await sender.deliver(pending(sink.url()))).ok
    assert len({seen.peer for seen in sink.requests}) == 1


@contextlib.asynccontextmanager
async def raw_receiver(reply: bytes, *, then_stall: bool = True) -> AsyncIterator[str]:
    """A receiver on 127.0.0.1 that reads the request, writes ``reply`` as is,
    then holds the connection open without another byte (or closes it)."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        if then_stall:
            await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/services/T000/B000/SECRETPATHTOKEN?token=q"
    finally:
        server.close()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",  # then stalls, 8 bytes short
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n",  # stalls
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
], ids=["short-body", "dripping-chunks", "bad-gzip"])
async def test_a_2xx_is_delivered_whatever_its_body_does_after_the_status(reply: bytes) -> None:
    # The answer is the status: before, a body that stalled or broke after a 2xx
    # made the delivery a failure, sent again with the same id, and ended failed.
    async with make_sender(timeout=5.0) as sender, raw_receiver(reply) as url:
        started = time.monotonic()
        result = await sender.deliver(pending(url))
    assert result.ok and result.status_code == 200, result
    assert time.monotonic() - started < 3


async def test_an_error_names_the_receiver_without_the_secret_in_its_path() -> None:
    async with make_sender() as sender, raw_receiver(b"HTTP/1.1 2x0 OK\r\n\r\n") as url:
        result = await sender.deliver(pending(url))
    assert not result.ok and result.error is not None
    assert "SECRETPATHTOKEN" not in result.error and "token=q" not in result.error, result.error
    assert "127.0.0.1" in result.error
