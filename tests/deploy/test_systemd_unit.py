"""systemd/alertd.service: the directives alertd relies on, checked against its code.

systemd-analyze is run where it exists (Debian's systemd package ships it,
and it works without systemd as PID 1). It prints unit problems (unknown
keys, bad values) as warnings and still exits 0, so any line that names the
unit fails the test too. Where the binary is absent the test is skipped with
that reason; it never passes without having run.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from alertd.config import Settings
from alertd.exitcodes import EXIT_CONFIG, EXIT_USAGE
from alertd.master import KILL_AFTER_ABORT_S, TICK_S
from tests.deploy.files import (
    ALERTD,
    CONF_TOML,
    ENV_EXAMPLE,
    TEST_SECRET,
    UNIT,
    read_unit,
    run,
    seconds,
    tool,
)

# Master.handle_term: SIGKILL to children graceful_timeout + 15 s after TERM,
# then up to 5 s for them to be reaped before the master exits.
MASTER_STOP_MARGIN_S = 15 + 5

unit = read_unit()


def service(key: str) -> str:
    return unit.value("Service", key)


def graceful_timeouts() -> list[float]:
    """The default and, if conf/alertd.toml sets one, the shipped config's value."""
    found = [Settings().graceful_timeout]
    if CONF_TOML.exists():
        found.append(float(tomllib.loads(CONF_TOML.read_text()).get("graceful_timeout", 0)))
    return found


@pytest.mark.parametrize(("key", "expected"), [
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ("Restart", "on-failure"),
    ("KillMode", "mixed"),
    ("KillSignal", "SIGTERM"),
    ("EnvironmentFile", "/etc/alertd/alertd.env"),
    ("CacheDirectory", "alertd"),
    ("RuntimeDirectory", "alertd"),
    ("DynamicUser", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("NoNewPrivileges", "yes"),
    ("SystemCallArchitectures", "native"),
    ("MemoryDenyWriteExecute", "yes"),
    ("LockPersonality", "yes"),
    ("RestrictNamespaces", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectControlGroups", "yes"),
    ("CapabilityBoundingSet", ""),
    ("UMask", "0077"),
    ("SystemCallErrorNumber", "EPERM"),
])
def test_the_unit_sets(key: str, expected: str) -> None:
    assert service(key) == expected


def test_the_unit_allows_only_unix_and_ip_sockets() -> None:
    assert set(service("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_the_syscall_filter_starts_from_system_service() -> None:
    filters = unit.values("Service", "SystemCallFilter")
    assert filters[0] == "@system-service"
    assert all(f.startswith("~") for f in filters[1:])


def test_a_bad_configuration_is_not_restarted() -> None:
    codes = service("RestartPreventExitStatus").split()
    assert str(EXIT_CONFIG) in codes and str(EXIT_USAGE) in codes


def test_the_file_descriptor_limit_covers_a_child_of_8192_slots() -> None:
    # The limit is per process. A child holds about 4 per slot (socket, temp
    # file, ffprobe's pipes) plus its AMQP connection, DB pool and logs.
    assert int(service("LimitNOFILE")) >= 4 * 8192 + 64


def test_settings_come_from_the_shared_config_file_and_the_secret_env_file() -> None:
    assert "ALERTD_CONFIG=/etc/alertd/alertd.toml" in unit.values("Service", "Environment")


def test_downloads_and_the_control_socket_use_the_units_own_directories() -> None:
    argv = service("ExecStart").split()
    assert argv[:2] == ["/opt/alertd/bin/alertd", "start"]
    assert "--download-dir=${CACHE_DIRECTORY}" in argv
    assert "--control-socket=${RUNTIME_DIRECTORY}/control.sock" in argv


def test_stop_timeout_outlasts_the_masters_own_graceful_stop() -> None:
    for graceful in graceful_timeouts():
        assert seconds(service("TimeoutStopSec")) > graceful + MASTER_STOP_MARGIN_S


def test_the_watchdog_does_not_fire_while_the_master_replaces_a_hung_child() -> None:
    # Pings stop while a stale child is alive: from the master's SIGABRT to its
    # SIGKILL and reap, on top of the up to WatchdogSec/3 since the last ping.
    watchdog = seconds(service("WatchdogSec"))
    assert watchdog * 2 / 3 > KILL_AFTER_ABORT_S + 2 * TICK_S + 1
    # ... and a stuck master is caught within one heartbeat timeout.
    assert watchdog <= Settings().heartbeat_timeout


def test_the_start_timeout_leaves_time_to_connect_every_child() -> None:
    assert seconds(service("TimeoutStartSec")) >= 3 * Settings().connect_timeout


def unit_env() -> dict[str, str]:
    env = {k: v for k, _, v in (e.partition("=") for e in unit.values("Service", "Environment"))}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    env["ALERTD_CONFIG"] = str(CONF_TOML)  # the file install-systemd copies to /etc/alertd
    return {"PATH": os.environ["PATH"], **env}


def check_config(env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    argv = service("ExecStart").replace("${CACHE_DIRECTORY}", str(tmp_path / "cache"))
    argv = argv.replace("${RUNTIME_DIRECTORY}", str(tmp_path / "run"))
    result = run([ALERTD, "check-config", *argv.split()[2:]], env=env)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.skipif(not CONF_TOML.exists(), reason="conf/alertd.toml is not in this checkout")
def test_alertd_accepts_the_units_flags_config_and_env_file(tmp_path: Path) -> None:
    code, out = check_config({**unit_env(), "ALERTD_WEBHOOK_SECRET": TEST_SECRET}, tmp_path)
    assert code == 0, out
    shown = json.loads(out)
    assert shown["download_dir"] == str(tmp_path / "cache")
    assert shown["control_socket"] == str(tmp_path / "run" / "control.sock")


@pytest.mark.skipif(not CONF_TOML.exists(), reason="conf/alertd.toml is not in this checkout")
def test_the_example_env_file_is_refused_until_its_secret_is_replaced(tmp_path: Path) -> None:
    code, out = check_config(unit_env(), tmp_path)
    assert code == EXIT_CONFIG, out
    assert "webhook_secret" in out


def systemd_analyze() -> str:
    found = tool("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): "
                    "the unit was not verified")
    return found


def runnable_copy(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's alertd.
    copy = tmp_path / "alertd.service"
    copy.write_text(UNIT.read_text().replace("/opt/alertd/bin/alertd", ALERTD))
    return copy


def test_systemd_analyze_verify_reports_nothing(tmp_path: Path) -> None:
    result = run([systemd_analyze(), "verify", "--man=no", str(runnable_copy(tmp_path))])
    about_unit = [line for line in (result.stdout + result.stderr).splitlines()
                  if "alertd.service" in line]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr


def test_systemd_analyze_security_rates_the_sandbox_ok(tmp_path: Path) -> None:
    result = run([systemd_analyze(), "security", "--offline=yes", "--man=no",
                  str(runnable_copy(tmp_path))])
    assert result.returncode == 0, result.stderr
    level = re.search(r"Overall exposure level for alertd\.service: ([\d.]+)", result.stdout)
    assert level, result.stdout
    assert float(level.group(1)) <= 2.0, result.stdout
