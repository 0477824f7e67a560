"""Run a command under the kernel restrictions alertd.service asks systemd for.

    python tests/deploy/sandbox.py -- COMMAND [ARG...]

Reads systemd/alertd.service and applies, before exec'ing COMMAND, what
systemd itself would apply with the same kernel interfaces, without needing
systemd as PID 1:

- MemoryDenyWriteExecute=yes: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN),
  the kernel's own W^X switch (Linux >= 6.3; systemd >= 255 uses it too).
  Like systemd's filter it refuses W+X mappings and making memory executable
  later; it is kept across fork and execve.
- SystemCallFilter= and SystemCallErrorNumber=: a seccomp allow-list of the
  named groups minus the ~ groups, expanded by `systemd-analyze
  syscall-filter`, loaded with libseccomp (which systemd itself uses), other
  calls failing with the unit's errno.

Exit status 77 (with the reason on stderr) when the kernel or libseccomp
cannot do this here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.deploy.files import read_unit

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
UNAVAILABLE = 77


def syscall_groups() -> dict[str, list[str]]:
    """Every @group of this systemd, as listed by systemd-analyze (names or @groups)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                         text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif not line.strip() or not line.startswith(" "):
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= expand(groups[name], groups) if name.startswith("@") else {name}
    return found


def allowed_syscalls(filters: list[str]) -> set[str]:
    """systemd's rule: the first non-~ line makes an allow-list, ~ lines remove."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for line in filters:
        if line.startswith("~"):
            allowed -= expand(line[1:].split(), groups)
        else:
            allowed |= expand(line.split(), groups)
    return allowed


def refuse_write_execute() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        unavailable(f"prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}")


def load_seccomp(allowed: set[str], errno_name: str) -> None:
    path = ctypes.util.find_library("seccomp")
    if not path:
        unavailable("libseccomp is not installed")
    lib = ctypes.CDLL(path)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO | getattr(errno, errno_name))
    if not ctx:
        unavailable("seccomp_init failed")
    for name in sorted(allowed):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:  # names of other architectures do not resolve here
            lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0)
    if lib.seccomp_load(ctx) != 0:
        unavailable("seccomp_load failed")


def unavailable(why: str) -> None:
    print(f"sandbox: cannot apply alertd.service's restrictions here: {why}", file=sys.stderr)
    sys.exit(UNAVAILABLE)


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "--" or len(argv) < 2:
        sys.exit(__doc__)
    unit = read_unit()
    filters = unit.values("Service", "SystemCallFilter")
    errno_name = unit.value("Service", "SystemCallErrorNumber")
    allowed = allowed_syscalls(filters)  # before the filter: it runs systemd-analyze
    if unit.value("Service", "MemoryDenyWriteExecute") == "yes":
        refuse_write_execute()
    load_seccomp(allowed, errno_name)
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
