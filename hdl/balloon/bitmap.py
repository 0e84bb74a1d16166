"""The balloon bitmap (C8): one bit per page of the tracked window, in on-chip RAM."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..virtqueue.interface import COMMAND_LANES

#: Bits per RAM word: one UltraRAM row (4K x 72) or one BRAM36 row in 512 x 72 mode.
WORD_BITS = 64
_OFFSET_BITS = WORD_BITS.bit_length() - 1
_ONES = Const(2 ** WORD_BITS - 1, WORD_BITS)
MAX_PAGES = 2 ** 24
#: Page operations per request beat: one per command word lane.
LANES = COMMAND_LANES
#: Clocks from a request beat, read or scan taken to its response or data: the RAMs' read
#: and their output registers.
READ_LATENCY = 2
#: RAM banks, interleaved on the word address: word ``w`` is row ``w // BANKS`` of bank
#: ``w % BANKS``. The logic pairs lane 0 with lane 1 and bank 0 with bank 1: two of each.
BANKS = 2


class BitmapAction(enum.Enum, shape=1):
    SET = 0         # a page enters the balloon: its bit must be clear
    CLEAR = 1       # a page leaves the balloon: its bit must be set


def bitmap_operation_layout(page_bits, tag_shape):
    """One page operation of a request beat; see :class:`Bitmap`."""
    return data.StructLayout({
        "enable": 1,
        "page": page_bits,
        "action": BitmapAction,
        "allowed": 1,
        "chained": 1,
        "tag": tag_shape,
    })


def bitmap_request_layout(page_bits, tag_shape):
    """Up to ``LANES`` page operations, applied in lane order."""
    return data.StructLayout({
        "lanes": data.ArrayLayout(bitmap_operation_layout(page_bits, tag_shape), LANES),
    })


def row_bits_of(pages):
    """Bits of a bank's row address for a bitmap of ``pages`` pages."""
    return (pages // (WORD_BITS * BANKS)).bit_length() - 1


def scan_request_layout(row_bits):
    """A whole-row access of every bank, for :class:`.committed.CommittedBitmap`: read
    row ``row`` (its words come on ``scan_data``), or write ``data[bank]`` into it."""
    return data.StructLayout({
        "row": row_bits,
        "write": 1,
        "data": data.ArrayLayout(WORD_BITS, BANKS),
    })


def written_layout(row_bits):
    """One bank's write of the previous cycle: ``journal`` for a page operation (C5),
    clear for a clear or fill (C8, C9), which change the committed state at once."""
    return data.StructLayout({
        "valid": 1,
        "journal": 1,
        "row": row_bits,
        "data": WORD_BITS,
    })


def bitmap_response_layout(tag_shape):
    """The outcome of the enabled operations of one request beat (or of part of it)."""
    return data.StructLayout({
        "lanes": data.ArrayLayout(data.StructLayout({
            "enable": 1, "tag": tag_shape, "changed": 1}), LANES),
    })


class _Access(enum.Enum, shape=2):
    PAGE = 0
    FILL = 1
    READ = 2
    SCAN = 3


class _WriteKind(enum.Enum, shape=2):
    NONE = 0
    PAGE = 1        # a page operation: journaled until its command commits (C7)
    DIRECT = 2      # a clear or fill: committed at once
    SCAN = 3        # the committed copy restored (C7 abort): not written back


class Bitmap(wiring.Component):
    """``pages`` bits in ``BANKS`` ``lib.memory.Memory`` banks of ``WORD_BITS``-bit words,
    interleaved on the word address; bit set = the host owns the page (C8).

    Each bank is a read-modify-write pipeline of three stages (``READ_LATENCY``): the
    cycle that accepts a request addresses the RAMs, the next one registers their words
    (the RAM's output register: an UltraRAM or block RAM read without it costs about
    1.5 ns of the clock), the third changes the words, writes them back and responds. A
    write is seen by a read of the same row only one edge later, so the modify stage
    takes a bank's word from that bank's write of the clock before, or else of the one
    before that, when its row was written: back-to-back operations on one word see each
    other. Each comparison is made a clock or two early, against the row the modify
    stage holds whether or not it writes it (its word is that row's either way), so
    that it stays off the modify path (timing).

    A request beat carries up to ``LANES`` operations (lanes with ``enable``), applied in
    lane order. Both lanes go through in one clock when they hit different banks, or the
    same word: one write of the word carries both changes, and lane 1 on lane 0's page
    sees lane 0's change, so the same page twice behaves as two beats would. Lanes on different
    words of one bank conflict (one read port per bank): the beat is split, lane 0 in one
    clock, lane 1 in the next, and answered in two response beats. Contiguous pages never
    conflict; pages at random do in half of the beats.

    A clear (C9) writes every word, one row of each bank per clock, with the bits of the
    extra-memory range set (``pages / 128`` clocks: 8192 at 2**20 pages); a fill (C8) ORs
    the range into the words it covers, one word per clock, through the pipeline. Both
    latch the range when they start. Page requests wait while either runs; bitmap reads go
    first always (a split beat's second half waits for them too).

    Attributes
    ----------
    request : In(stream.Signature(bitmap_request_layout(page_bits, tag_shape)))
        ``lanes[i]``: if ``enable``, ``action`` SET or CLEAR on ``page``. It takes effect
        only if ``allowed`` and, when ``chained``, the previous enabled operation (in this
        beat or an earlier one) took effect (C5's GET prefix: once one page is refused, the
        chained ones after it are too). ``tag`` is carried to the response. A beat
        without an enabled lane is taken and dropped. ``ready`` depends on the payload
        (a conflicting beat is taken in its second clock).
    response : Out(stream.Signature(bitmap_response_layout(tag_shape), always_ready=True))
        The enabled lanes, in request order, ``READ_LATENCY`` cycles after they were issued:
        ``changed`` if the operation took effect. A split beat's lanes come in two beats.
    read : In(stream.Signature(word_bits))
        Read a RAM word (management, C10); always ready.
    read_data : Out(stream.Signature(WORD_BITS, always_ready=True))
        The word, ``READ_LATENCY`` cycles after the read was accepted; bit ``i`` = page
        ``WORD_BITS * word + i``.
    extra_first, extra_end : In(page_bits + 1)
        The extra-memory range: pages ``extra_first`` .. ``extra_end - 1``.
    clear : In(1)
        Pulse: clear the bitmap except the extra range, which is set (C9). Restarts a
        clear that is running, supersedes a fill and forgets the first half of a split
        beat (the requester is reset with the bitmap).
    fill : In(1)
        Pulse: set the bits of the extra range (C8), after a running clear or fill.
    busy : Out(1)
        A clear or fill is running or pending. Rises in the cycle after ``clear``.
    hold : In(1)
        Page requests wait (the committed copy is being taken or restored, C7).
    written : Out(data.ArrayLayout(written_layout(row_bits), BANKS))
        Each bank's write of the previous cycle, for the committed copy.
    scan : In(stream.Signature(scan_request_layout(row_bits)))
        Whole-row reads and writes of every bank, taken only while ``hold`` is high and
        no page operation is left in the pipeline; host reads go first.
    scan_data : Out(stream.Signature(data.ArrayLayout(WORD_BITS, BANKS), always_ready=True))
        The row a scan read asked for, ``READ_LATENCY`` cycles after it was taken.
    """

    def __init__(self, pages, tag_shape):
        if pages & (pages - 1) or not 2 * BANKS * WORD_BITS <= pages <= MAX_PAGES:
            raise ValueError(f"pages must be a power of two in {2 * BANKS * WORD_BITS}.."
                             f"{MAX_PAGES}, not {pages}")
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
            "hold": In(1),
            "written": Out(data.ArrayLayout(written_layout(row_bits_of(pages)), BANKS)),
            "scan": In(stream.Signature(scan_request_layout(row_bits_of(pages)))),
            "scan_data": Out(stream.Signature(data.ArrayLayout(WORD_BITS, BANKS),
                                              always_ready=True)),
        })

    def elaborate(self, platform):
        m = Module()
        words = self._pages // WORD_BITS
        rows = words // BANKS
        lanes = self.request.payload.lanes

        read_ports, write_ports = [], []
        for bank in range(BANKS):
            ram = Memory(shape=WORD_BITS, depth=rows, init=[])
            m.submodules[f"ram{bank}"] = ram
            read_ports.append(ram.read_port())
            write_ports.append(ram.write_port())

        def bank_of(word):
            return word[:1]

        def row_of(word):
            return word[1:]

        # --- Clear and fill engines (C8, C9) ------------------------------------------------
        target_first = Signal.like(self.extra_first)
        target_end = Signal.like(self.extra_end)
        engine_word = Signal(range(words))
        fill_pending = Signal()

        target_last = (target_end - 1)[:len(target_end)]
        first_word = target_first[_OFFSET_BITS:]
        last_word = target_last[_OFFSET_BITS:]

        def range_mask(word):
            """The bits of the latched range in RAM word ``word``."""
            in_range = (target_end > target_first) & (word >= first_word) & (word <= last_word)
            low_bits = Mux(word == first_word,
                           (_ONES << target_first[:_OFFSET_BITS])[:WORD_BITS], _ONES)
            high_bits = Mux(word == last_word, _ONES >> ~target_last[:_OFFSET_BITS], _ONES)
            return Mux(in_range, low_bits & high_bits, 0)

        may_write = Signal()            # a page or fill operation is in stage 1 or 2
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
                # The bits are all rewritten: no read, one row of every bank per clock,
                # after an operation in the modify stage that may write (decided on the
                # stage's registers: timing).
                m.d.comb += clear_write.eq(~may_write)
                with m.If(self.clear):
                    start_clear()
                with m.Elif(clear_write):
                    m.d.sync += engine_word.eq(engine_word + BANKS)
                    with m.If(engine_word == words - BANKS):
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

        # --- Stage 0: issue lanes, address the banks (reads, then the fill, then pages) ----
        lane_word = [lane.page[_OFFSET_BITS:] for lane in lanes]
        conflict = (lanes[0].enable & lanes[1].enable &
                    (bank_of(lane_word[0]) == bank_of(lane_word[1])) &
                    (lane_word[0] != lane_word[1]))
        second_half = Signal()          # lane 0 of the conflicting beat offered was issued
        s1_valid = Signal()
        s1_access = Signal(_Access)
        s2_valid = Signal()
        s2_access = Signal(_Access)
        engines_idle = fsm.ongoing("Ready") & ~fill_pending & ~self.clear & ~self.read.valid
        pages_open = engines_idle & ~self.hold
        issue_pages = self.request.valid & pages_open
        # A scan write goes to the RAMs at once: not while an operation that may write is
        # in the pipeline (decided on the stages' registers, not on whether it writes:
        # timing).
        scan = self.scan.payload
        scan_taken = Signal()
        m.d.comb += may_write.eq(Cat(
            valid & ((access == _Access.PAGE) | (access == _Access.FILL))
            for valid, access in ((s1_valid, s1_access), (s2_valid, s2_access))).any())
        m.d.comb += [
            self.scan.ready.eq(engines_idle & self.hold & ~(scan.write & may_write)),
            scan_taken.eq(self.scan.valid & self.scan.ready),
        ]
        issued = Signal(LANES)
        m.d.comb += [
            self.read.ready.eq(1),
            self.request.ready.eq(pages_open & (~conflict | second_half)),
            issued[0].eq(issue_pages & lanes[0].enable & ~(conflict & second_half)),
            issued[1].eq(issue_pages & lanes[1].enable & ~(conflict & ~second_half)),
        ]
        with m.If(issue_pages & conflict):
            m.d.sync += second_half.eq(~second_half)
        with m.If(self.clear):
            m.d.sync += second_half.eq(0)

        in_fill = fsm.ongoing("Fill")

        def read_row(bank, compare=None):
            """The row ``bank`` reads this clock, or with ``compare`` whether it is
            ``compare(row)`` (each candidate compared beside the selection: timing).

            Chosen on registers and the request's lanes, not on what is issued (timing):
            only the access that is issued uses the row. A fill runs alone; a scan only
            while ``hold`` keeps page requests out; lane 1's row when it is on this bank
            and lane 0 is not (or is, on another word: the split beat's second clock)."""
            on_bank = [lane.enable & (bank_of(word) == bank)
                       for lane, word in zip(lanes, lane_word)]
            candidates = [
                (self.read.valid, row_of(self.read.payload)),
                (in_fill, row_of(engine_word)),
                (self.hold, scan.row),
                (on_bank[1] & (~on_bank[0] | second_half), row_of(lane_word[1])),
            ]
            chosen = compare(row_of(lane_word[0])) if compare else row_of(lane_word[0])
            for condition, row in reversed(candidates):
                chosen = Mux(condition, compare(row) if compare else row, chosen)
            return chosen

        for bank, read_port in enumerate(read_ports):
            m.d.comb += read_port.addr.eq(read_row(bank))

        s1_word = Signal.like(engine_word)              # of a read or fill
        s1_mask = Signal(WORD_BITS)
        s1_issued = Signal(LANES)
        s1_lanes = Signal.like(lanes)
        scan_read = scan_taken & ~scan.write
        m.d.sync += [
            s1_valid.eq(self.read.valid | fill_issue | scan_read | issued.any()),
            s1_word.eq(Mux(self.read.valid, self.read.payload, engine_word)),
            s1_mask.eq(range_mask(engine_word)),
            s1_issued.eq(issued),
            s1_lanes.eq(lanes),
        ]
        with m.If(self.read.valid):
            m.d.sync += s1_access.eq(_Access.READ)
        with m.Elif(fill_issue):
            m.d.sync += s1_access.eq(_Access.FILL)
        with m.Elif(scan_read):
            m.d.sync += s1_access.eq(_Access.SCAN)
        with m.Else():
            m.d.sync += s1_access.eq(_Access.PAGE)

        # --- Stage 1: the RAMs' words come out and are registered -----------------------------
        # (the RAMs' output registers: UltraRAM's OREG, block RAM's DOB_REG)
        s2_word = Signal.like(s1_word)
        s2_mask = Signal.like(s1_mask)
        s2_issued = Signal.like(s1_issued)
        s2_lanes = Signal.like(s1_lanes)
        m.d.sync += [
            s2_valid.eq(s1_valid),
            s2_access.eq(s1_access),
            s2_word.eq(s1_word),
            s2_mask.eq(s1_mask),
            s2_issued.eq(s1_issued),
            s2_lanes.eq(s1_lanes),
        ]

        # --- Stage 2: modify, write back, respond --------------------------------------------
        # A stage-2 word misses the writes of the two clocks before (its read was addressed
        # two clocks earlier): it is the last write's word if that was its row, else the
        # one before's if that was, else the RAM's; both decided a clock or two early.
        bank_words = []
        last_write_kinds = []
        bank_sources = []               # (last, before last, RAM word) per bank, chosen
        s1_rows, s2_rows, hits_before, hits_last = [], [], [], []
        for bank, (read_port, write_port) in enumerate(zip(read_ports, write_ports)):
            s1_row = Signal.like(read_port.addr, name=f"s1_row{bank}")
            s2_row = Signal.like(read_port.addr, name=f"s2_row{bank}")
            ram_word = Signal.like(read_port.data, name=f"ram_word{bank}")
            hit_before = Signal(name=f"hit_before{bank}")   # in stage 1: the write at issue
            hit_before2 = Signal(name=f"hit_before2_{bank}")  # the same, in stage 2
            hit_last = Signal(name=f"hit_last{bank}")       # in stage 2: the write a clock ago
            last_write_valid = Signal(name=f"last_write_valid{bank}")
            last_write_row = Signal.like(write_port.addr, name=f"last_write_row{bank}")
            last_write_data = Signal.like(write_port.data, name=f"last_write_data{bank}")
            before_write_data = Signal.like(write_port.data, name=f"before_write_data{bank}")
            last_write_kind = Signal(_WriteKind, name=f"last_write_kind{bank}")
            m.d.sync += [
                s1_row.eq(read_port.addr),
                s2_row.eq(s1_row),
                ram_word.eq(read_port.data),
                hit_before2.eq(hit_before),
                last_write_valid.eq(write_port.en),
                last_write_row.eq(write_port.addr),
                last_write_data.eq(write_port.data),
                before_write_data.eq(last_write_data),
            ]
            written = self.written[bank]
            m.d.comb += [
                written.valid.eq(last_write_valid & (last_write_kind != _WriteKind.SCAN)),
                written.journal.eq(last_write_kind == _WriteKind.PAGE),
                written.row.eq(last_write_row),
                written.data.eq(last_write_data),
            ]
            last_write_kinds.append(last_write_kind)
            bank_words.append(Mux(hit_last, last_write_data,
                                  Mux(hit_before2, before_write_data, ram_word)))
            bank_sources.append((hit_last, last_write_data, hit_before2, before_write_data,
                                 ram_word))
            s1_rows.append(s1_row)
            s2_rows.append(s2_row)
            hits_before.append(hit_before)
            hits_last.append(hit_last)

        page_access = s2_valid & (s2_access == _Access.PAGE)
        s2_lane_word = [lane.page[_OFFSET_BITS:] for lane in s2_lanes]
        same_page = s2_lanes[0].page == s2_lanes[1].page
        last_changed = Signal()             # of the last enabled operation so far
        previous_changed = last_changed
        lane_changed = []
        for index, lane in enumerate(s2_lanes):
            enabled = page_access & s2_issued[index]
            # The page's bit picked from each source word first and chosen last: the
            # forwarding's choice runs beside the 192-bit selection (timing).
            offset = lane.page[:_OFFSET_BITS]
            bank_bits = [Mux(last_hit, last_word.bit_select(offset, 1),
                             Mux(before_hit, before_word.bit_select(offset, 1),
                                 ram.bit_select(offset, 1)))
                         for last_hit, last_word, before_hit, before_word, ram in bank_sources]
            bit = Mux(bank_of(s2_lane_word[index]), bank_bits[1], bank_bits[0])
            if index:
                # Lane 1 on lane 0's page sees lane 0's change.
                bit = bit ^ (lane_changed[0] & same_page)
            takes_effect = lane.allowed & (~lane.chained | previous_changed)
            changed = Signal(name=f"changed{index}")
            m.d.comb += changed.eq(enabled & takes_effect &
                                   (bit == (lane.action == BitmapAction.CLEAR)))
            lane_changed.append(changed)
            previous_changed = Mux(enabled, changed, previous_changed)
        m.d.sync += last_changed.eq(previous_changed)

        fill_write = s2_valid & (s2_access == _Access.FILL)
        scan_write = scan_taken & scan.write
        for bank, write_port in enumerate(write_ports):
            # The lanes that changed a bit of this bank: both only on one word of it.
            flips = [changed & (bank_of(word) == bank)
                     for changed, word in zip(lane_changed, s2_lane_word)]
            page_write = flips[0] | flips[1]
            this_fill = fill_write & (bank_of(s2_word) == bank)
            m.d.comb += write_port.en.eq(page_write | this_fill | clear_write | scan_write)
            kind = last_write_kinds[bank]
            with m.If(page_write):
                m.d.sync += kind.eq(_WriteKind.PAGE)
            with m.Elif(scan_write):
                m.d.sync += kind.eq(_WriteKind.SCAN)
            with m.Else():
                m.d.sync += kind.eq(_WriteKind.DIRECT)
            # A page or fill write goes to the row the stage read. Without a write the
            # word is that row's as it is: later stages forward it all the same if they
            # read that row (the forwarding does not wait for the modify: timing).
            flipped = bank_words[bank]
            for flip, lane in zip(flips, s2_lanes):
                flipped = flipped ^ (flip << lane.page[:_OFFSET_BITS])[:WORD_BITS]
            with m.If(scan_write):
                m.d.comb += [write_port.addr.eq(scan.row),
                             write_port.data.eq(scan.data[bank])]
            with m.Elif(clear_write):
                m.d.comb += [write_port.addr.eq(row_of(engine_word)),
                             write_port.data.eq(range_mask(engine_word + bank))]
            with m.Elif(this_fill):
                m.d.comb += [write_port.addr.eq(s2_rows[bank]),
                             write_port.data.eq(bank_words[bank] | s2_mask)]
            with m.Else():
                m.d.comb += [write_port.addr.eq(s2_rows[bank]),
                             write_port.data.eq(flipped)]
            # Whether a row read now, or in stage 1 now, is the row written now: a scan
            # write reads the row it writes; a clear writes its row; otherwise stage 2's
            # row (written or not) if stage 2 holds an access.
            m.d.sync += [
                hits_before[bank].eq(
                    scan_write |
                    Mux(clear_write, read_row(bank, lambda row: row == row_of(engine_word)),
                        s2_valid & read_row(bank, lambda row: row == s2_rows[bank]))),
                hits_last[bank].eq(
                    Mux(scan_write, scan.row == s1_rows[bank],
                        Mux(clear_write, row_of(engine_word) == s1_rows[bank],
                            s2_valid & (s2_rows[bank] == s1_rows[bank])))),
            ]

        m.d.comb += self.response.valid.eq(page_access)
        for index, lane in enumerate(s2_lanes):
            m.d.comb += [
                self.response.payload.lanes[index].enable.eq(s2_issued[index]),
                self.response.payload.lanes[index].tag.eq(lane.tag),
                self.response.payload.lanes[index].changed.eq(lane_changed[index]),
            ]
        m.d.comb += [
            self.scan_data.valid.eq(s2_valid & (s2_access == _Access.SCAN)),
            self.scan_data.payload[0].eq(bank_words[0]),
            self.scan_data.payload[1].eq(bank_words[1]),
            self.read_data.valid.eq(s2_valid & (s2_access == _Access.READ)),
            self.read_data.payload.eq(Mux(bank_of(s2_word), bank_words[1], bank_words[0])),
        ]
        return m
