"""The FPGA top level: PCIE4 hard IP, JTAG-to-AXI master and the device core.

``memballoon_usp`` (``memballoon.hdl.top``, written by its ``write_verilog``) is
instantiated as a black box, as are the two Vivado IPs; this module only wires them as
:func:`.pcie_ip.core_connections` says and adds the board's clock and reset buffers:

- PCIe reference clock: ``IBUFDS_GTE4``; ``O`` feeds the GTs (``sys_clk_gt``), ``ODIV2``
  through a ``BUFG_GT`` is the IP's ``sys_clk`` (PG213 "Clocking").
- PERST#: straight from its input buffer to ``sys_reset`` (active low, as the IP wants).
- LEDs: link up, and user reset released.
"""

import re

from amaranth.hdl import Const, Elaboratable, Instance, Module, Signal
from amaranth.lib import io

from ...params import DeviceParams
from ..top import TOP_NAME
from .pcie_ip import (JTAG_AXI_MODULE, LANES, PCIE_INSTANCE, PCIE_MODULE, PCIE_TIED_INPUTS,
                      core_connections, jtag_axi_port_widths, pcie_port_widths)


def verilog_ports(text, module):
    """``{port: (is_input, width)}`` of ``module`` in Verilog ``text`` as Amaranth writes
    it (one ``input [msb:0] name;`` declaration per port)."""
    body = re.search(rf"^module {re.escape(module)}\(.*?^endmodule", text, re.S | re.M)
    if body is None:
        raise ValueError(f"no module {module} in the Verilog")
    return {name: (direction == "input", int(msb) + 1 if msb else 1)
            for direction, msb, name in re.findall(
                r"^\s*(input|output)\s+(?:\[(\d+):0\]\s+)?(\w+);", body.group(0), re.M)}


class BoardTop(Elaboratable):
    """Board top for a platform with resources ``pcie_x16`` and ``pcie_x8`` (``rx_p``,
    ``rx_n``, ``tx_p``, ``tx_n``: the lanes of a 512- and a 256-bit build),
    ``pcie_refclk``, ``pcie_perst_n`` and ``led`` 0..1, around the core whose ports are
    ``core_ports`` (:func:`verilog_ports` of ``write_verilog``'s output)."""

    def __init__(self, params: DeviceParams, core_ports):
        self._params = params
        self._core_ports = core_ports

    def elaborate(self, platform):
        m = Module()
        params = self._params
        pcie_widths = pcie_port_widths(params.data_width)
        jtag_widths = jtag_axi_port_widths()

        # One net per IP port that the core uses, named after the IP port.
        pcie_nets = {name: Signal(width, name=f"pcie_{name}")
                     for name, width in pcie_widths.items()
                     if name not in PCIE_TIED_INPUTS and not name.startswith("pci_exp_")}
        jtag_nets = {name: Signal(width, name=f"jtag_{name}")
                     for name, width in jtag_widths.items()}
        nets = {"pcie": pcie_nets, "jtag_axi": jtag_nets}

        # Each IP port's direction is the opposite of the core port it meets.
        ip_ports = {"pcie": {"o_user_lnk_up": pcie_nets["user_lnk_up"],
                             "i_sys_clk": pcie_nets["sys_clk"],
                             "i_sys_clk_gt": pcie_nets["sys_clk_gt"],
                             "i_sys_reset": pcie_nets["sys_reset"]},
                    "jtag_axi": {"i_aclk": jtag_nets["aclk"],
                                 "i_aresetn": jtag_nets["aresetn"]}}
        connections = core_connections()
        if set(connections) != set(self._core_ports):
            raise ValueError(f"{TOP_NAME} ports and the board wiring differ: "
                             f"{sorted(set(connections) ^ set(self._core_ports))}")
        core_ports = {}
        for name, connection in connections.items():
            core_input, width = self._core_ports[name]
            if connection.ip is None:
                value = Const(connection.constant, width)
            else:
                net = nets[connection.ip][connection.port]
                value = net[:width]
                ip_ports[connection.ip][("o_" if core_input else "i_") + connection.port] = net
            core_ports[("i_" if core_input else "o_") + name] = value
        m.submodules.core = Instance(TOP_NAME, **core_ports)

        lanes = LANES[params.data_width]
        pcie = platform.request(f"pcie_x{lanes}", 0, dir={"rx_p": "-", "rx_n": "-",
                                                          "tx_p": "-", "tx_n": "-"})
        refclk = platform.request("pcie_refclk", 0, dir="-")
        m.submodules.perst_buf = perst_n = io.Buffer(
            "i", platform.request("pcie_perst_n", 0, dir="-"))
        refclk_odiv2 = Signal()
        m.submodules.refclk_buf = Instance(
            "IBUFDS_GTE4", i_I=refclk.p, i_IB=refclk.n, i_CEB=Const(0, 1),
            o_O=pcie_nets["sys_clk_gt"], o_ODIV2=refclk_odiv2)
        m.submodules.sys_clk_buf = Instance(
            "BUFG_GT", i_I=refclk_odiv2, i_CE=Const(1, 1), i_CEMASK=Const(0, 1),
            i_CLR=Const(0, 1), i_CLRMASK=Const(0, 1), i_DIV=Const(0, 3),
            o_O=pcie_nets["sys_clk"])
        m.d.comb += pcie_nets["sys_reset"].eq(perst_n.i)

        pcie_ports = ip_ports["pcie"]
        pcie_ports.update({"i_" + name: Const(value, width)
                           for name, (width, value) in PCIE_TIED_INPUTS.items()})
        pcie_ports.update(i_pci_exp_rxp=pcie.rx_p.io, i_pci_exp_rxn=pcie.rx_n.io,
                          o_pci_exp_txp=pcie.tx_p.io, o_pci_exp_txn=pcie.tx_n.io)
        m.submodules[PCIE_INSTANCE] = Instance(PCIE_MODULE, **pcie_ports)

        m.d.comb += [jtag_nets["aclk"].eq(pcie_nets["user_clk"]),
                     jtag_nets["aresetn"].eq(~pcie_nets["user_reset"])]
        m.submodules.mgmt_jtag = Instance(JTAG_AXI_MODULE, **ip_ports["jtag_axi"])

        for i, status in enumerate([pcie_nets["user_lnk_up"], ~pcie_nets["user_reset"]]):
            m.submodules[f"led_buf_{i}"] = led = io.Buffer(
                "o", platform.request("led", i, dir="-"))
            m.d.comb += led.o.eq(status)
        return m
