"""Log lines: JSON with pid, role and alert id; readable text otherwise."""

from __future__ import annotations

import logging
import os

import orjson
import pytest

from alertd.logs import current_alert_id, set_role, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)
    set_role("master")


def test_json_lines_carry_pid_role_and_the_alert_id_of_the_task(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info", "json")
    set_role("child 3")
    token = current_alert_id.set("cam-7/evt-1")
    try:
        logging.getLogger("alertd.test").warning("stored %s", "it")
    finally:
        current_alert_id.reset(token)
    logging.getLogger("alertd.test").info("no alert here")
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0] == {**lines[0], "level": "warning", "msg": "stored it", "pid": os.getpid(),
                        "role": "child 3", "alert_id": "cam-7/evt-1", "logger": "alertd.test"}
    assert "alert_id" not in lines[1]


def test_text_lines_are_readable_and_name_the_role_and_alert(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("debug", "text")
    set_role("child 0")
    token = current_alert_id.set("a-9")
    try:
        logging.getLogger("alertd.test").debug("probing")
    finally:
        current_alert_id.reset(token)
    line = capsys.readouterr().err.strip()
    assert f"DEBUG [child 0 pid={os.getpid()}] alert=a-9 alertd.test: probing" in line


def test_the_level_filters_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("warning", "json")
    logging.getLogger("alertd.test").info("hidden")
    assert capsys.readouterr().err == ""
