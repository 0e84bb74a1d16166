"""``make lint``: Verilator ``--lint-only -Wall`` on the generated top level, both widths.

Amaranth's hierarchy passes whole interfaces into every submodule, so module-by-module
lint drowns in "unused member" noise. The design is therefore flattened by Yosys (the same
RTLIL Amaranth writes for ``write_verilog``), unused wires are purged, and the flat netlist
is linted with ``-Wall`` and the documented waivers in ``tb/lint.vlt``.
"""

import pathlib
import subprocess
import sys

from amaranth._toolchain.yosys import find_yosys
from amaranth.back import rtlil

from ..hdl.top import TOP_NAME, MemballoonUsp
from ..params import DeviceParams
from .tools import verilator_bin_dir

BUILD = pathlib.Path("build/lint")
WAIVERS = pathlib.Path(__file__).with_name("lint.vlt")


def flat_verilog(params):
    text = rtlil.convert(MemballoonUsp(params), name=TOP_NAME, emit_src=False)
    yosys = find_yosys(lambda version: version >= (0, 40))
    script = "\n".join([f"read_rtlil <<rtlil\n{text}\nrtlil", "proc", "flatten",
                        "opt_clean -purge", "write_verilog -norename"])
    return yosys.run(["-q", "-"], script, ignore_warnings=True)


def lint(width):
    path = BUILD / str(width) / f"{TOP_NAME}.v"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(flat_verilog(DeviceParams(data_width=width)))
    command = [str(verilator_bin_dir() / "verilator"), "--lint-only", "-Wall",
               "--top-module", TOP_NAME, str(WAIVERS), str(path)]
    result = subprocess.run(command, capture_output=True, text=True)
    print(f"{width}-bit: {'clean' if result.returncode == 0 else 'FINDINGS'} ({path})")
    if result.returncode:
        print(result.stdout + result.stderr)
    return result.returncode == 0


def main():
    results = [lint(512), lint(256)]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
