"""The descriptor-chain walker of a split virtqueue (virtio 1.2 2.7.5)."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from .... import constants as c
from ...virtio.common_cfg import QueueConfig
from ..data import Segment
from ..interface import CommandHeader
from ..park import WalkRequest
from ..read_port import ReadRequest, ReadResponse

#: A result writes at most this many bytes (``CommandResult.write_count``).
RESULT_BYTES = 16


class Descriptor(data.Struct):
    """``struct virtq_desc`` as it lies in memory (le, 16 bytes)."""
    address: 64
    length: 32
    flags: 16
    next: 16


#: Descriptors of a chain's table read ahead with its head (``DescriptorPrefetcher``): the
#: head's and the next one, all of the 1- and 2-descriptor chains a driver lays out in order.
PREFETCH_WINDOW = 2


class PrefetchedWalk(data.Struct):
    """A chain to walk with descriptors ``walk.head`` .. ``walk.head + filled - 1`` of the
    descriptor table read ahead (``filled`` 0: none, the walker reads them)."""
    walk: WalkRequest
    window: data.ArrayLayout(Descriptor, PREFETCH_WINDOW)
    filled: range(PREFETCH_WINDOW + 1)


class WritableSegment(data.Struct):
    """A piece of the first 16 device-writable bytes of a chain (all a result can write),
    in chain order; a chain's pieces add up to min(writable bytes, 16)."""
    address: 64
    length: range(RESULT_BYTES + 1)


def _saturating_add(total, length):
    """``total + length`` held at the largest value of ``total``'s width."""
    total_max = (1 << len(total)) - 1
    return Mux(total + length > total_max, total_max, total + length)


class ChainWalker(wiring.Component):
    """Follows each head's descriptor chain and describes it: its readable buffers, its
    first writable bytes and its byte totals (the command header, C5).

    Descriptors are read several at a time from the one wanted, up to the table's end:
    ``direct_window`` of the descriptor table (a short chain of consecutive descriptors,
    as a fresh ring hands them out, costs one read) and ``table_window`` of an indirect
    table (laid out in order by every driver). Each read is a round trip behind the data
    in flight, and each descriptor read costs channel beats the data could have used:
    the windows weigh one against the other. Each chain starts with the window read ahead
    with its head (``heads``: the DescriptorPrefetcher read it after the head was seen
    available); what an earlier chain left is dropped, as the driver may have rewritten
    it since. Zero-length buffers are skipped.

    An INDIRECT descriptor (only with VIRTIO_F_INDIRECT_DESC; without it the flag means
    nothing) continues the chain in its table and ends it there: INDIRECT together with
    NEXT is the driver's error (virtio 1.2 2.7.5.3.1), its NEXT and WRITE are ignored.

    The header can only follow the whole walk, and the function takes a command's words
    only after its header. So when the readable queue is full in the middle of a chain
    (a chain of more buffers than the queue holds, whose data waits for the function),
    the walker finishes the walk counting only, sends the header, and walks again from
    where it stopped to describe the rest: any chain is walked, whatever its length. For
    the same reason the header never waits for the chain's last segment to be queued.

    C7 faults, as the reference model: a head or next index outside its table (queue
    size, or table entries); more descriptors walked in a table than it has entries (a
    loop; the INDIRECT descriptor counts in the descriptor table); an indirect descriptor
    inside a table; a table length of 0 or not a multiple of 16; a failed descriptor
    read. The walker then stops, before the chain's header goes out (but for a driver
    that changes a chain under a second walk).

    Attributes
    ----------
    config : In(QueueConfig)
    indirect : In(1)
        VIRTIO_F_INDIRECT_DESC was negotiated.
    heads : In(stream.Signature(PrefetchedWalk))
        Chains to walk, with the descriptors read ahead.
    read, response :
        Descriptor reads, through the engine's ``ReadPort``.
    chains : Out(stream.Signature(CommandHeader))
        One per chain. The totals saturate at 2**32 - 1.
    readable : Out(stream.Signature(Segment))
    writable : Out(stream.Signature(WritableSegment))
    fault : Out(1)
        Pulse: a C7 fault, of kind ``fault_kind``.
    fault_kind : Out(c.RingFault)
    header_sent : Out(1)
        The current chain's header has gone out (its second walk, or its last segment
        waits to be queued).
    idle : Out(1)
        Between chains: every chain taken so far has been described.
    """

    def __init__(self, direct_window=2, table_window=4):
        self._direct_window = direct_window
        self._table_window = table_window
        super().__init__({
            "config": In(QueueConfig),
            "indirect": In(1),
            "heads": In(stream.Signature(PrefetchedWalk)),
            "read": Out(stream.Signature(ReadRequest)),
            "response": In(stream.Signature(ReadResponse)),
            "chains": Out(stream.Signature(CommandHeader)),
            "readable": Out(stream.Signature(Segment)),
            "writable": Out(stream.Signature(WritableSegment)),
            "fault": Out(1),
            "fault_kind": Out(c.RingFault),
            "header_sent": Out(1),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        size = self.config.size
        window_size = max(self._direct_window, self._table_window, PREFETCH_WINDOW)

        # The descriptors last read: entries base .. base + filled - 1 of the table.
        window = Signal(data.ArrayLayout(Descriptor, window_size))
        window_base = Signal(16)
        window_filled = Signal(range(window_size + 1))
        beat_index = Signal(range(2 * window_size))

        head = Signal(16)
        parked = Signal()
        index = Signal(16)
        in_table = Signal()
        table_address = Signal(64)
        table_entries = Signal(28)
        walked = Signal(29)                     # descriptors walked in the current table
        readable_total = Signal(32)
        writable_total = Signal(32)
        writable_covered = Signal(range(RESULT_BYTES + 1))
        held = Signal(Segment)                  # readable segment waiting for its successor
        held_valid = Signal()
        offered = Signal()                      # ... and offered on ``readable``
        counting = Signal()                     # first walk, past a full readable queue
        header_sent = self.header_sent
        # Where the second walk starts.
        resume_index = Signal.like(index)
        resume_in_table = Signal()
        resume_walked = Signal.like(walked)
        resume_covered = Signal.like(writable_covered)

        # Entries of the table walked: registered, like ``at_limit`` (``walked == limit``),
        # in "Fetch", the state every descriptor passes first; neither changes before the
        # descriptor is left.
        limit = Signal.like(table_entries)
        at_limit = Signal()
        current_limit = Mux(in_table, table_entries, size)
        table = Mux(in_table, table_address, self.config.desc)
        offset = (index - window_base)[:16]     # past the window when index < base too
        in_window = offset < window_filled
        # The descriptor being walked, taken from the window in "Fetch": the window's read
        # mux and its offset are then a clock ahead of the checks on the descriptor.
        descriptor = Signal(Descriptor)
        to_table_end = current_limit - index
        wanted = Mux(in_table, self._table_window, self._direct_window)
        window_read = Mux(to_table_end < wanted, to_table_end, wanted)
        # The window read a descriptor outside the window needs, planned in "Fetch": the
        # read (and the table prefetcher's address match on it) then starts from registers.
        window_read_command = Signal.like(self.read.payload.command)

        def fail(kind):
            m.d.comb += [self.fault.eq(1), self.fault_kind.eq(kind)]
            m.next = "Faulted"

        m.d.comb += [
            self.chains.payload.head.eq(head),
            self.chains.payload.parked.eq(parked),
            self.chains.payload.readable.eq(readable_total),
            self.chains.payload.writable.eq(writable_total),
            self.readable.valid.eq(offered),
            self.readable.payload.address.eq(held.address),
            self.readable.payload.length.eq(held.length),
        ]
        with m.If(self.readable.valid & self.readable.ready):
            m.d.sync += [held_valid.eq(0), offered.eq(0)]

        with m.FSM():
            with m.State("Idle"):
                m.d.comb += [
                    self.idle.eq(1),
                    self.heads.ready.eq(1),
                ]
                walk = self.heads.payload.walk
                with m.If(self.heads.valid):
                    m.d.sync += [
                        head.eq(walk.head),
                        parked.eq(walk.parked),
                        index.eq(walk.head),
                        walked.eq(0),
                        in_table.eq(0),
                        readable_total.eq(0),
                        writable_total.eq(0),
                        writable_covered.eq(0),
                        # The window starts with what was read ahead of the walk.
                        window.as_value()[:len(self.heads.payload.window.as_value())].eq(
                            self.heads.payload.window),
                        window_base.eq(walk.head),
                        window_filled.eq(self.heads.payload.filled),
                        counting.eq(0),
                    ]
                    with m.If(walk.head >= size):
                        fail(c.RingFault.DESC_INDEX)
                    with m.Else():
                        m.next = "Fetch"

            with m.State("Fetch"):
                m.d.sync += [
                    descriptor.eq(window[offset[:max(1, (window_size - 1).bit_length())]]),
                    limit.eq(current_limit),
                    at_limit.eq(walked == current_limit),
                    window_read_command.address.eq(table + c.VRING_DESC_SIZE * index),
                    window_read_command.length.eq(c.VRING_DESC_SIZE * window_read),
                ]
                with m.If(in_window):
                    m.next = "Descriptor"
                with m.Else():
                    m.next = "Read-Window"

            with m.State("Read-Window"):
                m.d.comb += [
                    self.read.valid.eq(1),
                    self.read.payload.command.eq(window_read_command),
                ]
                with m.If(self.read.ready):
                    m.d.sync += [
                        window_base.eq(index),
                        window_filled.eq(0),
                        beat_index.eq(0),
                    ]
                    m.next = "Receive"

            with m.State("Receive"):
                m.d.comb += self.response.ready.eq(1)
                with m.If(self.response.valid & self.response.payload.error):
                    fail(c.RingFault.DMA_READ)
                with m.Elif(self.response.valid):
                    m.d.sync += [
                        window.as_value().word_select(beat_index, 64).eq(
                            self.response.payload.data),
                        beat_index.eq(beat_index + 1),
                    ]
                    with m.If(beat_index[0]):
                        m.d.sync += window_filled.eq(window_filled + 1)
                    with m.If(self.response.payload.last):
                        m.next = "Fetch"

            with m.State("Descriptor"):
                flags = descriptor.flags
                length = descriptor.length
                looped = at_limit
                is_indirect = self.indirect & (flags & c.VRING_DESC_F_INDIRECT).any()
                is_buffer = ~looped & ~is_indirect & (length != 0)
                is_readable = is_buffer & ~(flags & c.VRING_DESC_F_WRITE).any()
                is_writable = is_buffer & (flags & c.VRING_DESC_F_WRITE).any()
                has_next = (flags & c.VRING_DESC_F_NEXT).any()
                # min(length, what the result still needs), on the few low bits of the
                # length beside a test of the rest (timing).
                result_bits = exact_log2(RESULT_BYTES)
                needed = RESULT_BYTES - writable_covered
                short = (length[result_bits:] == 0) & (length[:result_bits] < needed)
                writable_piece = Mux(short, length[:result_bits], needed)
                # The held segment goes before this one takes its place; if the queue
                # is full, the first walk goes on counting only.
                start_counting = (~counting & ~header_sent & is_readable & held_valid &
                                  offered & ~self.readable.ready)
                describe = ~counting & ~start_counting
                stall = Signal()
                with m.If(describe & is_readable & held_valid):
                    with m.If(~offered):
                        m.d.sync += offered.eq(1)
                        m.d.comb += stall.eq(1)
                    with m.Else():
                        m.d.comb += stall.eq(~self.readable.ready)
                with m.If(describe & is_writable & (writable_covered != RESULT_BYTES)):
                    m.d.comb += [
                        self.writable.valid.eq(1),
                        self.writable.payload.address.eq(descriptor.address),
                        self.writable.payload.length.eq(writable_piece),
                        stall.eq(~self.writable.ready),
                    ]

                with m.If(looped):
                    fail(c.RingFault.CHAIN_LOOP)
                with m.Elif(is_indirect):
                    with m.If(in_table):
                        fail(c.RingFault.NESTED_INDIRECT)
                    with m.Elif((length == 0) | (length[:4] != 0)):
                        fail(c.RingFault.INDIRECT_LENGTH)
                    with m.Else():
                        m.d.sync += [
                            in_table.eq(1),
                            table_address.eq(descriptor.address),
                            table_entries.eq(length[4:]),
                            index.eq(0),
                            walked.eq(0),
                            window_filled.eq(0),
                        ]
                        m.next = "Fetch"
                with m.Elif(~stall):
                    m.d.sync += walked.eq(walked + 1)
                    with m.If(start_counting):
                        m.d.sync += [
                            counting.eq(1),
                            resume_index.eq(index),
                            resume_in_table.eq(in_table),
                            resume_walked.eq(walked),
                            resume_covered.eq(writable_covered),
                        ]
                    with m.If(is_readable):
                        m.d.sync += readable_total.eq(_saturating_add(readable_total, length))
                        with m.If(describe):
                            m.d.sync += [
                                held.address.eq(descriptor.address),
                                held.length.eq(length),
                                held_valid.eq(1),
                            ]
                    with m.If(is_writable):
                        m.d.sync += writable_total.eq(_saturating_add(writable_total, length))
                        with m.If(describe):
                            m.d.sync += writable_covered.eq(writable_covered + writable_piece)
                    with m.If(~has_next):
                        m.next = "Finish"
                    with m.Elif(descriptor.next >= limit):
                        fail(c.RingFault.DESC_INDEX)
                    with m.Else():
                        m.d.sync += index.eq(descriptor.next)
                        m.next = "Fetch"

            with m.State("Finish"):
                # The header goes out alongside the last segment, not after it: the
                # readable queue may be full until the function takes words, which it
                # does only after the header.
                with m.If(~header_sent):
                    m.d.comb += self.chains.valid.eq(1)
                    with m.If(self.chains.ready):
                        m.d.sync += header_sent.eq(1)
                with m.If(counting):
                    # Then the second walk for the rest of the segments.
                    with m.If(self.chains.ready):
                        m.d.sync += [
                            index.eq(resume_index),
                            in_table.eq(resume_in_table),
                            walked.eq(resume_walked),
                            writable_covered.eq(resume_covered),
                            window_filled.eq(0),
                            counting.eq(0),
                        ]
                        m.next = "Fetch"
                with m.Else():
                    with m.If(held_valid):
                        with m.If(~offered):
                            m.d.sync += offered.eq(1)
                        m.d.comb += self.readable.payload.last.eq(1)
                    header_out = header_sent | self.chains.ready
                    segments_out = ~held_valid | self.readable.ready & offered
                    with m.If(header_out & segments_out):
                        # Out of the second walk: a fault of the next chain is ahead.
                        m.d.sync += header_sent.eq(0)
                        m.next = "Idle"

            with m.State("Faulted"):
                pass

        return m
