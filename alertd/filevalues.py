"""Config file values: a TOML value must have the type its option reads from a flag."""

from __future__ import annotations

from typing import Any

import click


def wrong_type(param: click.Parameter, raw: Any) -> str | None:
    """Why ``raw`` (from TOML) cannot be ``param``'s value, or None if it can.

    click converts a non-string leniently: ``int(2.5)`` is 2, ``int(True)`` is 1,
    ``str(5)`` is "5", and a table or a date is a TypeError traceback. So only
    what a flag could have spelled is let through: an integer (not a boolean)
    or a float with no fraction (``2.0``, ``1.5e8``) for a whole-number
    option, an integer or a float for seconds, a list of strings for a
    repeatable option. A string goes to click, which reads it
    exactly as the flag (``workers = "3"`` is 3, ``"2.5"`` is refused).
    """
    if isinstance(raw, str):
        return None
    if param.multiple:
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return None
        return f"must be a list of strings, got {describe(raw)}"
    if isinstance(param.type, click.types.IntParamType):
        if isinstance(raw, int) and not isinstance(raw, bool):
            return None
        if isinstance(raw, float) and raw.is_integer():
            # 2.0 or 1.5e8 (bytes) mean one integer, and files written so ran
            # before these checks: refusing them would stop an upgraded service.
            return None
        if isinstance(raw, float):
            return f"must be an integer, got {describe(raw)} (refused, not truncated)"
        return f"must be an integer, got {describe(raw)}"
    if isinstance(param.type, click.types.FloatParamType):
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return None
        return f"must be a number, got {describe(raw)}"
    return f"must be a string (in quotes), got {describe(raw)}"


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
