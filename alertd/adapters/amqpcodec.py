"""AMQP header decoding that a hostile producer cannot turn into a reconnect loop.

aiormq decodes every frame with pamqp in its connection's reader. A message
whose headers pamqp cannot decode (a timestamp past the year 9999, a table
key or a short string that is not UTF-8) raises there, and aiormq closes the
whole connection: every in-flight ack is lost, the message comes back, and
the loop repeats until the queue's delivery limit dead-letters it, with the
valid alerts that were redelivered alongside it (found by a review). pamqp
offers no hook, so its decoders for those types are replaced, once per
process, by ones that keep what they can: a timestamp out of range stays the
raw integer, an undecodable string or key is decoded with replacement
characters. Everything else is pamqp's own.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pamqp import common, decode

Decoder = Callable[[bytes], tuple[int, Any]]


def make_decoding_lenient() -> None:
    """Install the lenient decoders into pamqp (idempotent)."""
    if decode.field_table is _field_table:
        return
    originals: dict[str, Decoder] = {
        "timestamp": decode.timestamp, "short_str": decode.short_str,
        "field_table": decode.field_table}
    replacements: dict[str, Decoder] = {
        "timestamp": _timestamp(originals["timestamp"]),
        "short_str": _short_str(originals["short_str"]), "field_table": _field_table}
    for name, replacement in replacements.items():
        setattr(decode, name, replacement)
        for table in (decode.METHODS, decode.TABLE_MAPPING):
            for key, function in list(table.items()):
                if function is originals[name]:
                    table[key] = replacement  # type: ignore[index]


def _timestamp(original: Decoder) -> Decoder:
    def timestamp(value: bytes) -> tuple[int, Any]:
        try:
            return original(value)
        except (OverflowError, OSError, ValueError):
            if len(value) < 8:
                raise
            # Past what datetime holds: the seconds as sent, an integer.
            return 8, common.Struct.timestamp.unpack(value[0:8])[0]
    return timestamp


def _short_str(original: Decoder) -> Decoder:
    def short_str(value: bytes) -> tuple[int, Any]:
        try:
            return original(value)
        except UnicodeDecodeError:
            length = value[0]
            return length + 1, value[1:length + 1].decode("utf-8", "replace")
    return short_str


def _field_table(value: bytes) -> tuple[int, Any]:
    """pamqp's ``field_table``, keys decoded with replacement characters.

    A table nested deeper than the stack (a few hundred levels, some KB)
    makes the recursive decoding raise RecursionError, which nothing between
    pamqp and aiormq's reader catches: the innermost table that sees it is
    kept empty instead (its length prefix says where it ends), and decoding
    goes on.
    """
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err
    offset = 4
    end = offset + length
    data: dict[str, Any] = {}
    try:
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset:offset + key_length].decode("utf-8", "replace")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except RecursionError:
        return end, {}
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err
