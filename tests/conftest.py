"""Shared fixtures: an isolated RabbitMQ vhost and PostgreSQL database per test run.

Integration tests never skip when a service is missing: they fail, so CI
cannot go green without having talked to the real RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

RUN_ID = uuid.uuid4().hex[:8]
AMQP_HOST = os.environ.get("ALERTD_TEST_AMQP_HOST", "127.0.0.1:5672")
PG_ADMIN_DSN = os.environ.get("ALERTD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q ARGS``; its output, stripped (a failure raises)."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True,
                          text=True, timeout=120)
    return done.stdout.strip()


def amqp_url_for(vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}/{quote(vhost, safe='')}?heartbeat=10"


def dsn_for(dbname: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{dbname}"


def create_vhost(name: str) -> str:
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return amqp_url_for(name)


def delete_vhost(name: str, tries: int = 3) -> None:
    """Delete a vhost; rabbitmqctl failing on a loaded machine is retried, then reported.

    A vhost left behind is not a test failure, but it must not go unnoticed:
    it ends up in pytest's warnings summary.
    """
    error = ""
    for _ in range(tries):
        try:
            done = subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name],
                                  capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            error = "rabbitmqctl timed out"
            continue
        if done.returncode == 0 or "does not exist" in done.stderr + done.stdout:
            return
        error = (done.stderr or done.stdout).strip()[-300:]
    warnings.warn(f"RabbitMQ vhost {name!r} was left behind: {error}", stacklevel=2)


def create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return dsn_for(name)


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A vhost of this test run's own; tests use distinct queue names inside it."""
    name = f"alertd-test-{RUN_ID}"
    url = create_vhost(name)
    yield url
    delete_vhost(name)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A database of this test run's own, schema migrated."""
    from alertd.adapters.postgres import migrate

    name = f"alertd_test_{RUN_ID}"
    dsn = create_database(name)
    migrate(dsn)
    yield dsn
    drop_database(name)


@pytest.fixture()
def fresh_vhost() -> Iterator[str]:
    """A vhost for one test (end-to-end tests that own their whole topology)."""
    name = f"alertd-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    url = create_vhost(name)
    yield url
    delete_vhost(name)


@pytest.fixture()
def fresh_db() -> Iterator[str]:
    """A migrated database for one test."""
    from alertd.adapters.postgres import migrate

    name = f"alertd_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    dsn = create_database(name)
    migrate(dsn)
    yield dsn
    drop_database(name)


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sample clips generated with ffmpeg lavfi, by name (see alertd.samples)."""
    from alertd.samples import make_sample_clips

    return make_sample_clips(tmp_path_factory.mktemp("clips"))
