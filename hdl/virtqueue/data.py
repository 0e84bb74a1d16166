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

        credits = Signal(range(self._buffer_depth + 1), init=self._buffer_depth)
        in_flight = Signal(range(self._max_in_flight + 1))
        address = Signal(64)
        remaining = Signal(32)
        last_segment = Signal()
        arrived = Signal(DataBeat)
        failed = Signal()                           # a read failed: buffer nothing more

        beat_bits = (DMA_READ_BEAT_BYTES - 1).bit_length()
        # Beats of the rest of the segment, and whether they fit one read: kept in registers
        # beside ``remaining`` (a read that is not the segment's last takes max_read whole
        # beats), so that issuing does not wait for the rounding and its comparison (timing).
        remaining_beats = Signal(range((2 ** 32 + DMA_READ_BEAT_BYTES - 1) >> beat_bits))
        whole = Signal()                            # the rest of the segment fits one read
        piece_beats = Mux(whole, remaining_beats, max_read)
        piece_bytes = Mux(whole, remaining, max_read * DMA_READ_BEAT_BYTES)
        can_issue = (credits >= piece_beats) & (in_flight + piece_beats <= self._max_in_flight)
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
        m.d.sync += [
            credits.eq(credits - Mux(issue, piece_beats, 0) + take),
            in_flight.eq(in_flight + Mux(issue, piece_beats, 0) - arrive),
        ]

        with m.FSM():
            with m.State("Idle"):
                m.d.comb += self.segments.ready.eq(1)
                with m.If(self.segments.valid):
                    length = self.segments.payload.length
                    segment_beats = (length + DMA_READ_BEAT_BYTES - 1) >> beat_bits
                    m.d.sync += [
                        address.eq(self.segments.payload.address),
                        remaining.eq(length),
                        remaining_beats.eq(segment_beats),
                        whole.eq(segment_beats <= max_read),
                        last_segment.eq(self.segments.payload.last),
                    ]
                    m.next = "Issue"

            with m.State("Issue"):
                # Credits only grow and in-flight beats only shrink while waiting, so
                # ``valid`` stays up once raised.
                m.d.comb += self.read.valid.eq(can_issue)
                with m.If(issue):
                    m.d.sync += [
                        address.eq(address + piece_bytes),
                        remaining.eq(remaining - piece_bytes),
                        remaining_beats.eq(remaining_beats - piece_beats),
                        whole.eq(remaining_beats <= 2 * max_read),
                    ]
                    with m.If(whole):
                        m.next = "Idle"

        return m
