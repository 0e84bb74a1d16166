"""AMD Alveo U250 (XCU250-FIGD2104-2L-E): PCIe Gen3 x16 on the PCIE4 block X1Y2.

Pins are from the card's user guide (UG1289) master constraints: the x16 edge connector
on GTY quads 224..227 (lane 0 on quad 227 channel 3, lane 15 on quad 224 channel 0), the
100 MHz PCIe reference clock on MGTREFCLK0 of quad 226, PERST# on BD21 (1.2 V bank), user
LEDs on BC21/BB21/BA20. Timing and false paths are in ``constraints/alveo_u250.xdc``;
the PCIE4 block and quad are :attr:`AlveoU250Platform.pcie_location`.
"""

from amaranth.build import Attrs, DiffPairs, Pins, Resource, Subsignal
from amaranth.vendor import XilinxPlatform

from .pcie_ip import PcieLocation

# Lane 0 .. 15.
_RX_P = "AF2 AG4 AH2 AJ4 AK2 AL4 AM2 AN4 AP2 AR4 AT2 AU4 AV2 AW4 BA2 BC2"
_RX_N = "AF1 AG3 AH1 AJ3 AK1 AL3 AM1 AN3 AP1 AR3 AT1 AU3 AV1 AW3 BA1 BC1"
_TX_P = "AF7 AG9 AH7 AJ9 AK7 AL9 AM7 AN9 AP7 AR9 AT7 AU9 AV7 BB5 BD5 BF5"
_TX_N = "AF6 AG8 AH6 AJ8 AK6 AL8 AM6 AN8 AP6 AR8 AT6 AU8 AV6 BB4 BD4 BF4"
_LEDS = "BC21 BB21 BA20"


class AlveoU250Platform(XilinxPlatform):
    """The Alveo U250 as the device's target card (README "FPGA build")."""
    device = "xcu250"
    package = "figd2104"
    speed = "2L-e"
    default_clk = None          # everything runs on the hard IP's user_clk
    pcie_location = PcieLocation(block="X1Y2", quad="GTY_Quad_227")
    #: The checked-in constraints for this card, beside the pin constraints Amaranth writes.
    constraints = "alveo_u250.xdc"
    resources = [
        # The edge connector, and its lanes 0..7 for a Gen3 x8 (256-bit) build.
        *[Resource(f"pcie_x{lanes}", 0,
                   *[Subsignal(name, Pins(" ".join(pins.split()[:lanes]), dir=direction))
                     for name, pins, direction in (("rx_p", _RX_P, "i"), ("rx_n", _RX_N, "i"),
                                                   ("tx_p", _TX_P, "o"),
                                                   ("tx_n", _TX_N, "o"))])
          for lanes in (16, 8)],
        Resource("pcie_refclk", 0, DiffPairs("AM11", "AM10", dir="i")),
        Resource("pcie_perst_n", 0, Pins("BD21", dir="i"),
                 Attrs(IOSTANDARD="LVCMOS12", PULLUP="TRUE")),
        *[Resource("led", i, Pins(pin, dir="o"),
                   Attrs(IOSTANDARD="LVCMOS12", SLEW="SLOW", DRIVE="8"))
          for i, pin in enumerate(_LEDS.split())],
    ]
    connectors = []
