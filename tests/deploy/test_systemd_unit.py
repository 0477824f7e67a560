"""systemd/alertd.service and the prune units: the directives alertd relies on,
checked against its code.

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
from alertd.exitcodes import EXIT_CONFIG, EXIT_CRASH, EXIT_USAGE
from alertd.master import KILL_AFTER_ABORT_S, TICK_S
from tests.deploy.files import (
    ALERTD,
    CONF_TOML,
    ENV_EXAMPLE,
    PRUNE_TIMER,
    PRUNE_UNIT,
    TEST_SECRET,
    UNIT,
    Unit,
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


def unit_env(of: Unit = unit) -> dict[str, str]:
    """The unit's Environment= lines, then the example env file (which wins, as in systemd)."""
    env = {k: v for k, _, v in (e.partition("=") for e in of.values("Service", "Environment"))}
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


def runnable_copy(tmp_path: Path, source: Path = UNIT) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's alertd.
    copy = tmp_path / source.name
    copy.write_text(source.read_text().replace("/opt/alertd/bin/alertd", ALERTD))
    return copy


def test_systemd_analyze_verify_reports_nothing(tmp_path: Path) -> None:
    result = run([systemd_analyze(), "verify", "--man=no", str(runnable_copy(tmp_path))])
    about_unit = [line for line in (result.stdout + result.stderr).splitlines()
                  if "alertd.service" in line]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr


@pytest.mark.parametrize("source", [UNIT, PRUNE_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_security_rates_the_sandbox_ok(tmp_path: Path, source: Path) -> None:
    result = run([systemd_analyze(), "security", "--offline=yes", "--man=no",
                  str(runnable_copy(tmp_path, source))])
    assert result.returncode == 0, result.stderr
    level = re.search(rf"Overall exposure level for {re.escape(source.name)}: ([\d.]+)",
                      result.stdout)
    assert level, result.stdout
    assert float(level.group(1)) <= 2.0, result.stdout


# -- retention: alertd-prune.service and alertd-prune.timer ---------------------------

prune_unit = read_unit(PRUNE_UNIT)
prune_timer = read_unit(PRUNE_TIMER)
# What only the daemon needs: readiness and watchdog, its drain on stop,
# restarts, the download and control-socket directories, the fd limit.
DAEMON_ONLY = {
    "Type", "NotifyAccess", "ExecStart", "ExecReload", "TimeoutStartSec", "KillMode",
    "KillSignal", "TimeoutStopSec", "WatchdogSec", "Restart", "RestartSec",
    "RestartPreventExitStatus", "OOMPolicy", "CacheDirectory", "CacheDirectoryMode",
    "RuntimeDirectory", "LimitNOFILE", "Environment",
}
CLOSED_PORT_DSN = "postgresql://alertd:x@127.0.0.1:1/alertd"


def prune(key: str) -> str:
    return prune_unit.value("Service", key)


def test_the_prune_unit_is_a_oneshot_that_never_asks() -> None:
    assert prune("Type") == "oneshot"
    argv = prune("ExecStart").split()
    assert argv[:3] == ["/opt/alertd/bin/alertd", "db", "prune"]
    assert "--older-than=${ALERTD_PRUNE_DAYS}" in argv and "--yes" in argv


def test_the_prune_unit_keeps_every_other_setting_and_sandbox_item_of_the_daemon() -> None:
    # A hardening line added to alertd.service fails this until the prune unit has it too.
    for key in {k for k, _ in unit.sections["Service"]} - DAEMON_ONLY:
        assert prune_unit.values("Service", key) == unit.values("Service", key), key
    assert set(unit.values("Service", "Environment")) < set(
        prune_unit.values("Service", "Environment"))


def test_the_prune_unit_runs_as_the_daemons_dynamic_user() -> None:
    # DynamicUser without User= is named after the unit: "alertd" for alertd.service.
    assert "User" not in {k for k, _ in unit.sections["Service"]}
    assert prune("User") == UNIT.stem


def test_the_prune_days_default_to_30_and_the_example_env_file_says_so() -> None:
    assert "ALERTD_PRUNE_DAYS=30" in prune_unit.values("Service", "Environment")
    assert "#ALERTD_PRUNE_DAYS=30" in ENV_EXAMPLE.read_text().splitlines()


def test_a_prune_run_is_stopped_well_before_the_next_days_run() -> None:
    assert 0 < seconds(prune("TimeoutStartSec")) <= 6 * 3600


def test_the_timer_prunes_daily_spread_out_and_catches_up_after_downtime() -> None:
    assert prune_timer.value("Timer", "OnCalendar") == "daily"
    assert prune_timer.value("Timer", "Persistent") == "true"
    assert 0 < seconds(prune_timer.value("Timer", "RandomizedDelaySec")) <= 6 * 3600
    assert prune_timer.values("Timer", "Unit") in ([], [PRUNE_UNIT.name])
    assert PRUNE_TIMER.stem == PRUNE_UNIT.stem, "the timer starts the unit of its own name"
    assert prune_timer.value("Install", "WantedBy") == "timers.target"
    assert "Install" not in prune_unit.sections, "started by the timer, not at boot"


def run_prune_unit(env: dict[str, str]) -> tuple[int, str]:
    """The unit's ExecStart as systemd runs it: ${VAR} replaced from its environment."""
    line = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), prune("ExecStart"))
    result = run([ALERTD, *line.split()[1:]], env=env)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.skipif(not CONF_TOML.exists(), reason="conf/alertd.toml is not in this checkout")
def test_alertd_takes_the_prune_units_command_config_and_env_file_up_to_the_database() -> None:
    # Only a database is missing: no usage (2) or config (3) error before it.
    code, out = run_prune_unit({**unit_env(prune_unit), "ALERTD_DSN": CLOSED_PORT_DSN})
    assert code == EXIT_CRASH and "database unavailable" in out, out


@pytest.mark.parametrize("days", ["0", "", "thirty"])
def test_prune_days_that_are_not_a_number_of_at_least_1_fail_before_the_database(
        days: str) -> None:
    env = {**unit_env(prune_unit), "ALERTD_PRUNE_DAYS": days, "ALERTD_DSN": CLOSED_PORT_DSN}
    code, out = run_prune_unit(env)
    assert code == EXIT_USAGE and "--older-than" in out, out


def test_systemd_analyze_verify_reports_nothing_for_the_prune_timer_and_unit(
        tmp_path: Path) -> None:
    timer = tmp_path / PRUNE_TIMER.name
    timer.write_text(PRUNE_TIMER.read_text())
    service = runnable_copy(tmp_path, PRUNE_UNIT)
    result = run([systemd_analyze(), "verify", "--man=no", str(timer), str(service)])
    about_units = [line for line in (result.stdout + result.stderr).splitlines()
                   if PRUNE_UNIT.stem in line]
    assert result.returncode == 0 and not about_units, result.stdout + result.stderr
