"""Shares one register bus between several masters."""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .regbus import RegBusSignature


class RegBusArbiter(wiring.Component):
    """Fixed priority: requester 0 wins. Every access is a single accepted cycle, so a
    grant never needs to be held; losers see ``ready`` low and keep their request up.
    ``r_data`` goes to every requester (only the one whose read was accepted looks)."""

    def __init__(self, addr_width, count):
        self._count = count
        super().__init__({
            "requesters": In(RegBusSignature(addr_width)).array(count),
            "bus": Out(RegBusSignature(addr_width)),
        })

    def elaborate(self, platform):
        m = Module()
        busy = Signal()             # a higher-priority requester has the bus this cycle
        for index, requester in enumerate(self.requesters):
            wants = requester.r_stb | requester.w_stb
            m.d.comb += [
                requester.r_data.eq(self.bus.r_data),
                requester.ready.eq(~busy & self.bus.ready),
            ]
            # The lowest-priority requester's address and data are on the bus whenever no
            # other requester wants it, so its own strobes gate nothing but the strobes:
            # they do not reach the address decode (timing).
            with m.If(~busy if index == self._count - 1 else ~busy & wants):
                m.d.comb += [
                    self.bus.addr.eq(requester.addr),
                    self.bus.r_stb.eq(requester.r_stb),
                    self.bus.r_strb.eq(requester.r_strb),
                    self.bus.w_stb.eq(requester.w_stb),
                    self.bus.w_strb.eq(requester.w_strb),
                    self.bus.w_data.eq(requester.w_data),
                ]
            next_busy = Signal()
            m.d.comb += next_busy.eq(busy | wants)
            busy = next_busy
        return m
