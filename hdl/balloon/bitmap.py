"""The balloon bitmap (C8): one bit per page of the tracked window, in on-chip RAM."""

from amaranth.hdl import Const, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

#: Bits per RAM word: one UltraRAM row (4K x 72) or one BRAM36 row in 512 x 72 mode.
WORD_BITS = 64
_OFFSET_BITS = WORD_BITS.bit_length() - 1
_ONES = Const(2 ** WORD_BITS - 1, WORD_BITS)
MAX_PAGES = 2 ** 24


class BitmapAction(enum.Enum, shape=1):
    SET = 0         # a page enters the balloon: its bit must be clear
    CLEAR = 1       # a page leaves the balloon: its bit must be set


def bitmap_request_layout(page_bits, tag_shape):
    """One page operation; see :class:`Bitmap`."""
    return data.StructLayout({
        "page": page_bits,
        "action": BitmapAction,
        "allowed": 1,
        "chained": 1,
        "tag": tag_shape,
    })


def bitmap_response_layout(tag_shape):
    return data.StructLayout({"tag": tag_shape, "changed": 1})


class _Access(enum.Enum, shape=2):
    PAGE = 0
    FILL = 1
    READ = 2


class Bitmap(wiring.Component):
    """``pages`` bits in a ``lib.memory.Memory`` of ``WORD_BITS``-bit words; bit set = the
    host owns the page (C8).

    Page operations are a read-modify-write pipeline of two stages: the cycle that accepts
    a request addresses the RAM, the next one changes the word, writes it back and
    responds. A write is seen by a read of the same word only one edge later, so the
    modify stage takes the word from the previous cycle's write when the addresses match:
    back-to-back operations on one word see each other. One request per clock is
    sustained; the single RAM read port is the limit (``B`` banks interleaved on the word
    address would take ``B`` requests per clock from a wider request stream).

    A clear (C9) writes every word, one per clock, with the bits of the extra-memory
    range set (``pages / 64`` clocks: 16384 at 2**20 pages); a fill (C8) ORs the range
    into the words it covers, one per clock, through the pipeline. Both latch the range
    when they start. Page requests wait while either runs; bitmap reads go first always.

    Attributes
    ----------
    request : In(stream.Signature(bitmap_request_layout(page_bits, tag_shape)))
        ``action`` SET or CLEAR on ``page``. It takes effect only if ``allowed`` and, when
        ``chained``, the previous request took effect (C5's GET prefix: once one page is
        refused, the chained ones after it are too). ``tag`` is carried to the response.
    response : Out(stream.Signature(bitmap_response_layout(tag_shape), always_ready=True))
        One per request, in the cycle after it was accepted: ``changed`` if it took effect.
    read : In(stream.Signature(word_bits))
        Read a RAM word (management, C10); always ready.
    read_data : Out(stream.Signature(WORD_BITS, always_ready=True))
        The word, in the cycle after the read was accepted; bit ``i`` = page
        ``WORD_BITS * word + i``.
    extra_first, extra_end : In(page_bits + 1)
        The extra-memory range: pages ``extra_first`` .. ``extra_end - 1``.
    clear : In(1)
        Pulse: clear the bitmap except the extra range, which is set (C9). Restarts a
        clear that is running and supersedes a fill.
    fill : In(1)
        Pulse: set the bits of the extra range (C8), after a running clear or fill.
    busy : Out(1)
        A clear or fill is running or pending. Rises in the cycle after ``clear``.
    """

    def __init__(self, pages, tag_shape):
        if pages & (pages - 1) or not 2 * WORD_BITS <= pages <= MAX_PAGES:
            raise ValueError(f"pages must be a power of two in {2 * WORD_BITS}..{MAX_PAGES}, "
                             f"not {pages}")
        self._pages = pages
        page_bits = pages.bit_length() - 1
        word_bits = page_bits - _OFFSET_BITS
        super().__init__({
            "request": In(stream.Signature(bitmap_request_layout(page_bits, tag_shape))),
            "response": Out(stream.Signature(bitmap_response_layout(tag_shape),
                                             always_ready=True)),
            "read": In(stream.Signature(word_bits)),
            "read_data": Out(stream.Signature(WORD_BITS, always_ready=True)),
            "extra_first": In(page_bits + 1),
            "extra_end": In(page_bits + 1),
            "clear": In(1),
            "fill": In(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        words = self._pages // WORD_BITS
        request = self.request.payload

        m.submodules.ram = ram = Memory(shape=WORD_BITS, depth=words, init=[])
        ram_read = ram.read_port()
        ram_write = ram.write_port()

        # --- Clear and fill engines (C8, C9) ------------------------------------------------
        target_first = Signal.like(self.extra_first)
        target_end = Signal.like(self.extra_end)
        engine_word = Signal.like(ram_read.addr)
        fill_pending = Signal()

        target_last = (target_end - 1)[:len(target_end)]
        first_word = target_first[_OFFSET_BITS:]
        last_word = target_last[_OFFSET_BITS:]
        in_range = (target_end > target_first) & \
            (engine_word >= first_word) & (engine_word <= last_word)
        low_bits = Mux(engine_word == first_word,
                       (_ONES << target_first[:_OFFSET_BITS])[:WORD_BITS], _ONES)
        high_bits = Mux(engine_word == last_word, _ONES >> ~target_last[:_OFFSET_BITS], _ONES)
        range_mask = Mux(in_range, low_bits & high_bits, 0)

        s1_writes = Signal()
        fill_issue = Signal()
        clear_write = Signal()
        live_range_empty = self.extra_end <= self.extra_first

        def start_clear():
            m.d.sync += [
                target_first.eq(self.extra_first),
                target_end.eq(self.extra_end),
                engine_word.eq(0),
            ]
            m.next = "Clear"

        with m.FSM(init="Ready") as fsm:
            with m.State("Ready"):
                with m.If(self.clear):
                    start_clear()
                with m.Elif(fill_pending & ~live_range_empty):
                    m.d.sync += [
                        target_first.eq(self.extra_first),
                        target_end.eq(self.extra_end),
                        engine_word.eq(self.extra_first[_OFFSET_BITS:]),
                    ]
                    m.next = "Fill"

            with m.State("Clear"):
                # The bits are all rewritten: no read, one word per clock, after a write
                # still in the modify stage.
                m.d.comb += clear_write.eq(~s1_writes)
                with m.If(self.clear):
                    start_clear()
                with m.Elif(clear_write):
                    m.d.sync += engine_word.eq(engine_word + 1)
                    with m.If(engine_word == words - 1):
                        m.next = "Ready"

            with m.State("Fill"):
                m.d.comb += fill_issue.eq(~self.read.valid)
                with m.If(self.clear):
                    start_clear()
                with m.Elif(fill_issue):
                    m.d.sync += engine_word.eq(engine_word + 1)
                    with m.If(engine_word == last_word):
                        m.next = "Ready"

        with m.If(fsm.ongoing("Ready")):
            m.d.sync += fill_pending.eq(0)
        with m.If(self.fill):
            m.d.sync += fill_pending.eq(1)
        with m.If(self.clear):
            m.d.sync += fill_pending.eq(0)
        m.d.comb += self.busy.eq(~fsm.ongoing("Ready") | fill_pending)

        # --- Stage 0: address the RAM (reads first, then the fill, then page requests) ------
        m.d.comb += [
            self.read.ready.eq(1),
            self.request.ready.eq(fsm.ongoing("Ready") & ~fill_pending & ~self.clear &
                                  ~self.read.valid),
        ]
        take_page = self.request.valid & self.request.ready
        with m.If(self.read.valid):
            m.d.comb += ram_read.addr.eq(self.read.payload)
        with m.Elif(fill_issue):
            m.d.comb += ram_read.addr.eq(engine_word)
        with m.Else():
            m.d.comb += ram_read.addr.eq(request.page[_OFFSET_BITS:])

        s1_valid = Signal()
        s1_access = Signal(_Access)
        s1_word = Signal.like(ram_read.addr)
        s1_offset = Signal(_OFFSET_BITS)
        s1_mask = Signal(WORD_BITS)
        s1_request = Signal(request.shape())
        m.d.sync += [
            s1_valid.eq(self.read.valid | fill_issue | take_page),
            s1_word.eq(ram_read.addr),
            s1_offset.eq(request.page[:_OFFSET_BITS]),
            s1_mask.eq(range_mask),
            s1_request.eq(request),
        ]
        with m.If(self.read.valid):
            m.d.sync += s1_access.eq(_Access.READ)
        with m.Elif(fill_issue):
            m.d.sync += s1_access.eq(_Access.FILL)
        with m.Else():
            m.d.sync += s1_access.eq(_Access.PAGE)

        # --- Stage 1: modify, write back, respond --------------------------------------------
        last_write_valid = Signal()
        last_write_addr = Signal.like(ram_write.addr)
        last_write_data = Signal.like(ram_write.data)
        m.d.sync += [
            last_write_valid.eq(ram_write.en),
            last_write_addr.eq(ram_write.addr),
            last_write_data.eq(ram_write.data),
        ]
        forwarded = last_write_valid & (last_write_addr == s1_word)
        word = Mux(forwarded, last_write_data, ram_read.data)

        last_changed = Signal()
        bit = word.bit_select(s1_offset, 1)
        takes_effect = s1_request.allowed & (~s1_request.chained | last_changed)
        changed = takes_effect & (bit == (s1_request.action == BitmapAction.CLEAR))
        page_access = s1_valid & (s1_access == _Access.PAGE)
        page_write = page_access & changed
        fill_write = s1_valid & (s1_access == _Access.FILL)
        with m.If(page_access):
            m.d.sync += last_changed.eq(changed)

        m.d.comb += s1_writes.eq(page_write | fill_write)
        m.d.comb += ram_write.en.eq(s1_writes | clear_write)
        with m.If(page_write):
            m.d.comb += [
                ram_write.addr.eq(s1_word),
                ram_write.data.eq(word ^ (Const(1, WORD_BITS) << s1_offset)[:WORD_BITS]),
            ]
        with m.Elif(fill_write):
            m.d.comb += [ram_write.addr.eq(s1_word), ram_write.data.eq(word | s1_mask)]
        with m.Else():
            m.d.comb += [ram_write.addr.eq(engine_word), ram_write.data.eq(range_mask)]

        m.d.comb += [
            self.response.valid.eq(page_access),
            self.response.payload.tag.eq(s1_request.tag),
            self.response.payload.changed.eq(changed),
            self.read_data.valid.eq(s1_valid & (s1_access == _Access.READ)),
            self.read_data.payload.eq(word),
        ]
        return m
