"""The balloon core: bitmap, todevq executor, fromdevq sender and the host-side state."""

from amaranth.hdl import Cat, Module, Mux, ResetInserter, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from memballoon import constants as c

from ..virtqueue.interface import CommandSignature
from ..virtqueue.split.engine import USED_BATCH
from .bitmap import READ_LATENCY, Bitmap
from .committed import JOURNAL_DEPTH, MAX_UNCOMMITTED, CommittedBitmap
from .executor import CommandEffects, CommandExecutor, OpTag
from .fromdevq import MinBalloonSender
from .interface import BalloonCounters, BalloonHostSignature


class BalloonCore(wiring.Component):
    """Everything the memballoon function does with its two queues (C5, C6, C8, C9, C10).

    The tracked window is ``pages`` pages of the negotiated size from ``window_base``
    (C8); the bitmap holds one bit per page. What a reset (C9) does here: the bitmap is
    cleared with the extra range set again (``busy`` until done), ``balloon_pages``
    returns to 0, the command in progress and the pending minimum are dropped. What it
    leaves: the counters (host statistics outlive a driver instance), the return budget
    and the extra range (host settings; the range is refilled, not forgotten).

    C7, commands are atomic: the executor changes the working bitmap as a command's words
    arrive, and its :class:`.executor.CommandEffects` wait in a queue until the todevq
    engine reports the command's used element published (``commit``); only then do the
    counters, ``balloon_pages`` and the budget change, and the bitmap's committed copy
    (:class:`.committed.CommittedBitmap`) take its writes. A todevq ring fault
    (``abort``) drops every uncommitted command: once the writes the engine still had
    outstanding are done, the executor is reset and the committed copy is written back.

    Host settings (C10): a budget write replaces the budget; each committed GET spends
    its grants (never below 0, not at all when all-ones), and a GET decides on the budget
    less the grants of the GETs not committed yet. An extra-range commit is clipped to
    the window and becomes the range in force once no command is in progress or
    uncommitted (the executor waits for it); its pages become host-owned by a fill,
    without counting in ``balloon_pages``. Pages of the range that were already in the
    balloon stay in it and stay counted; bits set by an earlier range are left as they
    are, so the host declares only memory the driver does not use.

    Attributes
    ----------
    todevq, fromdevq : In(CommandSignature()), In(CommandSignature(parking=True))
        The virtqueue engines' commands: queue 1 and queue 0 (C2); fromdevq's engine
        parks the buffers held for a minimum (C6).
    page_shift : In(6)
        log2 of the negotiated page size (C4); fixed until reset.
    extra_mem : In(1)
        VIRTIO_MEMBALLOON_F_EXTRA_MEM was negotiated.
    reset : In(1)
        Pulse: virtio reset or FLR (``CommonCfg.reset_request``).
    busy : Out(1)
        The bitmap is being cleared, filled or restored: ``CommonCfg.reset_busy``.
    commit : In(range(USED_BATCH + 1))
        todevq commands published this clock (``VirtqueueEngine.committed``).
    abort : In(1)
        Pulse: a todevq ring fault; what is not committed is undone (C7).
    todevq_busy : In(1)
        The todevq engine still has DMA outstanding (a commit may still come).
    host : In(BalloonHostSignature())
        To the management port.
    """

    def __init__(self, pages=2 ** 20, grant_limit=512, journal_depth=JOURNAL_DEPTH):
        self._pages = pages
        self._grant_limit = grant_limit
        self._journal_depth = journal_depth
        super().__init__({
            "todevq": In(CommandSignature()),
            "fromdevq": In(CommandSignature(parking=True)),
            "page_shift": In(6),
            "extra_mem": In(1),
            "reset": In(1),
            "busy": Out(1),
            "commit": In(range(USED_BATCH + 1)),
            "abort": In(1),
            "todevq_busy": In(1),
            "host": In(BalloonHostSignature()),
        })

    def elaborate(self, platform):
        m = Module()
        pages = self._pages
        page_bits = pages.bit_length() - 1
        host = self.host

        # --- C7: commits and the abort --------------------------------------------------------
        to_commit = Signal(range(MAX_UNCOMMITTED + USED_BATCH + 1))
        abort_pending = Signal()
        undo = Signal()                     # pulse: drop what is uncommitted
        reset_late = Signal()               # the reset, a clock longer (for the copy)
        m.d.sync += reset_late.eq(self.reset)

        m.submodules.bitmap = bitmap = Bitmap(pages, OpTag)
        m.submodules.committed = committed = ResetInserter(self.reset | reset_late)(
            CommittedBitmap(pages, journal_depth=self._journal_depth))
        executor = CommandExecutor(page_bits, grant_limit=self._grant_limit)
        sender = MinBalloonSender()
        # C9: a reset drops the command in progress and the pending minimum; an abort the
        # command in progress.
        m.submodules.executor = ResetInserter(self.reset | undo)(executor)
        m.submodules.sender = ResetInserter(self.reset)(sender)
        uncommitted = SyncFIFOBuffered(width=CommandEffects.as_shape().size,
                                       depth=MAX_UNCOMMITTED)
        m.submodules.uncommitted = ResetInserter(self.reset | undo)(uncommitted)

        wiring.connect(m, wiring.flipped(self.todevq), executor.command)
        wiring.connect(m, wiring.flipped(self.fromdevq), sender.command)
        wiring.connect(m, executor.bitmap_request, bitmap.request)
        wiring.connect(m, bitmap.response, executor.bitmap_response)
        wiring.connect(m, bitmap.scan, committed.scan)
        wiring.connect(m, committed.scan_data, bitmap.scan_data)
        wiring.connect(m, wiring.flipped(host.min_balloon), sender.minimum)

        pushed = executor.effects.valid & executor.effects.ready
        record = Signal(CommandEffects)
        popped = Signal()
        m.d.comb += [
            uncommitted.w_data.eq(executor.effects.payload),
            uncommitted.w_en.eq(executor.effects.valid),
            executor.effects.ready.eq(uncommitted.w_rdy & committed.boundary_ready),
            committed.boundary.eq(pushed),
            committed.written.eq(bitmap.written),
            bitmap.hold.eq(committed.hold),
            record.eq(uncommitted.r_data),
            popped.eq((to_commit != 0) & uncommitted.r_rdy & committed.commit_ready &
                      ~self.reset),
            uncommitted.r_en.eq(popped),
            committed.commit.eq(popped),
        ]
        m.d.sync += to_commit.eq(to_commit + self.commit - popped)
        with m.If(self.abort):
            m.d.sync += abort_pending.eq(1)
        with m.If(abort_pending & ~self.todevq_busy & (to_commit == 0) & ~self.commit):
            m.d.comb += [undo.eq(1), committed.abort.eq(1)]
            m.d.sync += abort_pending.eq(0)
        with m.If(self.reset):
            m.d.sync += [to_commit.eq(0), abort_pending.eq(0)]

        # --- Extra-memory range (C8): set once no command is in progress or uncommitted ---
        extra_first = Signal(page_bits + 1)
        extra_end = Signal(page_bits + 1)
        extra_write = host.extra_range_write
        extra_pending = Signal()
        extra_range = Signal.like(extra_write.payload)
        with m.If(extra_write.valid):
            m.d.sync += [extra_pending.eq(1), extra_range.eq(extra_write.payload)]
        fill = extra_pending & executor.idle & committed.drained
        with m.If(fill & ~extra_write.valid):
            first = extra_range.first
            end = first + extra_range.count
            m.d.sync += [
                extra_first.eq(Mux(first < pages, first, pages)),
                extra_end.eq(Mux(end < pages, end, pages)),
                extra_pending.eq(0),
            ]
        fill_started = Signal()
        m.d.sync += fill_started.eq(fill & ~extra_write.valid)

        # --- Return budget (C10) ---------------------------------------------------------------
        budget = Signal(32, init=c.MGMT_UNLIMITED_BUDGET)
        pending_grants = Signal(32)                     # of the uncommitted GETs
        available = Signal(32, init=c.MGMT_UNLIMITED_BUDGET)
        unlimited = budget == c.MGMT_UNLIMITED_BUDGET
        spent = Mux(popped, record.granted, 0)
        with m.If(~unlimited):
            m.d.sync += budget.eq(Mux(budget > spent, budget - spent, 0))
        with m.If(host.return_budget_write.valid):
            m.d.sync += budget.eq(host.return_budget_write.payload)
        # The pending grants lose a commit's grants before they gain a new command's, and
        # not through the reset (it clears them anyway): the late handshakes go through
        # one adder each (timing).
        commit_taken = (to_commit != 0) & uncommitted.r_rdy & committed.commit_ready
        m.d.sync += [
            pending_grants.eq((pending_grants - Mux(commit_taken, record.granted, 0)) +
                              Mux(pushed, executor.effects.payload.granted, 0)),
            available.eq(Mux(unlimited, c.MGMT_UNLIMITED_BUDGET,
                             Mux(budget > pending_grants, budget - pending_grants, 0))),
        ]
        with m.If(self.reset | undo):
            m.d.sync += pending_grants.eq(0)

        # --- Balloon size and counters (C8, C10), as committed --------------------------------
        balloon_pages = Signal(signed(32))
        with m.If(popped):
            m.d.sync += balloon_pages.eq(balloon_pages + record.pages_entered -
                                         record.pages_left)
        with m.If(self.reset):
            m.d.sync += balloon_pages.eq(0)

        counters = Signal(BalloonCounters)
        counter_names = data.Layout.cast(BalloonCounters).members
        for name, _ in data.Layout.cast(CommandEffects):
            if name in counter_names:
                counter = getattr(counters, name)
                with m.If(popped):
                    m.d.sync += counter.eq(counter + getattr(record, name))
        # The fromdevq counters count its events a clock late (timing).
        events = Signal.like(sender.events)
        m.d.sync += events.eq(sender.events)
        for name, _ in data.Layout.cast(events.shape()):
            counter = getattr(counters, name)
            m.d.sync += counter.eq(counter + getattr(events, name))

        # --- Bitmap reads: 32-bit words of 64-bit RAM words, of the committed copy ----------
        read = host.bitmap_read
        read_in_bitmap = read.payload < pages // 32
        read_half = Signal()
        read_past_end = Signal()
        m.d.sync += [
            read_half.eq(read.payload[0]),
            read_past_end.eq(read.valid & ~read_in_bitmap),
        ]
        # The committed copy is what the host reads (C7: the bitmap changes as commands
        # commit). A fill's last word is written READ_LATENCY clocks after the bitmap's
        # busy falls, and reaches the copy a clock later: reads wait for that.
        bitmap_settling = Signal(READ_LATENCY + 1)
        m.d.sync += bitmap_settling.eq(Cat(bitmap.busy, bitmap_settling[:-1]))
        bitmap_quiet = ~bitmap.busy & ~bitmap_settling.any()
        m.d.comb += [
            read.ready.eq(~read_in_bitmap | (committed.read.ready & bitmap_quiet)),
            committed.read.valid.eq(read.valid & read_in_bitmap),
            committed.read.payload.eq(read.payload[1:]),
            host.bitmap_data.valid.eq(committed.read_data.valid | read_past_end),
            host.bitmap_data.payload.eq(
                Mux(read_past_end, 0, committed.read_data.payload.word_select(read_half, 32))),
        ]

        m.d.comb += [
            bitmap.extra_first.eq(extra_first),
            bitmap.extra_end.eq(extra_end),
            bitmap.clear.eq(self.reset),
            bitmap.fill.eq(fill_started),

            executor.page_shift.eq(self.page_shift),
            executor.window_base.eq(host.window_base),
            executor.extra_first.eq(extra_first),
            executor.extra_end.eq(extra_end),
            executor.extra_mem.eq(self.extra_mem),
            executor.return_budget.eq(available),
            executor.hold.eq(extra_pending),
            sender.extra_mem.eq(self.extra_mem),

            self.busy.eq(~bitmap_quiet | committed.busy | abort_pending | extra_pending |
                         fill_started),
            host.busy.eq(~bitmap_quiet | committed.busy | extra_pending | fill_started),
            host.bitmap_pages.eq(pages),
            host.balloon_pages.eq(balloon_pages),
            host.return_budget.eq(budget),
            host.counters.eq(counters),
        ]
        return m
