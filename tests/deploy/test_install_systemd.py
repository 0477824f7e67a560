"""scripts/install-systemd: --dry-run changes nothing; a real run into a prefix converges.

Nothing here touches the machine's own /opt, /etc or systemd: every run
either is --dry-run or installs into a temporary --prefix, where enabling
only creates the symlink inside the prefix (systemctl --root).
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.files import (
    ENV_EXAMPLE,
    INSTALL,
    PRUNE_TIMER,
    PRUNE_UNIT,
    UNIT,
    read_unit,
    run,
    tool,
)

UNIT_DIR = "etc/systemd/system"
UNITS = (UNIT, PRUNE_UNIT, PRUNE_TIMER)


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return run(["bash", str(INSTALL), *args], timeout=600)


def tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every path under root with its mode and content (or link target)."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            found[str(path)] = (info.st_mode, os.readlink(path))
        elif path.is_file() and "/opt/alertd/" not in str(path):
            found[str(path)] = (info.st_mode, path.read_bytes())
        else:
            found[str(path)] = (info.st_mode, b"")
    return found


def actions(output: str, verb: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(verb)]


def test_dry_run_into_a_prefix_changes_nothing_and_plans_the_same_twice(tmp_path: Path) -> None:
    first = install("--dry-run", "--prefix", str(tmp_path))
    second = install("--dry-run", "--prefix", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert list(tmp_path.iterdir()) == []
    planned = "\n".join(actions(first.stdout, "would"))
    for step in ("create virtualenv", "pip install", "alertd.service", "alertd-prune.service",
                 "alertd-prune.timer", "alertd.env", "enable alertd.service"):
        assert step in planned
    assert "enable alertd-prune.timer" not in planned  # retention is opt-in
    assert not actions(first.stdout, "doing")


def test_dry_run_on_this_machine_changes_nothing() -> None:
    watched = [Path("/opt/alertd"), *(Path("/", UNIT_DIR, u.name) for u in UNITS)]
    before = [p.exists() for p in watched]
    result = install("--dry-run")
    assert result.returncode == 0, result.stderr
    assert not actions(result.stdout, "doing")
    assert [p.exists() for p in watched] == before


def test_an_unknown_option_is_a_usage_error() -> None:
    assert install("--frobnicate").returncode == 2


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One real install into a prefix (a venv and pip install: about a minute)."""
    if tool("systemctl") is None:
        pytest.skip("systemctl is not installed: enabling cannot be staged")
    root = tmp_path_factory.mktemp("root")
    result = install("--prefix", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    yield root, result.stdout


def test_install_into_a_prefix_lays_out_every_file(staged: tuple[Path, str]) -> None:
    root, _ = staged
    for source in UNITS:
        installed = root / UNIT_DIR / source.name
        assert installed.read_text() == source.read_text()
        assert stat.S_IMODE(installed.stat().st_mode) == 0o644
    env_file = root / "etc/alertd/alertd.env"
    assert env_file.read_text() == ENV_EXAMPLE.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    wants = root / UNIT_DIR / "multi-user.target.wants/alertd.service"
    assert os.readlink(wants) == "/etc/systemd/system/alertd.service"
    assert os.readlink(root / "usr/local/bin/alertd") == "/opt/alertd/bin/alertd"
    version = run([str(root / "opt/alertd/bin/alertd"), "--version"])
    assert version.returncode == 0 and "alertd" in version.stdout
    installed = run([str(root / "opt/alertd/bin/pip"), "list", "--format=freeze"]).stdout
    assert "pytest" not in installed and "ruff" not in installed, "no test tools"


def test_install_lays_out_the_prune_units_but_leaves_retention_off(
        staged: tuple[Path, str]) -> None:
    # Retention deletes results: an install or an upgrade never turns it on.
    root, _ = staged
    assert (root / UNIT_DIR / PRUNE_TIMER.name).is_file()
    assert not (root / UNIT_DIR / "timers.target.wants/alertd-prune.timer").exists()
    enabled = run(["systemctl", f"--root={root}", "is-enabled", PRUNE_TIMER.name,
                   PRUNE_UNIT.name])
    assert enabled.stdout.split() == ["disabled", "static"], enabled.stdout + enabled.stderr


def test_a_reinstall_keeps_retention_on_once_the_operator_turned_it_on(
        staged: tuple[Path, str]) -> None:
    root, _ = staged
    on = run(["systemctl", f"--root={root}", "--quiet", "enable", PRUNE_TIMER.name])
    assert on.returncode == 0, on.stderr
    again = install("--prefix", str(root))
    assert again.returncode == 0, again.stderr
    enabled = run(["systemctl", f"--root={root}", "is-enabled", PRUNE_TIMER.name])
    assert enabled.stdout.split() == ["enabled"], enabled.stdout + enabled.stderr
    run(["systemctl", f"--root={root}", "--quiet", "disable", PRUNE_TIMER.name])


def test_a_second_install_finds_everything_in_place(staged: tuple[Path, str]) -> None:
    root, _ = staged
    before = tree(root)
    again = install("--prefix", str(root))
    assert again.returncode == 0, again.stderr
    assert not actions(again.stdout, "doing"), again.stdout
    assert tree(root) == before


def test_reinstall_keeps_the_operators_env_file_and_restores_the_units(
        staged: tuple[Path, str]) -> None:
    root, _ = staged
    env_file = root / "etc/alertd/alertd.env"
    units = {root / UNIT_DIR / source.name: source for source in UNITS}
    env_file.write_text("ALERTD_DSN=postgresql://alertd:s3cret@db/alertd\n")
    env_file.chmod(0o644)
    for unit in units:
        unit.write_text("# edited by hand\n")
    again = install("--prefix", str(root))
    assert again.returncode == 0, again.stderr
    assert env_file.read_text() == "ALERTD_DSN=postgresql://alertd:s3cret@db/alertd\n"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    for unit, source in units.items():
        assert unit.read_text() == source.read_text()


def test_the_staged_units_pass_systemd_analyze_verify(
        staged: tuple[Path, str], tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the staged units were not verified")
    root, _ = staged
    alertd = str(root / "opt/alertd/bin/alertd")
    names = [u.name for u in UNITS]
    copies = []
    for name in names:
        copy = tmp_path / name
        staged_text = (root / UNIT_DIR / name).read_text()
        copy.write_text(staged_text.replace("/opt/alertd/bin/alertd", alertd))
        copies.append(str(copy))
    for service in (UNIT.name, PRUNE_UNIT.name):
        assert read_unit(tmp_path / service).value("Service", "ExecStart").startswith(alertd)
    result = run([analyze, "verify", "--man=no", *copies])
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not any(name in output for name in names), output
