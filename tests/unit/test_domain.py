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
    ({**GOOD, "occurred_at": "2026-11-28T10:00:00"}, "invalid_field: occurred_at is not RFC"),
    ({**GOOD, "attributes": [1]}, "invalid_field: attributes must be an object, got array"),
    ({**GOOD, "source": 3}, "invalid_field: source must be a string"),
    # PostgreSQL stores no NUL in text or jsonb: refused here, not after five downloads.
    ({**GOOD, "source": "cam\x00"}, "invalid_field: source contains a NUL character"),
    ({**GOOD, "attributes": {"a": ["x", {"b": "\x00"}]}},
     "invalid_field: attributes contains a NUL character"),
    ({**GOOD, "attributes": {"\x00": 1}}, "invalid_field: attributes contains a NUL character"),
    ({**GOOD, "video_url": "http://x/v\x00"},
     "invalid_field: video_url has spaces or control characters"),
    ({**GOOD, "webhook_url": "http://h/\n"},
     "invalid_field: webhook_url has spaces or control characters"),
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


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH])
@pytest.mark.parametrize("leaf", [1, {}, []])
def test_nesting_is_refused_exactly_past_the_depth_limit(levels: int, leaf: object) -> None:
    # Objects and arrays count, the body being 1; the value inside the
    # innermost adds no level: MAX_JSON_DEPTH - 1 nested objects in attributes
    # (attributes itself the first) reach the limit, one more passes it.
    nested: object = leaf
    for _ in range(levels - (1 if isinstance(leaf, (dict, list)) else 0)):
        nested = {"a": nested}
    body = {**GOOD, "attributes": nested}
    if levels + 1 > MAX_JSON_DEPTH:
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


@pytest.mark.parametrize("value", [
    "2024-05-01T12Z", "2024-05-01T12:00Z", "20240501T120000Z", "2024-05-01T12:00:00+0100",
    "2024-05-01T12:00:00+01", "2024-W18-3T12:00:00Z", "2024-05-01T12:00:00 Z",
    "2024-05-01T12:00:00Z\x00", "2024-05-01", "2024-05-01T12:00:00", "12:00:00Z",
    "\uff12\uff10\uff12\uff14-05-01T12:00:00Z", "2024-05-01T12:00:00.Z", "2024-05-01T12:00:00,5Z",
    "2024-02-30T12:00:00Z", "2024-05-01T24:00:00Z", "2024-05-01T12:00:00+24:00",
    "2024-01-01T00:00:0012345Z", "0001-01-01T00:00:60+01:00",
])
def test_occurred_at_must_be_rfc3339_not_any_iso8601_form(value: str) -> None:
    with pytest.raises(InvalidMessage, match="invalid_field: occurred_at"):
        parse({**GOOD, "occurred_at": value})


@pytest.mark.parametrize(("value", "expected"), [
    ("2024-05-01t12:00:00z", dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)),
    ("2024-05-01 12:00:00Z", dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)),  # RFC 3339 5.6 note
    ("2024-05-01T12:00:00.123456789-00:00",
     dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)),
    ("2024-05-01T14:30:00+02:30", dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)),
    ("2016-12-31T23:59:60Z", dt.datetime(2017, 1, 1, tzinfo=dt.UTC)),
    ("2017-01-01T05:29:60+05:30", dt.datetime(2017, 1, 1, tzinfo=dt.UTC)),  # same leap second
])
def test_every_rfc3339_form_is_read(value: str, expected: dt.datetime) -> None:
    assert parse({**GOOD, "occurred_at": value}).occurred_at == expected


@pytest.mark.parametrize("value", ["2016-12-30T23:59:60Z", "2016-12-31T12:59:60Z",
                                   "2016-12-31T23:59:60+01:00"])
def test_second_60_is_only_a_leap_second_at_the_end_of_a_month_utc(value: str) -> None:
    with pytest.raises(InvalidMessage, match="leap second"):
        parse({**GOOD, "occurred_at": value})


def test_valid_json_that_orjson_cannot_read_is_ignored_in_unknown_fields() -> None:
    # The contract: other fields are ignored. orjson refuses these three.
    text = (json.dumps(GOOD)[:-1] + ', "big": 1e400, "wide": 1' + "0" * 400
            + ', "wider": -' + "9" * 5000 + ', "s": "\\ud800"}')
    alert = parse(text.encode())
    assert alert.alert_id == GOOD["alert_id"] and alert.attributes == {}


@pytest.mark.parametrize(("fragment", "reason"), [
    ('"attributes": {"n": 1' + "0" * 400 + "}", "integer outside the 64-bit range"),
    ('"attributes": {"n": -1' + "0" * 5000 + "}", "integer outside the 64-bit range"),
    ('"attributes": {"n": [1e400]}', "beyond a double's range"),
    ('"attributes": {"\\udc00": 1}', "attributes has a lone surrogate"),
    ('"source": "cam \\ud800"', "source has a lone surrogate"),
    ('"video_url": "http://x.example/\\ud800"', "video_url has a lone surrogate"),
])
def test_valid_json_that_orjson_cannot_read_in_a_kept_field_is_invalid_field(
    fragment: str, reason: str,
) -> None:
    doc = {k: v for k, v in GOOD.items() if not fragment.startswith(f'"{k}"')}
    text = json.dumps(doc)[:-1] + ", " + fragment + "}"
    with pytest.raises(InvalidMessage, match=f"^invalid_field: .*{reason}"):
        parse(text.encode())


@pytest.mark.parametrize("text", ['{"alert_id": NaN}', '{"alert_id": Infinity}',
                                  '{"a": 1,}', "{'a': 1}", '{"a": 1' + "0" * 5000 + "x}"])
def test_what_is_not_json_stays_invalid_json_for_both_parsers(text: str) -> None:
    with pytest.raises(InvalidMessage, match=r"^invalid_json: "):
        parse(text.encode())


@pytest.mark.parametrize("url", ["http://x.example/v\u0085.mp4", " http://x.example/v.mp4",
                                 "http://x.example/v.mp4 ", "http://x .example/v.mp4",
                                 "http://x.example/a b.mp4", "http://x.example/\u00a0.mp4"])
def test_a_url_with_a_c1_control_or_a_space_is_invalid_field(url: str) -> None:
    with pytest.raises(InvalidMessage, match="video_url has spaces or control characters"):
        parse({**GOOD, "video_url": url})


@pytest.mark.parametrize("levels", [1030, 5000])
def test_nesting_past_orjsons_own_limit_is_too_deep_not_invalid_json(levels: int) -> None:
    body = json.dumps(GOOD)[:-1] + ', "x": ' + "[" * levels + "]" * levels + "}"
    with pytest.raises(InvalidMessage, match=r"^too_deep: "):
        parse(body.encode())
