"""Reads the indirect tables of available chains ahead of the walk (virtio 1.2 2.7.5.3)."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .... import constants as c
from ...stream_slice import StreamSlice
from ..read_port import ReadRequest, ReadResponse
from .chain import PrefetchedWalk

#: Beats (descriptors) of table read ahead, at most: a table's first read, for every
#: chain held ahead (``PREFETCH_DEPTH``) with a window of 8.
TABLE_BUFFER_BEATS = 256


class _HeldWalk(data.Struct):
    """A walk on its way to the walker, and where its table's first read lands in the
    buffer (``beats`` 0: none was read ahead)."""
    walk: PrefetchedWalk
    start: 16
    beats: range(1 << 4)


class _Incoming(data.Struct):
    """A walk come in, with whether its table is read ahead and how many beats of it,
    decided before its register (timing: the DescriptorPrefetcher's queue output, and
    its ready, no longer run through the decision)."""
    walk: PrefetchedWalk
    ahead: 1
    table_beats: range(1 << 4)


class TablePrefetcher(wiring.Component):
    """Reads the start of each indirect table ahead of the ChainWalker, so that a chain
    behind an indirect descriptor (Linux puts every chain of more than one buffer there)
    costs no round trip of its own.

    A walk whose read-ahead head descriptor (``DescriptorPrefetcher``) is INDIRECT, with
    VIRTIO_F_INDIRECT_DESC negotiated and a table length the walker accepts (a non-zero
    multiple of 16), has the read the walker would make first issued when the walk comes
    in (a clock after, through a register slice): ``table_window`` descriptors from the
    table's start, or the whole table if it is shorter. The table was written before the head was made available, so the read is
    never early. Its beats are kept in a buffer (a read is issued only with room for all
    of its beats, so beats never wait) and the walk goes on once they are in.

    The walker's reads pass through here: the first one of a walk that asks for exactly
    the read made ahead (address and length) is answered from the buffer, beat for beat
    what the DMA engine returned (a failed read included: the walker sees the C7 fault
    where it would have). Any other read goes to the ``ReadPort``. A table the walker does
    not read (the chain faulted first, a reset) is dropped when the next walk goes on.

    Attributes
    ----------
    indirect : In(1)
        VIRTIO_F_INDIRECT_DESC was negotiated.
    size : In(16)
        The queue size: a head at or past it is never read ahead (the walker faults it).
    walks_in : In(stream.Signature(PrefetchedWalk))
    walks_out : Out(stream.Signature(PrefetchedWalk))
        In the order of ``walks_in``.
    read, response :
        Table reads, through the engine's ``ReadPort``.
    walker_read, walker_response :
        The ChainWalker's descriptor reads.
    forward_read, forward_response :
        Those not answered here, through the engine's ``ReadPort``.
    idle : Out(1)
        No walk is held.
    """

    def __init__(self, table_window, depth):
        if not 1 <= table_window < (1 << 4):
            raise ValueError(f"table_window must be 1..15, not {table_window}")
        self._table_window = table_window
        self._depth = depth
        super().__init__({
            "indirect": In(1),
            "size": In(16),
            "walks_in": In(stream.Signature(PrefetchedWalk)),
            "walks_out": Out(stream.Signature(PrefetchedWalk)),
            "read": Out(stream.Signature(ReadRequest)),
            "response": In(stream.Signature(ReadResponse)),
            "walker_read": In(stream.Signature(ReadRequest)),
            "walker_response": Out(stream.Signature(ReadResponse)),
            "forward_read": Out(stream.Signature(ReadRequest)),
            "forward_response": In(stream.Signature(ReadResponse)),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        depth = TABLE_BUFFER_BEATS
        pointer = range(2 * depth)
        m.submodules.walks = walks = SyncFIFOBuffered(width=_HeldWalk.as_shape().size,
                                                      depth=self._depth)
        serving = Signal()                      # the walker's table read is answered here
        m.submodules.buffer = buffer = Memory(shape=ReadResponse, depth=depth, init=[])
        buffer_write = buffer.write_port()
        buffer_read = buffer.read_port()

        # --- Walks in: the table's first read issued on the way --------------------------
        walk_in = self.walks_in.payload
        head_descriptor = walk_in.window[0]
        entries = head_descriptor.length[4:]
        m.submodules.incoming = incoming = StreamSlice(_Incoming)
        m.d.comb += [
            incoming.input.payload.walk.eq(walk_in),
            incoming.input.payload.ahead.eq(
                self.indirect & (walk_in.filled != 0) & (walk_in.walk.head < self.size) &
                (head_descriptor.flags & c.VRING_DESC_F_INDIRECT).any() &
                (head_descriptor.length[:4] == 0) & (entries != 0)),
            incoming.input.payload.table_beats.eq(
                Mux(entries < self._table_window, entries, self._table_window)),
            incoming.input.valid.eq(self.walks_in.valid),
            self.walks_in.ready.eq(incoming.input.ready),
        ]
        walk = incoming.output.payload.walk
        ahead = incoming.output.payload.ahead
        table_beats = incoming.output.payload.table_beats
        reserved = Signal(pointer)              # buffer beats reserved by reads issued
        released = Signal(pointer)              # ... no longer needed
        room = (reserved - released)[:len(reserved)] + table_beats <= depth
        held = Signal(_HeldWalk)
        m.d.comb += [
            held.walk.eq(walk),
            held.start.eq(reserved),
            held.beats.eq(Mux(ahead, table_beats, 0)),
            walks.w_data.eq(held),
            self.read.valid.eq(incoming.output.valid & ahead & walks.w_rdy & room),
            self.read.payload.command.address.eq(walk.window[0].address),
            self.read.payload.command.length.eq(c.VRING_DESC_SIZE * table_beats),
            incoming.output.ready.eq(walks.w_rdy & (~ahead | room & self.read.ready)),
            walks.w_en.eq(incoming.output.valid & incoming.output.ready),
        ]
        with m.If(self.read.valid & self.read.ready):
            m.d.sync += reserved.eq(reserved + table_beats)

        # --- Beats in, in the order of the reads, each read in its own room --------------
        m.submodules.read_beats = read_beats = SyncFIFO(width=len(held.beats),
                                                        depth=self._depth)
        m.d.comb += [
            read_beats.w_data.eq(table_beats),
            read_beats.w_en.eq(self.read.valid & self.read.ready),
        ]
        arriving_at = Signal(pointer)           # the room of the read arriving
        beat_index = Signal.like(held.beats)
        reads_in = Signal(range(self._depth + 1))   # reads complete, their walk not out
        m.d.comb += [
            self.response.ready.eq(1),
            buffer_write.addr.eq(arriving_at + beat_index),
            buffer_write.data.eq(self.response.payload),
            buffer_write.en.eq(self.response.valid),
            read_beats.r_en.eq(self.response.valid & self.response.payload.last),
        ]
        with m.If(self.response.valid):
            m.d.sync += beat_index.eq(beat_index + 1)
            # A failed read ends early, with its error beat: the next read's room follows
            # the whole of this one's.
            with m.If(self.response.payload.last):
                m.d.sync += [arriving_at.eq(arriving_at + read_beats.r_data),
                             beat_index.eq(0)]

        # --- Walks out once their table is in --------------------------------------------
        front = Signal(_HeldWalk)
        m.d.comb += front.eq(walks.r_data)
        front_ahead = front.beats != 0
        m.d.comb += [
            self.walks_out.payload.eq(front.walk),
            self.walks_out.valid.eq(walks.r_rdy & (~front_ahead | (reads_in != 0))),
            walks.r_en.eq(self.walks_out.ready & self.walks_out.valid),
            self.idle.eq((walks.level == 0) & ~serving & ~incoming.output.valid),
        ]
        out = self.walks_out.valid & self.walks_out.ready
        read_done = self.response.valid & self.response.payload.last
        m.d.sync += reads_in.eq(reads_in + read_done - (out & front_ahead))

        # The walk out is the one the walker walks next: its table is the one to answer.
        table_valid = Signal()
        table_address = Signal(64)
        table_start = Signal.like(front.start)
        table_beats_held = Signal.like(front.beats)
        table_end = Signal(pointer)
        with m.If(out):
            m.d.sync += [
                table_valid.eq(front_ahead),
                table_address.eq(front.walk.window[0].address),
                table_start.eq(front.start),
                table_beats_held.eq(front.beats),
                # What walks before it read is no longer needed.
                released.eq(Mux(front_ahead, front.start, table_end)),
            ]
            with m.If(front_ahead):
                m.d.sync += table_end.eq(front.start + front.beats)

        # --- The walker's reads: its table's first from the buffer, the rest forwarded ---
        request = self.walker_read.payload.command
        matches = (table_valid & (request.address == table_address) &
                   (request.length == c.VRING_DESC_SIZE * table_beats_held))
        serve_at = Signal(pointer)
        serve_left = Signal.like(front.beats)
        m.d.comb += [
            self.forward_read.payload.eq(self.walker_read.payload),
            self.forward_read.valid.eq(self.walker_read.valid & ~matches & ~serving),
            self.walker_read.ready.eq(~serving & (matches | self.forward_read.ready)),
        ]
        with m.If(self.walker_read.valid & self.walker_read.ready & matches):
            m.d.sync += [
                serving.eq(1),
                serve_at.eq(table_start),
                serve_left.eq(table_beats_held),
                table_valid.eq(0),
            ]

        # Beats from the buffer: the read port's register is the output stage, held (en
        # low) while the walker's narrower stalls.
        served_valid = Signal()
        served = Signal(ReadResponse)
        m.d.comb += served.eq(buffer_read.data)
        advance = serving & (serve_left != 0) & (~served_valid | self.walker_response.ready)
        m.d.comb += [
            buffer_read.addr.eq(serve_at),
            buffer_read.en.eq(advance | ~served_valid),
        ]
        with m.If(advance):
            m.d.sync += [served_valid.eq(1), serve_at.eq(serve_at + 1),
                         serve_left.eq(serve_left - 1)]
        with m.Elif(served_valid & self.walker_response.ready):
            m.d.sync += served_valid.eq(0)
        with m.If(served_valid & self.walker_response.ready & served.last):
            m.d.sync += [serving.eq(0), served_valid.eq(0), serve_left.eq(0)]

        with m.If(served_valid):
            m.d.comb += [
                self.walker_response.payload.eq(served),
                self.walker_response.valid.eq(1),
            ]
        with m.Else():
            m.d.comb += [
                self.walker_response.payload.eq(self.forward_response.payload),
                self.walker_response.valid.eq(self.forward_response.valid),
            ]
        m.d.comb += self.forward_response.ready.eq(~served_valid & self.walker_response.ready)
        return m
