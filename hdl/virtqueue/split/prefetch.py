"""Reads the head descriptors of available chains ahead of the walk (virtio 1.2 2.7.5)."""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .... import constants as c
from ...virtio.common_cfg import QueueConfig
from ..park import WalkRequest
from ..read_port import ReadRequest, ReadResponse
from .chain import PREFETCH_WINDOW, PrefetchedWalk

#: Descriptors one prefetch read spans at most: the heads of up to this many 1-descriptor
#: chains (or half as many 2-descriptor chains laid out in order) cost one read.
MAX_SPAN = 8
#: Chains whose descriptors are read ahead of the ChainWalker, at most: enough to cover a
#: round trip of 1000 ns at a command every 8 clocks.
PREFETCH_DEPTH = 32
#: Reads whose beats are held until their heads are handed on, at most: while one read's
#: heads go out (a clock each), the beats of the next ones keep arriving.
READ_BANKS = 4


class _Pending(data.Struct):
    """A head whose prefetch read is out: its distance from the first head of its read
    (``offset``), and whether the table ends after its own descriptor (``capped``: its
    window holds one)."""
    walk: WalkRequest
    offset: range(MAX_SPAN)
    capped: 1


class _Read(data.Struct):
    """A prefetch read out: its ``heads``, whether they go down the table (``down``: the
    read starts at the last head's descriptor, ``top`` descriptors below the first's)."""
    heads: range(1, MAX_SPAN + 1)
    down: 1
    top: range(MAX_SPAN)


class DescriptorPrefetcher(wiring.Component):
    """Reads the first ``PREFETCH_WINDOW`` descriptors of each head's chain with many reads
    in flight, so that the ChainWalker's per-chain round trip is gone for the chains a
    driver builds (one descriptor, or a short run in table order).

    The heads come in ring order, already seen available (after ``avail->idx`` and the
    ring entry were read), so their descriptors are the driver's: a read of them is never
    early (the ChainWalker drops its window at each new chain for that reason). Heads that
    go one way within ``MAX_SPAN`` descriptors share one read of the span: up the table
    (a fresh ring: 0, 1, 2, ...) from the first head to the descriptor after the last,
    or down it (Linux's free list after buffers come back, last freed first: ..., 2, 1,
    0) from the last head to the descriptor after the first. A head whose descriptor ends
    the table joins only a run going down from it (its window holds one descriptor). A
    run goes out as soon as the next head does not join it or none waits, so nothing
    waits for more heads.

    A read's beats are kept (one of ``READ_BANKS`` banks, a beat and the one before it
    per entry) until its last one is in; then its heads go to the walker in their order,
    one a clock, each with the two beats of its window. A head is taken only when the
    walk queue has room for it, so response beats wait only while every bank still holds
    heads to hand on. The table is 16-byte aligned (virtio 1.2 2.7.5): each 16-byte beat
    of a read is one descriptor. A failed read (C7) is not a fault here: its heads go to
    the walker with no descriptor (``filled`` 0), which reads them itself and finds the
    fault on the chain that has it, as without the prefetch.

    Attributes
    ----------
    config : In(QueueConfig)
    heads : In(stream.Signature(WalkRequest))
    read, response :
        Descriptor reads, through the engine's ``ReadPort``.
    walks : Out(stream.Signature(PrefetchedWalk))
        In the order of ``heads``.
    idle : Out(1)
        No head is held (in a run, in flight or queued for the walker).
    """

    def __init__(self, depth=PREFETCH_DEPTH):
        self._depth = depth
        super().__init__({
            "config": In(QueueConfig),
            "heads": In(stream.Signature(WalkRequest)),
            "read": Out(stream.Signature(ReadRequest)),
            "response": In(stream.Signature(ReadResponse)),
            "walks": Out(stream.Signature(PrefetchedWalk)),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        size = self.config.size
        m.submodules.pending = pending = SyncFIFOBuffered(
            width=_Pending.as_shape().size, depth=self._depth)
        m.submodules.reads = reads = SyncFIFOBuffered(
            width=_Read.as_shape().size, depth=self._depth)
        m.submodules.queue = queue = SyncFIFOBuffered(
            width=PrefetchedWalk.as_shape().size, depth=self._depth)
        m.d.comb += [
            self.walks.payload.eq(queue.r_data),
            self.walks.valid.eq(queue.r_rdy),
            queue.r_en.eq(self.walks.ready),
        ]

        # Heads taken and not yet handed to the walker: the queue's credits.
        held = Signal(range(self._depth + 1))
        taken = self.heads.valid & self.heads.ready
        handed = self.walks.valid & self.walks.ready
        # Both outcomes side by side, ``taken`` picks (timing).
        m.d.sync += held.eq(Mux(taken, held + 1 - handed, held - handed))
        m.d.comb += self.idle.eq(held == 0)

        # --- Runs: heads that share a read ----------------------------------------------
        run_open = Signal()
        run_up = Signal()                   # a second head joined going up
        run_down = Signal()                 # ... going down
        run_first = Signal(16)
        run_last = Signal(16)
        run_first_capped = Signal()
        run_heads = Signal(range(1, MAX_SPAN + 1))
        run_top = Signal(range(MAX_SPAN))   # the last head's offset
        run_address = Signal(64)
        run_beats = Signal(range(MAX_SPAN + 1))
        # The heads a run may take, kept as bounds set when it opens, so that whether a
        # head joins is comparisons of registers side by side (timing): going up, below
        # ``up_end`` (offset < MAX_SPAN - 1); going down, above ``down_end`` (offset below
        # the first head < MAX_SPAN - 1, or MAX_SPAN when its descriptor ends the table).
        up_end = Signal(17)
        down_end = Signal(signed(18))
        # size - 1: a head there ends the table (registered: the size is set before the
        # queue is enabled, virtio 1.2 4.1.4.3.2).
        last_entry = Signal(16)
        m.d.sync += last_entry.eq(size - 1)
        head = self.heads.payload.head
        above = (head - run_first)[:16]
        below = (run_first - head)[:16]
        capped = head == last_entry                     # its descriptor ends the table
        joins_up = (run_open & ~run_down & ~run_first_capped & (head > run_last) &
                    (head < up_end) & ~capped)
        # Going down, the span ends at the first head's window: one more beat unless capped.
        joins_down = run_open & ~run_up & (head < run_last) & (head > down_end)
        joins = joins_up | joins_down
        issue = self.read.valid & self.read.ready
        read_entry = Signal(_Read)
        m.d.comb += [
            self.read.payload.command.address.eq(run_address),
            self.read.payload.command.length.eq(c.VRING_DESC_SIZE * run_beats),
            # A run goes when the next head does not join it (or none waits).
            self.read.valid.eq(run_open & ~(self.heads.valid & joins)),
            self.heads.ready.eq((~run_open | joins | issue) & (held < self._depth)),
            read_entry.heads.eq(run_heads),
            read_entry.down.eq(run_down),
            read_entry.top.eq(run_top),
            reads.w_data.eq(read_entry),
            reads.w_en.eq(issue),
        ]
        entry = Signal(_Pending)
        m.d.comb += [
            entry.walk.eq(self.heads.payload),
            pending.w_data.eq(entry),
            pending.w_en.eq(taken),
        ]
        with m.If(issue):
            m.d.sync += run_open.eq(0)
        with m.If(taken & joins_up):
            m.d.comb += entry.offset.eq(above)
            m.d.sync += [run_up.eq(1), run_last.eq(head), run_heads.eq(run_heads + 1),
                         run_top.eq(above), run_beats.eq(above + PREFETCH_WINDOW)]
        with m.Elif(taken & joins_down):
            m.d.comb += entry.offset.eq(below)
            m.d.sync += [
                run_down.eq(1), run_last.eq(head), run_heads.eq(run_heads + 1),
                run_top.eq(below),
                run_address.eq(self.config.desc + c.VRING_DESC_SIZE * head),
                run_beats.eq(below + Mux(run_first_capped, 1, PREFETCH_WINDOW)),
            ]
        with m.Elif(taken):
            m.d.comb += entry.capped.eq(capped)
            m.d.sync += [
                run_open.eq(1),
                run_up.eq(0),
                run_down.eq(0),
                run_first.eq(head),
                run_last.eq(head),
                run_first_capped.eq(capped),
                up_end.eq(head + MAX_SPAN - 1),
                down_end.eq(head - Mux(capped, MAX_SPAN, MAX_SPAN - 1)),
                run_heads.eq(1),
                run_top.eq(0),
                run_address.eq(self.config.desc + c.VRING_DESC_SIZE * head),
                run_beats.eq(Mux(capped, 1, PREFETCH_WINDOW)),
            ]

        # --- Beats: kept per read, entry j = beats j - 1 and j ---------------------------
        beat_bits = (MAX_SPAN - 1).bit_length()
        bank_bits = (READ_BANKS - 1).bit_length()
        m.submodules.beats = beats = Memory(shape=2 * 8 * c.VRING_DESC_SIZE,
                                            depth=READ_BANKS * MAX_SPAN, init=[])
        beat_write = beats.write_port()
        beat_read = beats.read_port()
        full = Signal(READ_BANKS)               # a bank holds a read whose heads wait
        failed = Signal(READ_BANKS)             # ... of a read that failed
        write_bank = Signal(bank_bits)
        beat_index = Signal(beat_bits)
        previous = Signal(8 * c.VRING_DESC_SIZE)
        beat = self.response.payload
        arrive = self.response.valid & self.response.ready
        m.d.comb += [
            self.response.ready.eq(~full.bit_select(write_bank, 1)),
            beat_write.addr.eq(Cat(beat_index, write_bank)),
            beat_write.data.eq(Cat(previous, beat.data)),
            beat_write.en.eq(arrive),
        ]
        read_done = Signal(READ_BANKS)
        read_failed = Signal(READ_BANKS)
        with m.If(arrive):
            m.d.sync += previous.eq(beat.data)
            with m.If(beat.last):
                # A failed read ends with its error beat (none of it may have come before).
                m.d.comb += [read_done.eq(1 << write_bank),
                             read_failed.eq(Mux(beat.error, 1 << write_bank, 0))]
                m.d.sync += [write_bank.eq(write_bank + 1), beat_index.eq(0)]
            with m.Else():
                m.d.sync += beat_index.eq(beat_index + 1)

        # --- Heads: a clock each once their read is in; the window a clock later ---------
        handed_bank = Signal(bank_bits)
        handed_heads = Signal(range(MAX_SPAN))
        front = Signal(_Pending)
        read = Signal(_Read)
        m.d.comb += [front.eq(pending.r_data), read.eq(reads.r_data)]
        ready = full.bit_select(handed_bank, 1)
        hand = reads.r_rdy & pending.r_rdy & ready
        position = Mux(read.down, read.top - front.offset, front.offset)[:beat_bits]
        read_last = handed_heads + 1 == read.heads
        read_emptied = Signal(READ_BANKS)
        m.d.comb += [
            pending.r_en.eq(hand),
            reads.r_en.eq(hand & read_last),
            beat_read.addr.eq(Cat((position + ~front.capped)[:beat_bits], handed_bank)),
        ]
        with m.If(hand):
            m.d.sync += handed_heads.eq(Mux(read_last, 0, handed_heads + 1))
            with m.If(read_last):
                m.d.comb += read_emptied.eq(1 << handed_bank)
                m.d.sync += handed_bank.eq(handed_bank + 1)
        m.d.sync += [
            full.eq(full & ~read_emptied | read_done),
            failed.eq(failed & ~read_emptied | read_failed),
        ]

        out = Signal(_Pending)
        out_valid = Signal()
        out_failed = Signal()
        m.d.sync += [
            out.eq(front),
            out_valid.eq(hand),
            out_failed.eq(failed.bit_select(handed_bank, 1)),
        ]
        window = beat_read.data
        walk = Signal(PrefetchedWalk)
        m.d.comb += [
            walk.walk.eq(out.walk),
            walk.window.eq(Mux(out.capped, window[8 * c.VRING_DESC_SIZE:], window)),
            walk.filled.eq(Mux(out_failed, 0, Mux(out.capped, 1, PREFETCH_WINDOW))),
            queue.w_data.eq(walk),
            queue.w_en.eq(out_valid),
        ]
        return m
