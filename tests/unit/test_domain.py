"""Message validation: every bad body gets a specific reason, good ones an Alert."""

from __future__ import annotations

import datetime as dt
import json

import orjson
import pytest

from alertd.domain import MAX_BODY_BYTES, MAX_JSON_DEPTH, format_time, parse_alert
from alertd.errors import InvalidMessage


def parse(doc: object, default: str | None = None):  # type: ignore[no-untyped-def]
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return parse_alert(body, default_webhook_url=default)


GOOD = {"alert_id": "cam-1/evt-9", "video_url": "https://clips.example/v.mp4",
        "webhook_url": "https://hooks.example/alerts"}


def test_a_complete_message_becomes_an_alert_and_unknown_keys_are_ignored() -> None:
    alert = parse({**GOOD, "occurred_at": "2026-11-28T10:00:00Z", "source": "cam",
                   "attributes": {"zone": "north"}, "extra": [1, 2]})
    assert alert.alert_id == "cam-1/evt-9"
    assert alert.occurred_at == dt.datetime(2026, 11, 28, 10, tzinfo=dt.UTC)
    assert alert.attributes == {"zone": "north"}
    assert alert.source == "cam"


@pytest.mark.parametrize(("body", "reason"), [
    (b"\xff\xfe not utf8", "not_utf8"),
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "not_an_object: body is a JSON array"),
    (b'"text"', "not_an_object: body is a JSON string"),
    ({"video_url": "http://x/v"}, "missing_field: alert_id"),
    ({"alert_id": 5, "video_url": "http://x/v", "webhook_url": "http://h/"},
     "invalid_field: alert_id must be a string, got number"),
    ({"alert_id": "", "video_url": "http://x/v", "webhook_url": "http://h/"},
     "invalid_field: alert_id must be 1..128 characters, got 0"),
    ({"alert_id": "x" * 10_000, "video_url": "http://x/v", "webhook_url": "http://h/"},
     "invalid_field: alert_id must be 1..128 characters, got 10000"),
    ({"alert_id": "a", "webhook_url": "http://h/"}, "missing_field: video_url"),
    ({"alert_id": "a", "video_url": "ftp://x/v", "webhook_url": "http://h/"},
     "invalid_field: video_url scheme must be http or https"),
    ({"alert_id": "a", "video_url": "file:///etc/passwd", "webhook_url": "http://h/"},
     "invalid_field: video_url scheme must be http or https"),
    ({"alert_id": "a", "video_url": "http:///nohost", "webhook_url": "http://h/"},
     "invalid_field: video_url has no host"),
    ({"alert_id": "a", "video_url": "http://x/v"}, "missing_field: webhook_url"),
    ({"alert_id": "a", "video_url": "http://x/v", "webhook_url": "gopher://h/"},
     "invalid_field: webhook_url scheme"),
    ({**GOOD, "occurred_at": "yesterday"}, "invalid_field: occurred_at is not RFC 3339"),
    ({**GOOD, "occurred_at": "2026-11-28T10:00:00"}, "invalid_field: occurred_at needs"),
    ({**GOOD, "attributes": [1]}, "invalid_field: attributes must be an object, got array"),
    ({**GOOD, "source": 3}, "invalid_field: source must be a string"),
    # PostgreSQL stores no NUL in text or jsonb: refused here, not after five downloads.
    ({**GOOD, "source": "cam\x00"}, "invalid_field: source contains a NUL character"),
    ({**GOOD, "attributes": {"a": ["x", {"b": "\x00"}]}},
     "invalid_field: attributes contains a NUL character"),
    ({**GOOD, "attributes": {"\x00": 1}}, "invalid_field: attributes contains a NUL character"),
    ({**GOOD, "video_url": "http://x/v\x00"}, "invalid_field: video_url has control characters"),
    ({**GOOD, "webhook_url": "http://h/\n"}, "invalid_field: webhook_url has control characters"),
    # orjson would read these as floats: the echo would differ from what was sent.
    (json.dumps({**GOOD, "attributes": {"n": [2**64]}}).encode(),
     "invalid_field: attributes has an integer outside"),
    (json.dumps({**GOOD, "attributes": {"n": {"m": -(2**63) - 1}}}).encode(),
     "invalid_field: attributes has an integer outside"),
    ({**GOOD, "alert_id": "a\u00a0b"}, "invalid_field: alert_id has non-printable characters"),
    ({**GOOD, "alert_id": "a\u200bb"}, "invalid_field: alert_id has non-printable characters"),
])
def test_a_bad_message_is_refused_with_a_specific_reason(body: object, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(body)
    assert info.value.reason.startswith(reason)


def test_a_huge_body_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidMessage, match="body_too_large"):
        parse(b" " * (MAX_BODY_BYTES + 1))


def test_deeply_nested_attributes_are_refused_without_recursion() -> None:
    nested: object = {}
    for _ in range(200):
        nested = {"a": nested}
    with pytest.raises(InvalidMessage, match="too_deep"):
        parse({**GOOD, "attributes": nested})


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1])
def test_nesting_is_refused_exactly_past_the_depth_limit(levels: int) -> None:
    # The body is 1 level, attributes 1 more, each nested object 1, the leaf 1:
    # MAX_JSON_DEPTH - 2 nested objects reach the limit, one more passes it.
    nested: object = 1
    for _ in range(levels):
        nested = {"a": nested}
    body = {**GOOD, "attributes": nested}
    if levels + 2 > MAX_JSON_DEPTH:
        with pytest.raises(InvalidMessage, match="too_deep"):
            parse(body)
    else:
        assert parse(body).attributes == nested


def test_the_default_webhook_url_makes_webhook_url_optional() -> None:
    alert = parse({"alert_id": "a", "video_url": "http://x/v"}, default="http://d/h")
    assert alert.webhook_url is None


def test_times_are_formatted_rfc3339_utc_with_milliseconds() -> None:
    value = dt.datetime(2026, 1, 2, 4, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert format_time(value) == "2026-01-02T03:04:05.123Z"


def test_utc_times_format_the_same_with_or_without_the_shortcut() -> None:
    value = dt.datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=dt.UTC)
    as_fixed_offset = value.astimezone(dt.timezone(dt.timedelta(0)))  # UTC, not the singleton
    assert format_time(value) == format_time(as_fixed_offset) == "2026-01-02T03:04:05.999Z"


def test_an_escaped_backslash_before_u0000_is_text_not_a_nul() -> None:
    alert = parse({**GOOD, "source": "\\u0000", "attributes": {"k": "\\u0000"}})
    assert alert.source == "\\u0000" and alert.attributes == {"k": "\\u0000"}


def test_integers_orjson_keeps_exact_and_long_digit_strings_are_echoed_unchanged() -> None:
    attributes = {"u64": 2**64 - 1, "i64": -(2**63), "digits": "1" * 25,
                  "elsewhere": 10**30 / 3}
    body = json.dumps({**GOOD, "attributes": attributes, "unknown": 10**30}).encode()
    assert parse(body).attributes == attributes


def test_a_leap_second_is_a_valid_occurred_at() -> None:
    # RFC 3339 section 5.7 allows 23:59:60; datetime cannot hold it.
    alert = parse({**GOOD, "occurred_at": "2016-12-31T23:59:60Z"})
    assert alert.occurred_at == dt.datetime(2017, 1, 1, tzinfo=dt.UTC)
    for bad in ("2016-12-31T23:59:61Z", "9999-12-31T23:59:60Z"):  # the second: no year 10000
        with pytest.raises(InvalidMessage):
            parse({**GOOD, "occurred_at": bad})
