"""What `alertd dlq list/show/replay` read off a dead letter without the broker."""

from __future__ import annotations

from alertd.deadletters import DeadLetter


def letter(body: bytes) -> DeadLetter:
    return DeadLetter(position=1, body=body, headers={})


def test_a_letter_names_its_alert_even_when_orjson_cannot_read_the_body() -> None:
    # Valid JSON that orjson refuses: parse_alert reads it with the standard
    # library too, so `alertd dlq show <id>` must find it the same way.
    assert letter(b'{"alert_id": "a-1", "n": 1e400}').alert_id == "a-1"
    assert letter(b'{"alert_id": "a-2", "s": "\\ud800"}').alert_id == "a-2"


def test_a_letter_that_is_not_json_or_has_no_string_id_has_none() -> None:
    for body in (b"not json", b'{"alert_id": 5}', b"[1]", b"\xff", b'{"a": 1' + b"0" * 5000 + b"}"):
        assert letter(body).alert_id is None
