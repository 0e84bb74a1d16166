"""Packs the readable bytes of a command into le64 command words (C5)."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .interface import CommandWord
from .vq_data import DataBeat


class Realigner(wiring.Component):
    """Joins the byte runs of a command's buffers into whole le64 words, whatever byte
    boundaries the driver split them at (C5, virtio 1.2 2.7.4): a command code split 3 + 5
    over two buffers arrives as one word.

    Up to 7 bytes wait for the next beat; a command's last word is zero-padded. One word
    per clock, but for a command's end beat that leaves two words (one extra clock).

    Attributes
    ----------
    beats : In(stream.Signature(DataBeat))
    words : Out(stream.Signature(CommandWord))
    """

    beats: In(stream.Signature(DataBeat))
    words: Out(stream.Signature(CommandWord))

    def elaborate(self, platform):
        m = Module()
        beat = self.beats.payload

        held = Signal(64)               # bytes 0 .. held_count - 1, zero above
        held_count = Signal(range(8))
        flush = Signal()                # the held bytes are a command's last word

        # The beat's bytes above ``held``: 15 bytes at most.
        valid_bytes = Mux(beat.count >= 8, (1 << 64) - 1,
                          (1 << (beat.count[:3] * 8)) - 1)
        joined = Signal(128)
        total = held_count + beat.count
        m.d.comb += joined.eq(held | ((beat.data & valid_bytes) << (held_count * 8)))

        can_load = ~self.words.valid | self.words.ready
        with m.If(self.words.ready):
            m.d.sync += self.words.valid.eq(0)

        with m.If(flush):
            with m.If(can_load):
                m.d.sync += [
                    self.words.payload.data.eq(held),
                    self.words.payload.last.eq(1),
                    self.words.valid.eq(1),
                    held.eq(0),
                    held_count.eq(0),
                    flush.eq(0),
                ]
        with m.Else():
            m.d.comb += self.beats.ready.eq(can_load)
            with m.If(self.beats.valid & can_load):
                with m.If(beat.end & (total <= 8)):
                    m.d.sync += [
                        self.words.payload.data.eq(joined[:64]),
                        self.words.payload.last.eq(1),
                        self.words.valid.eq(1),
                        held.eq(0),
                        held_count.eq(0),
                    ]
                with m.Elif(total >= 8):
                    m.d.sync += [
                        self.words.payload.data.eq(joined[:64]),
                        self.words.payload.last.eq(0),
                        self.words.valid.eq(1),
                        held.eq(joined[64:]),
                        held_count.eq(total - 8),
                        flush.eq(beat.end),
                    ]
                with m.Else():
                    m.d.sync += [
                        held.eq(joined[:64]),
                        held_count.eq(total),
                    ]

        return m
