"""Logging setup: readable text by default, JSON lines with --log-format json.

Every line carries the pid and the process role (master, child N) and, inside
an alert's task, its alert id (a contextvar, so concurrent slots don't mix).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import sys

import orjson

current_alert_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_alert_id", default=None)
_role = "master"


def set_role(role: str) -> None:
    """Name this process in every later log line (called in a child after fork)."""
    global _role  # noqa: PLW0603 - one process, one role, set once after fork
    _role = role


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        alert_id = current_alert_id.get()
        record.alert = f" alert={alert_id}" if alert_id else ""
        record.alert_id = alert_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "role": getattr(record, "role", _role),
            "msg": record.getMessage(),
        }
        alert_id = getattr(record, "alert_id", None)
        if alert_id:
            doc["alert_id"] = alert_id
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s [%(role)s pid=%(process)d]%(alert)s %(name)s: %(message)s"


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq logs every reconnect attempt at warning with a traceback; ours say it once.
    logging.getLogger("aiormq").setLevel(logging.ERROR)
