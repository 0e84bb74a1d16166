"""AXI4-Lite, as a wiring signature with the AMBA signal names (seen from the master)."""

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out


class AxiLiteSignature(wiring.Signature):
    def __init__(self, addr_width, data_width=32):
        self._addr_width = addr_width
        self._data_width = data_width
        super().__init__({
            "awaddr": Out(addr_width), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_width), "wstrb": Out(data_width // 8),
            "wvalid": Out(1), "wready": In(1),
            "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "araddr": Out(addr_width), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            "rdata": In(data_width), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
        })

    def __eq__(self, other):
        return (isinstance(other, AxiLiteSignature) and
                (self._addr_width, self._data_width) == (other._addr_width, other._data_width))

    def __repr__(self):
        return f"AxiLiteSignature({self._addr_width}, {self._data_width})"
