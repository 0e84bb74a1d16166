"""The VFIO ABI of :mod:`memballoon.vfio` against the system's ``linux/vfio.h``.

A small C program compiled with the system C compiler prints every ioctl number,
constant, structure size, field offset and field size the backend uses; each must equal
what the Python module computes (its ctypes layouts and ``_IO`` encoding).
"""

import ctypes
import shutil
import subprocess

import pytest

from memballoon import vfio

HEADER = "/usr/include/linux/vfio.h"


def _c_program():
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vfio.h>",
             "int main(void) {"]

    def emit(key, expr):
        lines.append(f'    printf("{key} %llu\\n", (unsigned long long)({expr}));')

    for name in vfio.IOCTLS:
        emit(f"ioctl.{name}", name)
    for name in vfio.CONSTANTS:
        emit(f"const.{name}", name)
    for name, cls in vfio.ABI_STRUCTS.items():
        emit(f"sizeof.{name}", f"sizeof(struct {name})")
        for field, _ in cls._fields_:
            emit(f"offsetof.{name}.{field}", f"offsetof(struct {name}, {field})")
            emit(f"fieldsize.{name}.{field}", f"sizeof(((struct {name} *)0)->{field})")
    for name, member in vfio.FLEXIBLE_MEMBERS.items():
        emit(f"offsetof.{name}.{member}", f"offsetof(struct {name}, {member})")
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


def _expected():
    values = {}
    for name, value in vfio.IOCTLS.items():
        values[f"ioctl.{name}"] = value
    for name, value in vfio.CONSTANTS.items():
        values[f"const.{name}"] = value
    for name, cls in vfio.ABI_STRUCTS.items():
        values[f"sizeof.{name}"] = ctypes.sizeof(cls)
        for field, ctype in cls._fields_:
            values[f"offsetof.{name}.{field}"] = getattr(cls, field).offset
            values[f"fieldsize.{name}.{field}"] = ctypes.sizeof(ctype)
    for name, member in vfio.FLEXIBLE_MEMBERS.items():
        values[f"offsetof.{name}.{member}"] = ctypes.sizeof(vfio.ABI_STRUCTS[name])
    return values


@pytest.fixture(scope="module")
def header_values(tmp_path_factory):
    """What the system header says, as ``{key: int}``."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "no C compiler (cc/gcc): `make setup` installs g++ and with it gcc"
    with open(HEADER):      # a missing header fails here with its path
        pass
    build = tmp_path_factory.mktemp("vfio_abi")
    source, binary = build / "vfio_abi.c", build / "vfio_abi"
    source.write_text(_c_program())
    subprocess.run([compiler, "-Wall", "-Werror", "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines())}


def test_every_number_matches_the_system_header(header_values):
    expected = _expected()
    assert header_values.keys() == expected.keys()
    assert len(vfio.IOCTLS) == 15 and len(vfio.ABI_STRUCTS) == 11
    wrong = {key: (expected[key], header_values[key]) for key in expected
             if expected[key] != header_values[key]}
    assert not wrong, f"python vs {HEADER}: {wrong}"
