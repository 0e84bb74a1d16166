"""Reads the device-readable bytes of commands into a buffer (C5)."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..pcie.interface import DMA_READ_BEAT_BYTES
from .read_port import ReadRequest, ReadResponse


class Segment(data.Struct):
    """A device-readable buffer of a chain, in chain order; ``last`` marks the chain's
    final one."""
    address: 64
    length: 32
    last: 1


class DataBeat(data.Struct):
    """``count`` (1..``DMA_READ_BEAT_BYTES``) readable bytes of a command (byte 0 = bits
    7..0), as read from one buffer; ``end`` marks the command's last beat. A beat with
    ``error`` stands for a read that failed (C7): nothing valid follows it."""
    data: 8 * DMA_READ_BEAT_BYTES
    count: range(DMA_READ_BEAT_BYTES + 1)
    end: 1
    error: 1


class DataFetcher(wiring.Component):
    """Issues the reads of readable segments and buffers their beats.

    A read is issued only when the buffer has room for all of its beats, so the beats
    never wait on the command's consumer and the in-order read channel keeps flowing for
    the other blocks (chain walk, ring reads). Reads are at most ``max_read`` beats, and
    at most ``max_in_flight`` beats are requested but not yet arrived: a descriptor read
    of the next chain waits behind no more than that, so the walk keeps ahead of the data
    (enough in flight to cover the read latency is what sustains one beat, two command
    words, per clock). Credits and reads count ``DMA_READ_BEAT_BYTES`` beats. A segment
    is read in pieces that are whole beats but for its last one, so only a segment's
    final beat is partial.

    A failed read (C7) puts one ``error`` beat in the buffer where its data would have
    been, and nothing after it: the commands whose data is all before it still execute
    (and are published before the queue stops), the one it belongs to never completes.

    Attributes
    ----------
    segments : In(stream.Signature(Segment))
    read, response :
        Data reads, through the engine's ``ReadPort``.
    beats : Out(stream.Signature(DataBeat))
    """

    def __init__(self, buffer_depth=512, max_in_flight=128, max_read=32):
        if not max_read <= min(max_in_flight, buffer_depth):
            raise ValueError("a read of max_read beats must fit in flight and in the buffer")
        self._buffer_depth = buffer_depth
        self._max_in_flight = max_in_flight
        self._max_read = max_read
        super().__init__({
            "segments": In(stream.Signature(Segment)),
            "read": Out(stream.Signature(ReadRequest)),
            "response": In(stream.Signature(ReadResponse)),
            "beats": Out(stream.Signature(DataBeat)),
        })

    def elaborate(self, platform):
        m = Module()
        max_read = self._max_read
        m.submodules.buffer = buffer = SyncFIFOBuffered(width=DataBeat.as_shape().size,
                                                        depth=self._buffer_depth)
        m.d.comb += [
            self.beats.payload.eq(buffer.r_data),
            self.beats.valid.eq(buffer.r_rdy),
            buffer.r_en.eq(self.beats.ready),
        ]

        max_bytes = max_read * DMA_READ_BEAT_BYTES
        # Free buffer beats, and beats that may still be requested before ``max_in_flight``
        # are on their way: a read is issued only when its beats fit both.
        credits = Signal(range(self._buffer_depth + 1), init=self._buffer_depth)
        flight_room = Signal(range(self._max_in_flight + 1), init=self._max_in_flight)
        address = Signal(64)
        remaining = Signal(32)
        last_segment = Signal()
        arrived = Signal(DataBeat)
        failed = Signal()                           # a read failed: buffer nothing more

        beat_bits = (DMA_READ_BEAT_BYTES - 1).bit_length()
        # The next read is planned in registers when the segment is taken and at each
        # issue: its beats and bytes, and whether it is the segment's last (``whole``).
        # A read that is not the last takes max_read whole beats, so the plan needs only
        # constant subtractions and comparisons of ``remaining``, and issuing compares
        # registered figures only (timing).
        remaining_beats = Signal(range((2 ** 32 + DMA_READ_BEAT_BYTES - 1) >> beat_bits))
        whole = Signal()
        piece_beats = Signal(range(max_read + 1))
        piece_bytes = Signal(range(max_bytes + 1))
        can_issue = (credits >= piece_beats) & (flight_room >= piece_beats)
        issue = self.read.valid & self.read.ready
        arrive = self.response.valid & self.response.ready
        take = self.beats.valid & self.beats.ready

        m.d.comb += [
            self.read.payload.command.address.eq(address),
            self.read.payload.command.length.eq(piece_bytes),
            self.read.payload.mark.eq(last_segment & whole),
            self.response.ready.eq(1),
            arrived.data.eq(self.response.payload.data),
            arrived.count.eq(self.response.payload.count),
            arrived.end.eq(self.response.payload.mark & self.response.payload.last),
            arrived.error.eq(self.response.payload.error),
            # Credits cover every beat of a read, so the error beat always has room.
            buffer.w_en.eq(self.response.valid & ~failed),
            buffer.w_data.eq(arrived),
        ]
        with m.If(arrive & self.response.payload.error):
            m.d.sync += failed.eq(1)
        # Both outcomes are computed beside each other and ``issue`` picks one, so the
        # decision is not followed by a carry chain (timing).
        m.d.sync += [
            credits.eq(Mux(issue, credits - piece_beats + take, credits + take)),
            flight_room.eq(Mux(issue, flight_room - piece_beats + arrive,
                               flight_room + arrive)),
        ]

        def plan(rest_bytes, rest_beats):
            """Registers the read that starts ``rest_bytes`` (``rest_beats``) before the
            segment's end."""
            fits = rest_bytes <= max_bytes
            return [
                remaining.eq(rest_bytes),
                remaining_beats.eq(rest_beats),
                whole.eq(fits),
                piece_beats.eq(Mux(fits, rest_beats, max_read)),
                piece_bytes.eq(Mux(fits, rest_bytes, max_bytes)),
            ]

        with m.FSM():
            with m.State("Idle"):
                m.d.comb += self.segments.ready.eq(1)
                with m.If(self.segments.valid):
                    length = self.segments.payload.length
                    m.d.sync += [
                        address.eq(self.segments.payload.address),
                        last_segment.eq(self.segments.payload.last),
                        *plan(length, (length + DMA_READ_BEAT_BYTES - 1) >> beat_bits),
                    ]
                    m.next = "Issue"

            with m.State("Issue"):
                # Credits only grow and the room in flight only grows while waiting, so
                # ``valid`` stays up once raised.
                m.d.comb += self.read.valid.eq(can_issue)
                with m.If(issue):
                    m.d.sync += address.eq(address + piece_bytes)
                    with m.If(whole):
                        m.next = "Idle"
                    with m.Else():
                        m.d.sync += plan(remaining - max_bytes, remaining_beats - max_read)

        return m
