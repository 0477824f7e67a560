"""MemoryDenyWriteExecute=yes holds for every library ffprobe and the venv load.

Under it the loader cannot make a stack executable (PT_GNU_STACK with PF_X)
nor re-protect text it had to relocate (DT_TEXTREL): a library needing
either fails to load, so none of them may. JIT compilers are the other
case: FFmpeg, CPython 3.11 and these extensions have none (test_sandbox.py
runs them under the restriction).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.files import tool

PT_DYNAMIC, PT_GNU_STACK, PF_X = 2, 0x6474E551, 1
DT_TEXTREL, DT_FLAGS, DF_TEXTREL = 22, 30, 4


def needs_write_execute(path: Path) -> str | None:
    """Why this 64-bit little-endian ELF file needs W+X memory, or None."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, p_flags, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == PT_GNU_STACK and p_flags & PF_X:
            return "executable stack"
        if p_type == PT_DYNAMIC:
            for j in range(0, p_filesz, 16):
                tag, value = struct.unpack_from("<qQ", data, p_offset + j)
                if tag == DT_TEXTREL or (tag == DT_FLAGS and value & DF_TEXTREL):
                    return "text relocations"
    return None


def ffprobe_libraries() -> list[Path]:
    ffprobe = tool("ffprobe")
    if ffprobe is None:
        pytest.fail("ffprobe is not installed (Debian package ffmpeg)")
    out = subprocess.run(["ldd", ffprobe], capture_output=True, text=True, check=True).stdout
    return [Path(ffprobe)] + [Path(parts[2]) for line in out.splitlines()
                              if len(parts := line.split()) > 2 and parts[1] == "=>"
                              and parts[2].startswith("/")]


def venv_extensions() -> list[Path]:
    return [p for p in Path(sys.prefix).rglob("*.so*") if p.is_file()]


def test_no_library_needs_writable_executable_memory() -> None:
    if sys.byteorder != "little" or sys.maxsize < 2**32:
        pytest.skip("this check reads 64-bit little-endian ELF only")
    files = ffprobe_libraries() + venv_extensions()
    assert len(files) > 50
    offenders = {str(p): why for p in files if (why := needs_write_execute(p))}
    assert offenders == {}


def test_the_check_flags_a_library_with_an_executable_stack(tmp_path: Path) -> None:
    gcc = tool("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the check's own control case was not built")
    source = tmp_path / "f.c"
    source.write_text("int f(void) { return 1; }\n")
    for name, extra in (("plain.so", []), ("execstack.so", ["-Wl,-z,execstack"])):
        subprocess.run([gcc, "-shared", "-fPIC", *extra, "-o", str(tmp_path / name),
                        str(source)], check=True, capture_output=True)
    assert needs_write_execute(tmp_path / "plain.so") is None
    assert needs_write_execute(tmp_path / "execstack.so") == "executable stack"
