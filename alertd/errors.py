"""Errors that cross the boundary between adapters and the use case.

Adapters translate every library exception into one of these at the boundary
(``raise TransientError(...) from None``), so the service never sees an aiohttp,
psycopg or aiormq exception. The split decides what happens to an alert:
a transient error is retried with backoff, a permanent one fails the alert at
once with its stable :class:`ErrorCode`.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Stable error codes, part of the public contract (README "Error codes")."""

    DOWNLOAD_NOT_FOUND = "download_not_found"
    DOWNLOAD_TOO_LARGE = "download_too_large"
    DOWNLOAD_TIMEOUT = "download_timeout"
    DOWNLOAD_FAILED = "download_failed"
    FORBIDDEN_ADDRESS = "forbidden_address"
    NOT_A_VIDEO = "not_a_video"
    PROBE_TIMEOUT = "probe_timeout"
    PROBE_CRASHED = "probe_crashed"


class AlertdError(Exception):
    """Base of every error alertd raises on purpose."""


class ProcessingError(AlertdError):
    """Processing one alert failed; ``code`` says why, ``message`` says more."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TransientError(ProcessingError):
    """May succeed if tried again later (timeouts, 5xx, connection refused)."""


class PermanentError(ProcessingError):
    """Will fail the same way every time (404, not a video, too large)."""


class StoreUnavailable(AlertdError):
    """The result store cannot be reached now; the caller waits and tries again."""


class InvalidMessage(AlertdError):
    """An AMQP body that is not a valid alert; ``reason`` goes to the DLQ header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(AlertdError):
    """A setting is wrong; the message is one line that names the key."""
