"""The alert domain: messages, metadata and outcomes, with their validation. No I/O."""

from __future__ import annotations

import calendar
import datetime as dt
import enum
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from alertd.errors import ErrorCode, InvalidMessage, ProcessingError

MAX_ALERT_ID_LEN = 128
MAX_URL_LEN = 4096
# A message body larger than this is dead-lettered before JSON parsing:
# an alert is a few hundred bytes, so anything near this is abuse or a bug.
MAX_BODY_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32
# orjson reads an integer outside [-2^63, 2^64) as a float, so an attribute
# would be echoed back changed. Only attributes holding a float that far out
# (rare) are read again, exactly, to tell such an integer from a real float.
_INT_RANGE = (-(2**63), 2**64)
# RFC 3339 section 5.6 date-time (a space for the T, as its note allows);
# datetime.fromisoformat alone takes many ISO 8601 forms RFC 3339 does not.
_RFC3339 = re.compile(
    r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d):(\d\d)(?:(\.\d{1,6})\d*)?([Zz]|[+-]\d\d:\d\d)",
    re.ASCII,
)

JSON = dict[str, Any]


class Stage(enum.StrEnum):
    """Where an alert is in its pipeline; reported per slot in heartbeats."""

    DEDUP = "dedup"
    DOWNLOAD = "download"
    PROBE = "probe"
    STORE = "store"
    NOTIFY = "notify"


class Status(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Alert:
    """One validated alert message. ``alert_id`` is the idempotency key."""

    alert_id: str
    video_url: str
    webhook_url: str | None = None
    occurred_at: dt.datetime | None = None
    source: str | None = None
    attributes: JSON = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 of what the alert asks for, to tell a redelivery from a reused id."""
        canonical = orjson.dumps({
            "video_url": self.video_url, "webhook_url": self.webhook_url,
            "occurred_at": self.occurred_at.isoformat() if self.occurred_at else None,
            "source": self.source, "attributes": self.attributes,
        }, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class DownloadedVideo:
    """A clip downloaded to a private local file; the file is the caller's to delete."""

    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Failure:
    code: ErrorCode
    message: str

    @classmethod
    def from_error(cls, exc: ProcessingError) -> Failure:
        return cls(code=exc.code, message=exc.message)

    def to_json(self) -> JSON:
        return {"code": str(self.code), "message": self.message}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The stored result of one alert: metadata when done, a failure when not."""

    alert: Alert
    status: Status
    metadata: JSON | None
    failure: Failure | None
    attempts: int
    received_at: dt.datetime
    processed_at: dt.datetime

    @classmethod
    def done(
        cls, alert: Alert, metadata: JSON, *, attempts: int,
        received_at: dt.datetime, processed_at: dt.datetime,
    ) -> Outcome:
        return cls(alert, Status.DONE, metadata, None, attempts, received_at, processed_at)

    @classmethod
    def failed(
        cls, alert: Alert, failure: Failure, *, attempts: int,
        received_at: dt.datetime, processed_at: dt.datetime,
    ) -> Outcome:
        return cls(alert, Status.FAILED, None, failure, attempts, received_at, processed_at)


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """What the outbox must deliver for one outcome: the target and the JSON body."""

    alert_id: str
    url: str
    payload: JSON


def webhook_event(outcome: Outcome, *, default_url: str | None) -> WebhookEvent | None:
    """Build the webhook body for an outcome; None when the alert has nowhere to go."""
    url = outcome.alert.webhook_url or default_url
    if not url:
        return None
    done = outcome.status is Status.DONE
    payload: JSON = {
        "type": "alert.processed" if done else "alert.failed",
        "alert_id": outcome.alert.alert_id,
        "status": str(outcome.status),
        "metadata": outcome.metadata,
        "error": outcome.failure.to_json() if outcome.failure else None,
        "attributes": outcome.alert.attributes,
        "processed_at": format_time(outcome.processed_at),
    }
    return WebhookEvent(alert_id=outcome.alert.alert_id, url=url, payload=payload)


def webhook_receiver(url: str) -> str:
    """Who receives a webhook: the URL's host[:port], lower case, without userinfo.

    The outbox adapter computes the same from the stored URL (in SQL), so
    that a dispatcher can leave out the rows of a receiver that hangs.
    """
    return urlsplit(url).netloc.rpartition("@")[2].lower()


def format_time(value: dt.datetime) -> str:
    """RFC 3339 in UTC with millisecond precision and a ``Z`` suffix."""
    # isoformat is C and ~5x faster than strftime; the offset of UTC is "+00:00".
    # Times alertd makes are UTC already: astimezone is skipped for them.
    if value.tzinfo is not dt.UTC:
        value = value.astimezone(dt.UTC)
    return value.isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_alert(body: bytes, *, default_webhook_url: str | None) -> Alert:
    """Validate an AMQP body into an :class:`Alert` or raise :class:`InvalidMessage`.

    The reason names the field and the problem, because it is what an operator
    reads in the DLQ header at night.
    """
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body_too_large: {len(body)} bytes > {MAX_BODY_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not_utf8: {exc.reason} at byte {exc.start}") from None
    try:
        doc = orjson.loads(text)
        beyond_orjson = False
    except orjson.JSONDecodeError as exc:
        doc = _loads_beyond_orjson(text, exc)
        beyond_orjson = True
    if not isinstance(doc, dict):
        raise InvalidMessage(f"not_an_object: body is a JSON {_json_type(doc)}")
    # Deeper than MAX_JSON_DEPTH needs more than MAX_JSON_DEPTH brackets;
    # counting them (C speed) spares walking every ordinary alert.
    if (body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH
            and _depth(doc) > MAX_JSON_DEPTH):
        raise InvalidMessage(f"too_deep: nesting deeper than {MAX_JSON_DEPTH}")
    if beyond_orjson:
        _check_beyond_orjson(doc)

    alert_id = doc.get("alert_id")
    if not isinstance(alert_id, str):
        raise InvalidMessage(_field_problem("alert_id", alert_id, "a string"))
    if not 1 <= len(alert_id) <= MAX_ALERT_ID_LEN:
        raise InvalidMessage(
            f"invalid_field: alert_id must be 1..{MAX_ALERT_ID_LEN} characters, got {len(alert_id)}"
        )
    if not alert_id.isprintable():
        raise InvalidMessage("invalid_field: alert_id has non-printable characters (control, "
                             "format or non-ASCII space characters)")

    video_url = _http_url(doc, "video_url", required=True)
    assert video_url is not None
    webhook_url = _http_url(doc, "webhook_url", required=False)
    if webhook_url is None and not default_webhook_url:
        raise InvalidMessage("missing_field: webhook_url (and no --webhook-url default)")

    occurred_at = None
    raw_time = doc.get("occurred_at")
    if raw_time is not None:
        occurred_at = _rfc3339(raw_time)

    source = doc.get("source")
    if source is not None and not isinstance(source, str):
        raise InvalidMessage(_field_problem("source", source, "a string"))

    attributes = doc.get("attributes", {})
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise InvalidMessage(_field_problem("attributes", attributes, "an object"))

    if "\\u0000" in text:  # rare: only then look for a NUL, which PostgreSQL cannot store
        for key in ("source", "attributes"):
            if _has_nul(doc.get(key)):
                raise InvalidMessage(f"invalid_field: {key} contains a NUL character (\\u0000)")

    if attributes and _has_far_float(attributes) and _has_wide_int(
            json.loads(text).get("attributes")):
        raise InvalidMessage(_WIDE_INT)

    return Alert(
        alert_id=alert_id,
        video_url=video_url,
        webhook_url=webhook_url,
        occurred_at=occurred_at,
        source=source,
        attributes=attributes,
    )


def _loads_beyond_orjson(text: str, error: orjson.JSONDecodeError) -> Any:
    """Valid JSON that orjson refuses: a number beyond a double (``1e400``, a
    400-digit integer), a lone surrogate escape (``"\\ud800"``), nesting past
    orjson's 1024 levels. Read with the standard library, so that an unknown
    field holding one is ignored as the contract says, and a known one gets
    ``invalid_field`` (:func:`_check_beyond_orjson`), not ``invalid_json``.
    Only bodies orjson refused come here."""
    if error.msg == "depth limit exceeded":  # orjson's own words: valid, but too deep
        raise InvalidMessage(f"too_deep: nesting deeper than {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_int=_int_or_too_wide)
    except (ValueError, RecursionError):
        raise InvalidMessage(f"invalid_json: {error.msg} at char {error.pos}") from None


def _int_or_too_wide(digits: str) -> int:
    # 2^64 has 20 digits: a longer integer is past 64 bits whatever it is,
    # and is not built (Python refuses past 4300 digits, and it costs time).
    return int(digits) if len(digits) <= 21 else _INT_RANGE[1]


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_beyond_orjson(doc: dict[str, Any]) -> None:
    """The fields alertd keeps must hold only what it can store and send back."""
    for key in _STORED_FIELDS:
        if _has_surrogate(doc.get(key)):
            raise InvalidMessage(f"invalid_field: {key} has a lone surrogate escape "
                                 "(\\ud800-\\udfff without its pair), which is not text")
    attributes = doc.get("attributes")
    if not isinstance(attributes, dict):
        return  # absent, null, or the wrong type: parse_alert says which
    if _has_wide_int(attributes):
        raise InvalidMessage(_WIDE_INT)
    if _has_infinite_float(attributes):
        raise InvalidMessage("invalid_field: attributes has a number beyond a double's "
                             "range, which would not be echoed back unchanged (send it as "
                             "a string)")


_WIDE_INT = ("invalid_field: attributes has an integer outside the 64-bit range, which would "
             "not be echoed back unchanged (send it as a string)")
_STORED_FIELDS = ("alert_id", "video_url", "webhook_url", "occurred_at", "source", "attributes")


def _has_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(key) or _has_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(item) for item in value)
    return False


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_infinite_float(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_infinite_float(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_infinite_float(item) for item in value)
    return False


def _has_nul(value: object) -> bool:
    """Whether a NUL is in a string, an object's key or a value nested in ``value``."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _has_far_float(attributes: JSON) -> bool:
    """Whether a float outside [-2^63, 2^64) is nested in ``attributes`` (a loop:
    this runs for every alert with attributes)."""
    low, high = _INT_RANGE
    pending: list[Any] = [attributes]
    while pending:
        value = pending.pop()
        for item in value.values() if type(value) is dict else value:
            kind = type(item)
            if kind is float:
                if not low < item < high:
                    return True
            elif kind is dict or kind is list:
                pending.append(item)
    return False


def _has_wide_int(value: object) -> bool:
    """Whether an integer outside what orjson keeps exact is nested in ``value``."""
    if isinstance(value, int):
        return not _INT_RANGE[0] <= value < _INT_RANGE[1]
    if isinstance(value, dict):
        return any(_has_wide_int(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_wide_int(item) for item in value)
    return False


def _http_url(doc: JSON, key: str, *, required: bool) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise InvalidMessage(f"missing_field: {key}")
        return None
    if not isinstance(value, str):
        raise InvalidMessage(_field_problem(key, value, "a string"))
    if len(value) > MAX_URL_LEN:
        raise InvalidMessage(f"invalid_field: {key} longer than {MAX_URL_LEN} characters")
    problem = _url_problem(value)
    if problem:
        raise InvalidMessage(f"invalid_field: {key} {problem}")
    return value


# C0 and C1 controls, DEL, and any space (U+0020, NBSP, ...): none may appear
# unencoded in a URL (RFC 3986); aiohttp would quietly re-encode some of them.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x20\x7f-\x9f\s]")


@functools.lru_cache(maxsize=1024)
def _url_problem(value: str) -> str:
    """What is wrong with an http(s) URL, "" when nothing; cached, as most alerts
    of a producer name the same webhook URL (at most 1024 x MAX_URL_LEN
    characters: ~16 MiB per child in the worst case of 4-byte characters)."""
    if _CONTROL_CHARACTER.search(value):
        return "has spaces or control characters (they must be percent-encoded)"
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a port out of range
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "scheme must be http or https"
    if not parts.hostname:
        return "has no host"
    return ""


def _rfc3339(value: object) -> dt.datetime:
    if not isinstance(value, str):
        raise InvalidMessage(_field_problem("occurred_at", value, "an RFC 3339 string"))
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise InvalidMessage(
            "invalid_field: occurred_at is not RFC 3339 (YYYY-MM-DDTHH:MM:SS[.frac] "
            "and Z or +HH:MM)"
        )
    day, hour_minute, second, fraction, offset = match.groups()
    if offset in ("Z", "z"):
        offset = "+00:00"
    # RFC 3339 allows a leap second (23:59:60 UTC), which datetime cannot
    # hold: it is read as the second after 23:59:59, as PostgreSQL does.
    leap = second == "60"
    text = f"{day}T{hour_minute}:{'59' if leap else second}{fraction or ''}{offset}"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidMessage("invalid_field: occurred_at is not a valid date and time") from None
    if leap:
        try:
            utc = parsed.astimezone(dt.UTC)
            parsed += dt.timedelta(seconds=1)
        except OverflowError:  # the leap second's UTC time is past 9999 or before 1
            raise InvalidMessage("invalid_field: occurred_at is outside years 1-9999") from None
        last_day = calendar.monthrange(utc.year, utc.month)[1]
        if (utc.day, utc.hour, utc.minute) != (last_day, 23, 59):
            raise InvalidMessage("invalid_field: occurred_at has second 60 outside a leap "
                                 "second (23:59:60 UTC on the last day of a month)")
    return parsed


def _field_problem(key: str, value: object, expected: str) -> str:
    if value is None:
        return f"missing_field: {key}"
    return f"invalid_field: {key} must be {expected}, got {_json_type(value)}"


def _json_type(value: object) -> str:
    return {
        dict: "object", list: "array", str: "string", bool: "boolean",
        int: "number", float: "number", type(None): "null",
    }.get(type(value), type(value).__name__)


def _depth(value: object) -> int:
    """Nesting depth: objects and arrays, the body being 1 (values inside add no
    level). Iterative, so a hostile document cannot blow the stack."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest
