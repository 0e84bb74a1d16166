"""``make bitstream BOARD=<board>``: write the Vivado build tree, then run Vivado.

The tree (``build/bitstream-<board>/`` by default) holds everything Vivado needs:

- ``memballoon_<board>.tcl``: the project script (Amaranth's Vivado flow: read sources,
  create the IPs, synthesize, place, route, write the bitstream);
- ``memballoon_<board>.v``: the board top (:class:`.board_top.BoardTop`), and
  ``memballoon_usp.v``: the device core from ``memballoon.hdl.top.write_verilog``;
- ``pcie4_uscale_plus_0.tcl`` and ``jtag_axi_0.tcl``: the IPs with the settings derived
  from the device parameters (:mod:`.pcie_ip`), ``post_synth.tcl``: the capability
  next-pointer and the user-clock check;
- ``memballoon_<board>.xdc`` (pins, from the platform) and the card's checked-in XDC;
- ``build_memballoon_<board>.sh``: runs Vivado on the above.

Without Vivado on ``PATH`` the command stops after writing the tree and exits with
status 2, unless ``--no-vivado`` asks for the tree only.
"""

import argparse
import pathlib
import shutil
import sys

from ...params import DeviceParams
from ..top import TOP_NAME, write_verilog
from . import BOARDS
from .board_top import BoardTop, verilog_ports
from .pcie_ip import (JTAG_AXI_IP, JTAG_AXI_MODULE, PCIE_IP, PCIE_MODULE, ip_tcl,
                      jtag_axi_config, pcie_ip_config, post_synth_tcl)

#: Checked-in constraints, one file per card.
CONSTRAINTS_DIR = pathlib.Path(__file__).resolve().parents[2] / "constraints"
#: Exit status when the tree was written but Vivado could not run.
EXIT_NO_VIVADO = 2


def design_name(board):
    return f"memballoon_{board}"


def write_tree(board, params: DeviceParams, directory):
    """Write the Vivado build tree for ``board`` into ``directory``; return the plan."""
    directory = pathlib.Path(directory)
    platform = BOARDS[board]()
    core = write_verilog(params, directory)
    platform.add_file(core.name, core.read_text())
    platform.add_file(platform.constraints,
                      (CONSTRAINTS_DIR / platform.constraints).read_text())
    platform.add_file(f"{PCIE_MODULE}.tcl",
                      ip_tcl(PCIE_IP, PCIE_MODULE,
                             pcie_ip_config(params, platform.pcie_location)))
    platform.add_file(f"{JTAG_AXI_MODULE}.tcl",
                      ip_tcl(JTAG_AXI_IP, JTAG_AXI_MODULE, jtag_axi_config()))
    platform.add_file("post_synth.tcl", post_synth_tcl(params))
    top = BoardTop(params, verilog_ports(core.read_text(), TOP_NAME))
    plan = platform.build(
        top, name=design_name(board), build_dir=str(directory), do_build=False,
        script_after_read=f"source {PCIE_MODULE}.tcl\nsource {JTAG_AXI_MODULE}.tcl",
        script_after_synth="source post_synth.tcl")
    plan.extract(str(directory))
    return plan


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the Vivado build tree for a board and run Vivado on it.")
    parser.add_argument("--board", choices=sorted(BOARDS), default="alveo_u250")
    parser.add_argument("--width", type=int, choices=(256, 512), default=512,
                        help="AXI-stream width: 512 = Gen3 x16, 256 = Gen3 x8")
    parser.add_argument("-o", "--output", help="build tree (default: build/bitstream-BOARD)")
    parser.add_argument("--no-vivado", action="store_true",
                        help="only write the build tree; exit 0 without running Vivado")
    args = parser.parse_args(argv)
    directory = pathlib.Path(args.output or f"build/bitstream-{args.board}")
    plan = write_tree(args.board, DeviceParams(data_width=args.width), directory)
    script = f"build_{design_name(args.board)}.sh"
    print(f"build tree for {args.board} ({TOP_NAME} at {args.width} bits): {directory}/")
    if args.no_vivado:
        print("--no-vivado: Vivado not run")
        return 0
    if shutil.which("vivado") is None:
        print(f"error: vivado is not on PATH; the build tree is written. On a machine with "
              f"Vivado run `sh {script}` in {directory}/, or pass --no-vivado "
              f"(NO_VIVADO=1) to only write the tree.", file=sys.stderr)
        return EXIT_NO_VIVADO
    plan.execute_local(str(directory))
    print(f"bitstream: {directory / design_name(args.board)}.bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
