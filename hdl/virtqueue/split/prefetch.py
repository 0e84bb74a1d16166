"""Reads the head descriptors of available chains ahead of the walk (virtio 1.2 2.7.5)."""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
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


class _Pending(data.Struct):
    """A head whose prefetch read is out: the beat of its read that completes its window
    (``done_beat``), and whether the table ends after its own descriptor (``capped``: its
    window holds one). ``first``: the first head of its read."""
    walk: WalkRequest
    done_beat: range(MAX_SPAN)
    capped: 1
    first: 1


class DescriptorPrefetcher(wiring.Component):
    """Reads the first ``PREFETCH_WINDOW`` descriptors of each head's chain with many reads
    in flight, so that the ChainWalker's per-chain round trip is gone for the chains a
    driver builds (one descriptor, or a short run in table order).

    The heads come in ring order, already seen available (after ``avail->idx`` and the
    ring entry were read), so their descriptors are the driver's: a read of them is never
    early (the ChainWalker drops its window at each new chain for that reason). Heads that
    increase within ``MAX_SPAN`` descriptors share one read of the span from the first
    head to the descriptor after the last; a head whose descriptor ends the table reads
    alone (its window holds one descriptor). A run goes out as soon as the next head does
    not join it or none waits, so nothing waits for more heads.

    A head is taken only when the walk queue has room for it, so response beats never
    wait. The table is 16-byte aligned (virtio 1.2 2.7.5): each 16-byte beat of a read is
    one descriptor. A failed read (C7) is not a fault here: its heads go to the walker
    with no descriptor (``filled`` 0), which reads them itself and finds the fault on the
    chain that has it, as without the prefetch.

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
        m.d.sync += held.eq(held + taken - handed)
        m.d.comb += self.idle.eq(held == 0)

        # --- Runs: heads that share a read ----------------------------------------------
        run_open = Signal()
        run_first = Signal(16)
        run_last = Signal(16)
        run_address = Signal(64)
        run_beats = Signal(range(MAX_SPAN + 1))
        head = self.heads.payload.head
        offset = (head - run_first)[:16]
        capped = head + 1 == size                       # its descriptor ends the table
        joins = run_open & (head > run_last) & (offset < MAX_SPAN - 1) & ~capped
        issue = self.read.valid & self.read.ready
        m.d.comb += [
            self.read.payload.command.address.eq(run_address),
            self.read.payload.command.length.eq(c.VRING_DESC_SIZE * run_beats),
            # A run goes when the next head does not join it (or none waits).
            self.read.valid.eq(run_open & ~(self.heads.valid & joins)),
            self.heads.ready.eq((~run_open | joins | issue) & (held < self._depth)),
        ]
        entry = Signal(_Pending)
        m.d.comb += [
            entry.walk.eq(self.heads.payload),
            pending.w_data.eq(entry),
            pending.w_en.eq(taken),
        ]
        with m.If(issue):
            m.d.sync += run_open.eq(0)
        with m.If(taken & joins):
            m.d.comb += [entry.done_beat.eq(offset + 1), entry.first.eq(0)]
            m.d.sync += [run_last.eq(head), run_beats.eq(offset + PREFETCH_WINDOW)]
        with m.Elif(taken):
            m.d.comb += [entry.done_beat.eq(Mux(capped, 0, 1)), entry.capped.eq(capped),
                         entry.first.eq(1)]
            m.d.sync += [
                run_open.eq(1),
                run_first.eq(head),
                run_last.eq(head),
                run_address.eq(self.config.desc + c.VRING_DESC_SIZE * head),
                run_beats.eq(Mux(capped, 1, PREFETCH_WINDOW)),
            ]

        # --- Beats: each completes the window of at most one head ------------------------
        beat = self.response.payload
        front = Signal(_Pending)
        previous = Signal(8 * c.VRING_DESC_SIZE)
        beat_index = Signal(range(MAX_SPAN))
        flushing = Signal()                     # heads of a failed read still to go
        flush_first = Signal()                  # ... from its first head on
        walk = Signal(PrefetchedWalk)
        m.d.comb += [
            front.eq(pending.r_data),
            walk.walk.eq(front.walk),
            queue.w_data.eq(walk),
        ]
        completes = pending.r_rdy & (front.done_beat == beat_index)
        with m.If(flushing):
            # The failed read's heads not yet out, one a clock; the next read's beats wait.
            with m.If(pending.r_rdy & (~front.first | flush_first)):
                m.d.comb += [queue.w_en.eq(1), pending.r_en.eq(1)]
                m.d.sync += flush_first.eq(0)
            with m.Else():
                m.d.sync += flushing.eq(0)
        with m.Elif(self.response.valid):
            m.d.comb += self.response.ready.eq(1)
            with m.If(beat.error):
                # The last beat of a failed read (none of it may have come before).
                m.d.sync += [flushing.eq(1), flush_first.eq(beat_index == 0),
                             beat_index.eq(0)]
            with m.Else():
                with m.If(completes):
                    m.d.comb += [
                        walk.window.eq(Mux(front.capped, beat.data, Cat(previous, beat.data))),
                        walk.filled.eq(Mux(front.capped, 1, PREFETCH_WINDOW)),
                        queue.w_en.eq(1),
                        pending.r_en.eq(1),
                    ]
                m.d.sync += [
                    previous.eq(beat.data),
                    beat_index.eq(Mux(beat.last, 0, beat_index + 1)),
                ]
        return m
