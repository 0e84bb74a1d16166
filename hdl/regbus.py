"""A small register bus between the PCIe completer and the function's registers.

Why not AXI4-Lite inside: every access here is one dword with byte strobes, read side
effects (ISR read-clear) need read strobes, and a fixed one-cycle read latency keeps the
completer simple.

Protocol (dword addresses):
- The master holds ``addr``, ``w_data``, ``w_strb``/``r_strb`` and raises ``w_stb`` or
  ``r_stb`` (never both). The access happens on the clock edge where the strobe and
  ``ready`` are high.
- For an accepted read, ``r_data`` is valid during the cycle after that edge.
- Slaves are always ready; only an arbiter in front of shared slaves deasserts ``ready``.
"""

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out


class RegBusSignature(wiring.Signature):
    """Seen from the master."""
    def __init__(self, addr_width):
        self._addr_width = addr_width
        super().__init__({
            "addr": Out(addr_width),
            "r_stb": Out(1),
            "r_strb": Out(4),
            "w_stb": Out(1),
            "w_strb": Out(4),
            "w_data": Out(32),
            "r_data": In(32),
            "ready": In(1),
        })

    @property
    def addr_width(self):
        return self._addr_width

    def __eq__(self, other):
        return isinstance(other, RegBusSignature) and self.addr_width == other.addr_width

    def __repr__(self):
        return f"RegBusSignature({self.addr_width})"
