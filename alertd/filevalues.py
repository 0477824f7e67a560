"""Config file values: a TOML value must have the type its option reads from a flag."""

from __future__ import annotations

from typing import Any


def wrong_secrets_type(raw: Any) -> str | None:
    """Why ``raw`` cannot be ``webhook_secret``: a string or a list of strings.
    Only the type is named, never the value."""
    if isinstance(raw, str) or (isinstance(raw, list)
                                and all(isinstance(item, str) for item in raw)):
        return None
    return f"must be a string or a list of strings, got {describe(raw, show=False)}"


_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
    (dict, "a table"))


def describe(raw: Any, *, show: bool = True) -> str:
    """A TOML value's type, after its value if it is a number or a boolean and ``show``."""
    if isinstance(raw, list):
        strings = all(isinstance(item, str) for item in raw)
        return "an array" if strings else "an array holding a non-string"
    kind = next((name for cls, name in _KINDS if isinstance(raw, cls)), "a date or time")
    if not show or not isinstance(raw, int | float):
        return kind
    shown = str(raw).lower() if isinstance(raw, bool) else repr(raw)
    return f"{shown}, {kind}"
