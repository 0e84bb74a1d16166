"""Parked commands of a virtqueue: kept by their head until the function wants them (C6)."""

from amaranth.hdl import Module, Mux
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out


class WalkRequest(data.Struct):
    """A chain to walk: its ``head``, and whether it is a parked command's (its header
    carries the flag, ``CommandHeader.parked``)."""
    head: 16
    parked: 1



class ParkedHeads(wiring.Component):
    """The heads of parked commands, oldest first, and the ChainWalker's input: the ring's
    fresh heads merged with the parked ones the function asks back.

    A parked command is kept by its head alone (16 bits in a memory of ``depth`` entries):
    its descriptors stay in host memory, and unparking walks its chain again, one round
    trip. So fromdevq can hold any number of buffers for later minimums (C6) without
    keeping their writable segments. A driver has no more buffers outstanding than its
    queue has descriptors, so ``depth`` = the largest queue size never fills (a park waits
    for room otherwise).

    Walk requests go out of a register (a choice, once offered, stays until taken): an
    unpark, when asked and a head is parked, goes before the next fresh head.

    Attributes
    ----------
    park : In(stream.Signature(16))
        Heads of parked commands, in command order (the UsedWriter's ``parked``).
    unpark : In(stream.Signature(0))
        The function asks for the oldest parked command again; ready while one is parked.
    fresh : In(stream.Signature(16))
        Heads from the avail ring, in ring order.
    walks : Out(stream.Signature(WalkRequest))
        To the ChainWalker; ``parked`` marks an unparked head.
    """

    def __init__(self, depth):
        self._depth = depth
        super().__init__({
            "park": In(stream.Signature(16)),
            "unpark": In(stream.Signature(0)),
            "fresh": In(stream.Signature(16)),
            "walks": Out(stream.Signature(WalkRequest)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.heads = heads = SyncFIFOBuffered(width=16, depth=self._depth)
        m.d.comb += [
            heads.w_data.eq(self.park.payload),
            heads.w_en.eq(self.park.valid),
            self.park.ready.eq(heads.w_rdy),
        ]

        load = ~self.walks.valid | self.walks.ready
        take_parked = self.unpark.valid & heads.r_rdy
        m.d.comb += [
            heads.r_en.eq(load & self.unpark.valid),
            self.unpark.ready.eq(load & heads.r_rdy),
            self.fresh.ready.eq(load & ~take_parked),
        ]
        with m.If(load):
            m.d.sync += [
                self.walks.valid.eq(take_parked | self.fresh.valid),
                self.walks.payload.head.eq(Mux(take_parked, heads.r_data, self.fresh.payload)),
                self.walks.payload.parked.eq(take_parked),
            ]
        return m
