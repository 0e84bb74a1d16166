"""A register slice for ``lib.stream``: cuts the combinational valid, payload and ready
paths between two blocks, at full throughput."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out


class StreamSlice(wiring.Component):
    """Passes every transfer from ``input`` to ``output`` one clock later, in order, one
    a clock. ``output.valid``/``payload`` and ``input.ready`` come from registers: a
    consumer's ``ready`` logic and a producer's ``valid`` logic no longer add up into one
    path (timing at 250 MHz).

    When ``output`` stalls, one transfer already accepted waits in a spare register, and
    ``input.ready`` falls in the next clock.

    Attributes
    ----------
    input : In(stream.Signature(shape))
    output : Out(stream.Signature(shape))
    """

    def __init__(self, shape):
        super().__init__({
            "input": In(stream.Signature(shape)),
            "output": Out(stream.Signature(shape)),
        })

    def elaborate(self, platform):
        m = Module()
        main = Signal.like(self.output.payload)
        main_valid = Signal()
        spare = Signal.like(self.output.payload)
        spare_valid = Signal()

        m.d.comb += [
            self.input.ready.eq(~spare_valid),
            self.output.valid.eq(main_valid),
            self.output.payload.eq(main),
        ]
        with m.If(self.output.ready | ~main_valid):
            # The main register empties: the spare moves up, else the input comes in.
            m.d.sync += [
                main.eq(Mux(spare_valid, spare, self.input.payload)),
                main_valid.eq(spare_valid | self.input.valid),
                spare_valid.eq(0),
            ]
        with m.Elif(self.input.valid & self.input.ready):
            m.d.sync += [spare.eq(self.input.payload), spare_valid.eq(1)]
        return m
