"""The balloon core: bitmap, todevq executor, fromdevq sender and the host-side state."""

from amaranth.hdl import Module, Mux, ResetInserter, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from memballoon import constants as c

from ..virtio.interface import CommandSignature
from .bitmap import Bitmap
from .executor import CommandExecutor, OpTag
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

    Host settings (C10): a budget write replaces the budget (it then decrements per
    granted page, up to two a clock, never below 0, not at all when all-ones). An extra-range commit is
    clipped to the window and becomes the range in force at once; its pages become
    host-owned by a fill, without counting in ``balloon_pages``. Pages of the range that
    were already in the balloon stay in it and stay counted; bits set by an earlier range
    are left as they are, so the host declares only memory the driver does not use.

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
        The bitmap is being cleared or filled: ``CommonCfg.reset_busy``.
    host : In(BalloonHostSignature())
        To the management port.
    """

    def __init__(self, pages=2 ** 20):
        self._pages = pages
        super().__init__({
            "todevq": In(CommandSignature()),
            "fromdevq": In(CommandSignature(parking=True)),
            "page_shift": In(6),
            "extra_mem": In(1),
            "reset": In(1),
            "busy": Out(1),
            "host": In(BalloonHostSignature()),
        })

    def elaborate(self, platform):
        m = Module()
        pages = self._pages
        page_bits = pages.bit_length() - 1
        host = self.host

        m.submodules.bitmap = bitmap = Bitmap(pages, OpTag)
        executor = CommandExecutor(page_bits)
        sender = MinBalloonSender()
        # C9: a reset drops the command in progress and the pending minimum.
        m.submodules.executor = ResetInserter(self.reset)(executor)
        m.submodules.sender = ResetInserter(self.reset)(sender)

        wiring.connect(m, wiring.flipped(self.todevq), executor.command)
        wiring.connect(m, wiring.flipped(self.fromdevq), sender.command)
        wiring.connect(m, executor.bitmap_request, bitmap.request)
        wiring.connect(m, bitmap.response, executor.bitmap_response)
        wiring.connect(m, wiring.flipped(host.min_balloon), sender.minimum)

        # --- Extra-memory range (C8) --------------------------------------------------------
        extra_first = Signal(page_bits + 1)
        extra_end = Signal(page_bits + 1)
        extra_write = host.extra_range_write
        with m.If(extra_write.valid):
            first = extra_write.payload.first
            end = first + extra_write.payload.count
            m.d.sync += [
                extra_first.eq(Mux(first < pages, first, pages)),
                extra_end.eq(Mux(end < pages, end, pages)),
            ]

        # --- Return budget (C10) ---------------------------------------------------------------
        budget = Signal(32, init=c.MGMT_UNLIMITED_BUDGET)
        spent = executor.events.granted             # 0..2 pages a clock
        with m.If(budget != c.MGMT_UNLIMITED_BUDGET):
            m.d.sync += budget.eq(Mux(budget > spent, budget - spent, 0))
        with m.If(host.return_budget_write.valid):
            m.d.sync += budget.eq(host.return_budget_write.payload)

        # --- Balloon size and counters (C8, C10) ---------------------------------------------
        balloon_pages = Signal(signed(32))
        m.d.sync += balloon_pages.eq(balloon_pages + executor.events.pages_entered -
                                     executor.events.pages_left)
        with m.If(self.reset):
            m.d.sync += balloon_pages.eq(0)

        # The counters are statistics for the host: they count the events a clock late, so
        # that their adders do not follow the executor's address decode (timing).
        counters = Signal(BalloonCounters)
        counter_names = data.Layout.cast(BalloonCounters).members
        for source in (executor.events, sender.events):
            events = Signal.like(source)
            m.d.sync += events.eq(source)
            for name, _ in data.Layout.cast(events.shape()):
                if name in counter_names:
                    counter = getattr(counters, name)
                    m.d.sync += counter.eq(counter + getattr(events, name))

        # --- Bitmap reads: 32-bit words of 64-bit RAM words ---------------------------------
        read = host.bitmap_read
        read_in_bitmap = read.payload < pages // 32
        read_half = Signal()
        read_past_end = Signal()
        m.d.sync += [
            read_half.eq(read.payload[0]),
            read_past_end.eq(read.valid & ~read_in_bitmap),
        ]
        m.d.comb += [
            read.ready.eq(1),
            bitmap.read.valid.eq(read.valid & read_in_bitmap),
            bitmap.read.payload.eq(read.payload[1:]),
            host.bitmap_data.valid.eq(bitmap.read_data.valid | read_past_end),
            host.bitmap_data.payload.eq(
                Mux(read_past_end, 0, bitmap.read_data.payload.word_select(read_half, 32))),
        ]

        m.d.comb += [
            bitmap.extra_first.eq(extra_first),
            bitmap.extra_end.eq(extra_end),
            bitmap.clear.eq(self.reset),
            bitmap.fill.eq(extra_write.valid),

            executor.page_shift.eq(self.page_shift),
            executor.window_base.eq(host.window_base),
            executor.extra_first.eq(extra_first),
            executor.extra_end.eq(extra_end),
            executor.extra_mem.eq(self.extra_mem),
            executor.return_budget.eq(budget),
            sender.extra_mem.eq(self.extra_mem),

            self.busy.eq(bitmap.busy),
            host.busy.eq(bitmap.busy),
            host.bitmap_pages.eq(pages),
            host.balloon_pages.eq(balloon_pages),
            host.return_budget.eq(budget),
            host.counters.eq(counters),
        ]
        return m
