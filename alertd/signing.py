"""Standard Webhooks signatures (https://www.standardwebhooks.com): sign and name deliveries.

The receiver verifies ``webhook-signature`` with the shared secret over
``"{webhook-id}.{webhook-timestamp}.{body}"``. During a secret rotation
alertd holds several secrets and sends one signature per secret, space
separated, so receivers on the old and the new secret both accept the
message; a receiver needs only one of them to match.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

SIGNATURE_VERSION = "v1"


def sign(secrets: tuple[bytes, ...], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64>`` per secret, space separated.

    ``secrets`` are the raw keys (the bytes after base64-decoding
    ``whsec_...``). ``body`` must be the exact bytes sent: the signature is over
    bytes, so re-serializing the JSON would break it. Raises ValueError on an
    empty ``secrets``: an empty header would look signed but verify nowhere,
    so callers without secrets send no header at all.
    """
    if not secrets:
        raise ValueError("sign() needs at least one secret")
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join(f"{SIGNATURE_VERSION},{_b64_hmac(key, signed)}" for key in secrets)


def _b64_hmac(key: bytes, data: bytes) -> str:
    return base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode("ascii")


def verify(
    secrets: tuple[bytes, ...], webhook_id: str, timestamp: int, body: bytes, header: str,
    *, now: float, tolerance_s: float = 300.0,
) -> bool:
    """True when ``header`` carries a v1 signature by any of ``secrets``, made near ``now``.

    The receiving side, for alertd's own demo and load-test receivers; the
    timestamp window (5 minutes, as the spec suggests) bounds replays.
    """
    if abs(now - timestamp) > tolerance_s:
        return False
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    offered = [part.partition(",") for part in header.split()]
    return any(
        version == SIGNATURE_VERSION and hmac.compare_digest(value, _b64_hmac(key, signed))
        for key in secrets
        for version, _, value in offered
    )


def new_webhook_id() -> str:
    """A fresh delivery id, stable across retries of one delivery (receivers dedupe on it)."""
    return f"msg_{uuid.uuid4().hex}"
