"""Halves the read beats of the engine's channel for a block that parses 8 bytes a beat."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..pcie.interface import DMA_READ_BEAT_BYTES
from .read_port import ReadResponse

#: Bytes of a narrow beat: half a DMA read beat.
NARROW_BEAT_BYTES = DMA_READ_BEAT_BYTES // 2


class ResponseNarrower(wiring.Component):
    """Cuts each ``DMA_READ_BEAT_BYTES`` read beat into two beats of ``NARROW_BEAT_BYTES``
    (one when it holds no more), for the ``ChainWalker``, which takes a descriptor in two
    8-byte beats.

    Wide beats are buffered, up to ``depth`` of them, so that a read of that many beats
    never holds the shared in-order read channel while its halves go out (``ReadPort``:
    a block that stalls stalls everyone behind it).

    Attributes
    ----------
    wide : In(stream.Signature(ReadResponse))
    narrow : Out(stream.Signature(ReadResponse))
        The same bytes, at most ``NARROW_BEAT_BYTES`` a beat in the low bits of ``data``
        (zero above); ``count`` is that of a ``DMA_READ_BEAT_BYTES`` beat cut in two, so a
        read's beats are all full but its last, as before. ``mark`` and ``error`` go with
        each half; an error beat goes out as one beat (its count means nothing).
    """

    def __init__(self, depth=4):
        self._depth = depth
        super().__init__({
            "wide": In(stream.Signature(ReadResponse)),
            "narrow": Out(stream.Signature(ReadResponse)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.buffer = buffer = SyncFIFOBuffered(
            width=ReadResponse.as_shape().size, depth=self._depth)
        m.d.comb += [
            buffer.w_data.eq(self.wide.payload),
            buffer.w_en.eq(self.wide.valid),
            self.wide.ready.eq(buffer.w_rdy),
        ]

        beat = ReadResponse(buffer.r_data)
        upper = Signal()                # the beat's upper half goes out next
        two_halves = (beat.count > NARROW_BEAT_BYTES) & ~beat.error
        final_half = upper | ~two_halves
        narrow = self.narrow.payload
        m.d.comb += [
            self.narrow.valid.eq(buffer.r_rdy),
            narrow.data.eq(Mux(upper, beat.data[8 * NARROW_BEAT_BYTES:],
                               beat.data[:8 * NARROW_BEAT_BYTES])),
            narrow.count.eq(Mux(upper, beat.count - NARROW_BEAT_BYTES,
                                Mux(two_halves, NARROW_BEAT_BYTES, beat.count))),
            narrow.last.eq(beat.last & final_half),
            narrow.error.eq(beat.error),
            narrow.mark.eq(beat.mark),
            buffer.r_en.eq(self.narrow.ready & final_half),
        ]
        with m.If(self.narrow.valid & self.narrow.ready):
            m.d.sync += upper.eq(~final_half)
        return m
