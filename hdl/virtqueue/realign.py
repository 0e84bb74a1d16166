"""Packs the readable bytes of a command into le64 command words, two a beat (C5)."""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .data import DataBeat
from .interface import COMMAND_LANES, CommandWords

WORD_BYTES = 8
#: Bytes of a beat of command words.
LANE_BYTES = COMMAND_LANES * WORD_BYTES


class Realigner(wiring.Component):
    """Joins the byte runs of a command's buffers into whole le64 words, whatever byte
    boundaries the driver split them at (C5, virtio 1.2 2.7.4): a command code split 3 + 5
    over two buffers arrives as one word.

    As ``CommandWords`` says, the first beat of a command carries its first word (the
    command code) alone, every later beat ``COMMAND_LANES`` words but the last. Bytes
    short of a beat (up to 15) wait for the next data beat, so full data beats keep one
    beat of words a clock at any residue; a command's last word is zero-padded. A data
    beat that ends a command with more than a beat of words left costs one extra clock.
    A data beat with ``error`` becomes a word beat with ``error`` and ``last`` (C7): the
    command's held bytes are dropped.

    Attributes
    ----------
    beats : In(stream.Signature(DataBeat))
    words : Out(stream.Signature(CommandWords))
    """

    beats: In(stream.Signature(DataBeat))
    words: Out(stream.Signature(CommandWords))

    def elaborate(self, platform):
        m = Module()
        beat = self.beats.payload
        data_bytes = len(beat.data) // 8
        # Fewer than a beat of words' bytes wait, as long as a data beat is no wider.
        assert data_bytes <= LANE_BYTES
        held_bytes = LANE_BYTES - 1

        held = Signal(8 * held_bytes)   # bytes 0 .. held_count - 1, zero above
        held_count = Signal(range(held_bytes + 1))
        first = Signal(init=1)          # the next word is a command's first: it goes alone
        flush = Signal()                # the held bytes are a command's last words

        # The beat's bytes above ``held``; what is above ``count`` may be anything.
        valid_bytes = Cat((beat.count > index).replicate(8) for index in range(data_bytes))
        joined = Signal(8 * (held_bytes + data_bytes))
        total = held_count + beat.count
        # Bytes that make the next beat of words.
        need = Mux(first, WORD_BYTES, LANE_BYTES)
        m.d.comb += joined.eq(held | ((beat.data & valid_bytes) << (held_count * 8)))

        words = self.words.payload
        can_load = ~self.words.valid | self.words.ready
        with m.If(self.words.ready):
            m.d.sync += self.words.valid.eq(0)

        def send(value, count, last, error=0):
            m.d.sync += [
                words.data.eq(value),
                words.count.eq(count),
                words.last.eq(last),
                words.error.eq(error),
                self.words.valid.eq(1),
            ]

        def words_of(byte_count):
            return (byte_count + WORD_BYTES - 1) >> (WORD_BYTES - 1).bit_length()

        with m.If(flush):
            with m.If(can_load):
                send(held, words_of(held_count), last=1)
                m.d.sync += [
                    held.eq(0),
                    held_count.eq(0),
                    flush.eq(0),
                    first.eq(1),
                ]
        with m.Else():
            m.d.comb += self.beats.ready.eq(can_load)
            with m.If(self.beats.valid & can_load):
                with m.If(beat.error):
                    send(0, 0, last=1, error=1)
                    m.d.sync += [
                        held.eq(0),
                        held_count.eq(0),
                        first.eq(1),
                    ]
                with m.Elif(beat.end & (total <= need)):
                    send(joined[:8 * LANE_BYTES], words_of(total), last=1)
                    m.d.sync += [
                        held.eq(0),
                        held_count.eq(0),
                        first.eq(1),
                    ]
                with m.Elif(total >= need):
                    send(Mux(first, joined[:8 * WORD_BYTES], joined[:8 * LANE_BYTES]),
                         Mux(first, 1, COMMAND_LANES), last=0)
                    m.d.sync += [
                        held.eq(Mux(first, joined[8 * WORD_BYTES:], joined[8 * LANE_BYTES:])),
                        held_count.eq(total - need),
                        flush.eq(beat.end),
                        first.eq(0),
                    ]
                with m.Else():
                    m.d.sync += [
                        held.eq(joined),
                        held_count.eq(total),
                    ]

        return m
