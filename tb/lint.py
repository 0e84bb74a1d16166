"""``make lint``: Verilator ``--lint-only -Wall`` on the generated top level, both widths."""

import pathlib
import subprocess
import sys

from ..params import DeviceParams
from ..hdl.top import TOP_NAME, write_verilog
from .tools import verilator_bin_dir

BUILD = pathlib.Path("build/lint")


def lint(width):
    path = write_verilog(DeviceParams(data_width=width), BUILD / str(width))
    command = [str(verilator_bin_dir() / "verilator"), "--lint-only", "-Wall",
               "--top-module", TOP_NAME, str(path)]
    result = subprocess.run(command, capture_output=True, text=True)
    print(f"{width}-bit: {'clean' if result.returncode == 0 else 'FAILED'} ({path})")
    if result.returncode:
        print(result.stdout + result.stderr)
    return result.returncode == 0


def main():
    ok = all([lint(512), lint(256)])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
