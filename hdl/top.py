"""Top level for the Xilinx UltraScale+ PCIE4 block, exported to Verilog.

Ports carry the flat names a design next to the hard IP uses (``s_axis_cq_tdata``,
``cfg_ext_read_received``, ...; user-logic perspective as in Corundum), so Vivado wiring
and cocotbext-pcie connect by name. The management port is ``s_axil_mgmt_*``.
"""

import argparse
import pathlib

from amaranth.back import verilog
from amaranth.hdl import ClockDomain, ClockSignal, Module, ResetSignal
from amaranth.lib import wiring
from amaranth.lib.wiring import In

from ..params import DeviceParams
from .device import MemballoonDevice
from .pcie.usp_shim import UspShim

TOP_NAME = "memballoon_usp"
MGMT_PREFIX = "s_axil_mgmt_"
_NEUTRAL_SIDE = ("completer", "requester", "cfg_ext", "msix", "intx", "status")


class MemballoonUsp(wiring.Component):
    """Shim + device, clocked by the hard IP's ``user_clk`` and reset by ``user_reset``."""

    def __init__(self, params: DeviceParams):
        self._params = params
        self._shim = UspShim(params.data_width)
        self._device = MemballoonDevice(params)
        hard_ip_ports = {name: member for name, member in self._shim.signature.members.items()
                         if member.is_port}
        # The device's view of its AXI4-Lite slave port, which is the top level's view too.
        mgmt_ports = {MGMT_PREFIX + name: member
                      for name, member in self._device.signature.members["mgmt"]
                                                  .signature.members.items()}
        super().__init__({"user_clk": In(1), "user_reset": In(1),
                          **hard_ip_ports, **mgmt_ports})

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = ClockDomain()
        m.d.comb += [ClockSignal().eq(self.user_clk), ResetSignal().eq(self.user_reset)]
        m.submodules.shim = shim = self._shim
        m.submodules.device = device = self._device

        for name in _NEUTRAL_SIDE:
            wiring.connect(m, getattr(shim, name), getattr(device, name))
        for name, member in self.signature.members.items():
            if name.startswith(MGMT_PREFIX):
                inner, outer = getattr(device.mgmt, name[len(MGMT_PREFIX):]), getattr(self, name)
            elif name in shim.signature.members:
                inner, outer = getattr(shim, name), getattr(self, name)
            else:
                continue
            if member.flow == In:
                m.d.comb += inner.eq(outer)
            else:
                m.d.comb += outer.eq(inner)
        return m


def write_verilog(params: DeviceParams, directory) -> pathlib.Path:
    """Write ``memballoon_usp.v`` for ``params`` into ``directory`` and return its path."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{TOP_NAME}.v"
    text = verilog.convert(MemballoonUsp(params), name=TOP_NAME, emit_src=False)
    path.write_text(text)
    return path


def main():
    parser = argparse.ArgumentParser(description="Export the memballoon top level to Verilog.")
    parser.add_argument("--width", type=int, choices=(256, 512), default=512,
                        help="AXI-stream data width of the hard IP interface")
    parser.add_argument("-o", "--output", default="build/verilog",
                        help="output directory (default: build/verilog)")
    args = parser.parse_args()
    print(write_verilog(DeviceParams(data_width=args.width), args.output))


if __name__ == "__main__":
    main()
