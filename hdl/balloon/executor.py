"""The todevq command executor (C5): GIVE_PAGES, GET_PAGES and EXCHANGE_PAGES."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from memballoon import constants as c

from ..virtqueue.interface import CommandSignature
from .bitmap import LANES, BitmapAction, bitmap_request_layout, bitmap_response_layout

_ADDRESS_ONES = Const(2 ** 64 - 1, 64)


class OpTag(enum.Enum, shape=3):
    """What a bitmap request is for, so that its response is counted right."""
    ENTER = 0               # GIVE, or the second half of EXCHANGE
    LEAVE = 1               # the wanted half of EXCHANGE
    GRANT = 2               # GET
    GRANT_MISALIGNED = 3    # GET of an invalid address: never granted, counted if it is
    GRANT_OUT_OF_WINDOW = 4  # the first refusal


class CommandEffects(data.Struct):
    """What one command did, to be committed once its used element is published (C7);
    the names match :class:`.interface.BalloonCounters`."""
    cmd_give: 1
    cmd_get: 1
    cmd_exchange: 1
    cmd_malformed: 1
    get_short: 1
    violation_misaligned: 32
    violation_out_of_window: 32
    violation_double_give: 32
    violation_not_in_balloon: 32
    pages_entered: 32
    pages_left: 32
    #: Pages a GET granted: as many pages of the return budget are spent (C10).
    granted: 32


#: The counts of :class:`CommandEffects` that its page operations make.
_PAGE_COUNTS = ("violation_misaligned", "violation_out_of_window", "violation_double_give",
                "violation_not_in_balloon", "pages_entered", "pages_left")


def _count(bits):
    """How many of ``bits`` are set, as a small sum."""
    total = bits[0]
    for bit in bits[1:]:
        total = total + bit
    return total


class _Sizes(data.Struct):
    """What the executor checks of a command's byte counts (C5), taken with its header so
    that the code word's check is a few registered bits (timing)."""
    count: 29               # payload words: readable / 8 - 1
    empty: 1                # no readable bytes: no code word follows
    sized: 1                # readable a multiple of 8, with at least one payload word
    even: 1                 # an even payload count
    writes_8: 1             # exactly 8 writable bytes (GET's K)
    writes_none: 1


def _checked_code(code, sizes):
    """Whether a command of this code word and :class:`_Sizes` is well formed (C5)."""
    code_get = code == c.GuestCmd.GET_PAGES.value
    code_give = code == c.GuestCmd.GIVE_PAGES.value
    code_exchange = code == c.GuestCmd.EXCHANGE_PAGES.value
    return ((code_get | code_give | code_exchange) & sizes.sized &
            ~(code_exchange & ~sizes.even) &
            Mux(code_get, sizes.writes_8, sizes.writes_none))


class CommandExecutor(wiring.Component):
    """Executes each todevq command (C5) on the bitmap (C8), two pages a clock.

    A command is checked from its header and first word before anything changes; a
    malformed one (unknown code, readable length not a multiple of 8, no payload, EXCHANGE
    with an odd payload count, GET without exactly 8 writable bytes, writable bytes on
    GIVE or EXCHANGE) is drained and completed with ``used_len`` 0.

    The first beat holds the code alone; each later beat holds up to ``LANES`` payload
    words (word ``i`` in lane ``i % 2``). Each lane is decoded in the two clocks after
    its beat is taken (C4: granularity = the negotiated page size; C8: the window starts
    at ``window_base`` rounded down to the page size, page = ``(address - base) >>
    page_shift``) into one lane of a bitmap request, one beat per clock. The decode works
    from registered bounds of the window, without a 64-bit subtraction or comparison
    (timing): the first clock takes the address's page-number bits and compares its
    high bits, the second subtracts the base's page number and checks the extra range:

    - GIVE and the second half of EXCHANGE: SET. An invalid address is counted by kind
      (misaligned first, then out of window) and its lane left disabled; a refused SET is
      a double give.
    - the first half of EXCHANGE: CLEAR, refused for a page of the extra range without
      EXTRA_MEM (C8); a refused CLEAR is counted as not in the balloon. Its pages leave
      before the second half's enter because the bitmap keeps lane and request order, so
      the boundary may fall between the lanes of one beat (N odd).
    - GET: a chained CLEAR per address, allowed when the address is valid, the page is
      not extra memory without EXTRA_MEM (C8), and the budget covers it. Because grants
      are a prefix, page ``i`` is granted only after ``i`` grants, so the budget check is
      ``i < budget`` per lane on the budget taken when the GET starts (C10), kept as the
      grants left to the command: a host write of the budget takes effect from the next
      GET. The bitmap's chaining (across lanes
      and beats) stops the prefix at the first page whose bit is clear. An invalid
      address goes to the bitmap too, as an operation that is never allowed: it stops
      the prefix, and its violation is counted only if it is the first refusal (the
      addresses after it are not looked at). A valid page that cannot be granted counts
      nothing but ``get_short``.

    A GET also stops at ``grant_limit`` pages (C5's per-command grant limit, a build
    parameter: ``DeviceParams.get_grant_limit``): a longer GET is a prefix grant.

    Every command completes once its last operation has its response, counted a clock
    after it comes (timing) (GET writes K, le64). Meanwhile the next command's header and
    code word are taken and checked ahead and its first payload beat decoded, so that
    its operations reach the bitmap in the clock of the result (a GET's a clock or two
    later, once the budget counts the command before, C10). Each command hands its
    :class:`CommandEffects` to the balloon core with its result: the counters,
    ``balloon_pages`` and the budget change only when the command commits (C7), and the
    bitmap's committed copy knows where the command's writes end (``effects`` handshake
    = ``CommittedBitmap.boundary``, before the next command's first write). A word beat
    with ``error`` (its data could not be read, C7) stops the executor without a result
    until it is reset (the core's abort restores what the command changed).

    Attributes
    ----------
    command : In(CommandSignature())
        todevq's commands, from the virtqueue engine.
    bitmap_request, bitmap_response
        To and from :class:`.bitmap.Bitmap`.
    page_shift : In(6)
        log2 of the negotiated page size (C4).
    window_base : In(64)
        Byte address of page 0 of the tracked window (C8).
    extra_first, extra_end : In(page_bits + 1)
        The extra-memory range: pages ``extra_first`` .. ``extra_end - 1`` (C8).
    extra_mem : In(1)
        VIRTIO_MEMBALLOON_F_EXTRA_MEM was negotiated.
        The settings above change only between commands (the decode takes them
        registered: two clocks after a change, at most, no sooner than a payload word
        of a header taken at once).
    return_budget : In(32)
        Pages GET may still grant, the uncommitted grants deducted; all-ones =
        unlimited (C10).
    effects : Out(stream.Signature(CommandEffects))
        One per command, taken together with its result.
    hold : In(1)
        Take no new command (the core changes the extra range, C8).
    idle : Out(1)
        No command in progress.
    """

    def __init__(self, page_bits, grant_limit=512):
        self._page_bits = page_bits
        self._grant_limit = grant_limit
        super().__init__({
            "command": In(CommandSignature()),
            "bitmap_request": Out(stream.Signature(bitmap_request_layout(page_bits, OpTag))),
            "bitmap_response": In(stream.Signature(bitmap_response_layout(OpTag),
                                                   always_ready=True)),
            "page_shift": In(6),
            "window_base": In(64),
            "extra_first": In(page_bits + 1),
            "extra_end": In(page_bits + 1),
            "extra_mem": In(1),
            "return_budget": In(32),
            "effects": Out(stream.Signature(CommandEffects)),
            "hold": In(1),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        page_bits = self._page_bits
        header, words, result = self.command.header, self.command.words, self.command.result
        beat = words.payload
        events = Signal(CommandEffects)     # this cycle's responses and skipped words

        sizes = Signal(_Sizes)
        malformed = Signal()
        kind = Signal(2)                    # a GuestCmd value, once the command is well formed
        # The decode's side of the command whose payload is being taken (set with its code
        # word, which may be a clock or more before the command before has its result):
        decode_kind = Signal(2)
        started = Signal()                  # a payload word was taken
        # Payload words left, signed (they may go below zero): pages GET may still grant
        # (the return budget when it started and the grant limit), wanted EXCHANGE pages.
        grants_left = Signal(signed(34))
        wanted_left = Signal(signed(34))
        addresses = Signal(32)              # payload words: N, or 2N for EXCHANGE
        granted = Signal(32)                # K
        refused = Signal()                  # this GET has had its first refusal
        # Operations handed to the bitmap without their response yet.
        in_flight = Signal(signed(5))

        is_get = kind == c.GuestCmd.GET_PAGES.value
        is_give = kind == c.GuestCmd.GIVE_PAGES.value
        is_exchange = kind == c.GuestCmd.EXCHANGE_PAGES.value
        payload_taken = Signal()
        error_beat = words.valid & words.payload.error
        # The payload beat in the first decode stage is the next command's, taken ahead:
        # it goes on once the command before has its result (first_waits_now: in that clock).
        first_waits = Signal()
        first_waits_now = Signal()
        m.d.comb += first_waits_now.eq(first_waits)

        # --- The window's bounds, registered (C4, C8) ------------------------------------
        # They change only between commands (the page size at negotiation, the extra range
        # while no command runs) and settle two clocks after their inputs; the decode uses
        # them no earlier than two clocks after it takes a header.
        page_mask = Signal(64)              # the offset bits within a page
        window_start = Signal(64)           # window_base rounded down to the page size
        high_mask = Signal(64)              # the address bits above the window's size
        base_page = Signal(page_bits)       # window_start's page-number bits
        # window_start's high bits plus one: the window's second aligned block of its size
        # (bit 64: there is none, the window ends at 2**64).
        next_start = Signal(65)
        # The extra range in raw page bits (base_page + page, modulo the window's pages):
        # extra_low .. extra_high - 1, or with extra_wraps from extra_low up and below
        # extra_high (the whole window too: extra_low == extra_high).
        extra_low = Signal(page_bits)
        extra_high = Signal(page_bits)
        extra_some = Signal()
        extra_wraps = Signal()
        page_mask_now = ~(_ADDRESS_ONES << self.page_shift)[:64]
        m.d.sync += [
            page_mask.eq(page_mask_now),
            window_start.eq(self.window_base & ~page_mask_now),
            high_mask.eq((_ADDRESS_ONES << (self.page_shift + page_bits))[:64]),
            base_page.eq((self.window_base >> self.page_shift)[:page_bits]),
            next_start.eq((window_start | ~high_mask) + 1),
            extra_low.eq(base_page + self.extra_first),
            extra_high.eq(base_page + self.extra_end),
            extra_some.eq(self.extra_end > self.extra_first),
            extra_wraps.eq((base_page + self.extra_first)[page_bits] !=
                           (base_page + self.extra_end)[page_bits]),
        ]

        # --- Decode, first stage: a payload word's raw page bits and where it lies ---------
        # (C4 granularity = the negotiated page size; C8: page = (address - window_start)
        # >> page_shift.) For an aligned address the page is its raw page bits less
        # base_page, modulo the window, and the address is in the window if its bits above
        # the window's size are window_start's (no borrow) or next_start's (a borrow): no
        # 64-bit subtraction or comparison.
        word_layout = data.StructLayout({
            "present": 1,
            "misaligned": 1,
            "in_first": 1,                  # high bits those of window_start
            "in_second": 1,                 # of next_start
            "raw": page_bits,
            "grant_room": 1,                # the budget and the grant limit cover it (GET)
            "wanted": 1,                    # the first half of EXCHANGE
            "chained": 1,                   # not the command's first payload word
        })
        first = Signal(data.ArrayLayout(word_layout, LANES))
        first_valid = Signal()
        first_get = Signal()                # the words in the first stage are a GET's
        # A GET's first beat taken ahead has its grant room from the budget as it goes on
        # (the first words of a command: word i is granted if the budget is above i).
        budget_room_now = Signal()
        budget_room = Cat((self.return_budget > lane) & (self._grant_limit > lane)
                          for lane in range(LANES))
        first_decoded = Signal.like(first)
        for lane in range(LANES):
            address = beat.data[lane]
            word = first_decoded[lane]
            m.d.comb += [
                word.present.eq(lane < beat.count),
                word.misaligned.eq((address & page_mask).any()),
                word.in_first.eq(~((address ^ window_start) & high_mask).any()),
                word.in_second.eq(~next_start[64] &
                                  ~((address ^ next_start[:64]) & high_mask).any()),
                word.raw.eq((address >> self.page_shift)[:page_bits]),
                word.grant_room.eq(grants_left > lane),
                word.wanted.eq((decode_kind == c.GuestCmd.EXCHANGE_PAGES.value) &
                               (wanted_left > lane)),
                word.chained.eq(started | (lane != 0)),
            ]

        # --- Decode, second stage: one lane of a bitmap request per word --------------------
        # - GIVE and the second half of EXCHANGE: SET. An invalid address is counted by kind
        #   (misaligned first, then out of window) and its lane left disabled.
        # - the first half of EXCHANGE: CLEAR, refused for extra memory without EXTRA_MEM.
        # - GET: a chained CLEAR, allowed when valid, grantable and within grants_left; an
        #   invalid one is never allowed and tagged with its kind.
        decoded = Signal(self.bitmap_request.payload.shape())
        skipped_misaligned = Signal(LANES)
        skipped_out_of_window = Signal(LANES)
        skipped = Signal(data.ArrayLayout(2, LANES))    # misaligned, out of window
        for lane in range(LANES):
            word = first[lane]
            page = Signal(page_bits + 1, name=f"page{lane}")
            m.d.comb += page.eq(word.raw - base_page)
            in_window = Mux(page[page_bits], word.in_second, word.in_first)
            valid = ~word.misaligned & in_window
            above_low = word.raw >= extra_low
            below_high = word.raw < extra_high
            in_extra = extra_some & Mux(extra_wraps, above_low | below_high,
                                        above_low & below_high)
            grantable = ~in_extra | self.extra_mem
            operation = decoded.lanes[lane]
            m.d.comb += [
                operation.page.eq(page[:page_bits]),
                operation.enable.eq(word.present & (first_get | valid)),
            ]
            with m.If(first_get):
                m.d.comb += [
                    operation.action.eq(BitmapAction.CLEAR),
                    operation.allowed.eq(valid & grantable &
                                         Mux(budget_room_now, budget_room[lane],
                                             word.grant_room)),
                    operation.chained.eq(word.chained),
                    operation.tag.eq(Mux(valid, OpTag.GRANT,
                                         Mux(word.misaligned, OpTag.GRANT_MISALIGNED,
                                             OpTag.GRANT_OUT_OF_WINDOW))),
                ]
            with m.Elif(word.wanted):
                m.d.comb += [
                    operation.action.eq(BitmapAction.CLEAR),
                    operation.allowed.eq(grantable),
                    operation.tag.eq(OpTag.LEAVE),
                ]
            with m.Else():
                m.d.comb += [
                    operation.action.eq(BitmapAction.SET),
                    operation.allowed.eq(1),
                    operation.tag.eq(OpTag.ENTER),
                ]
            # GIVE/EXCHANGE: an invalid address is counted (a clock later) and skipped.
            skip = first_valid & word.present & ~first_get & ~valid
            m.d.comb += [skipped[lane][0].eq(skip & word.misaligned),
                         skipped[lane][1].eq(skip & ~word.misaligned)]

        # --- The decoded request waits here while the bitmap is busy ------------------------
        request_valid = Signal()
        request = Signal.like(decoded)
        m.d.comb += [
            self.bitmap_request.valid.eq(request_valid),
            self.bitmap_request.payload.eq(request),
        ]
        issued = self.bitmap_request.valid & self.bitmap_request.ready
        advance = ~request_valid | self.bitmap_request.ready
        load_request = advance & ~first_waits_now
        m.d.sync += [skipped_misaligned.eq(0), skipped_out_of_window.eq(0)]
        with m.If(load_request):
            m.d.sync += [
                request_valid.eq(first_valid & Cat(lane.enable for lane in decoded.lanes).any()),
                request.eq(decoded),
                first_valid.eq(payload_taken),
                skipped_misaligned.eq(Cat(lane[0] for lane in skipped)),
                skipped_out_of_window.eq(Cat(lane[1] for lane in skipped)),
            ]
        with m.Elif(advance):
            m.d.sync += request_valid.eq(0)     # issued; the first stage's beat waits
        with m.If(payload_taken):
            m.d.sync += [
                first.eq(first_decoded),
                first_get.eq(decode_kind == c.GuestCmd.GET_PAGES.value),
                started.eq(1),
                grants_left.eq(grants_left - beat.count),
                wanted_left.eq(wanted_left - beat.count),
            ]

        # --- Responses, counted a clock after they come (timing) ----------------------------
        response = Signal.like(self.bitmap_response.payload)
        response_valid = Signal()
        m.d.sync += [response.eq(self.bitmap_response.payload),
                     response_valid.eq(self.bitmap_response.valid)]
        entered, double_give, left, not_in_balloon, grants = [], [], [], [], []
        refusals = {OpTag.GRANT_MISALIGNED: [], OpTag.GRANT_OUT_OF_WINDOW: []}
        refused_before = refused
        for lane in response.lanes:
            valid = response_valid & lane.enable
            tag, changed = lane.tag, lane.changed
            grant_tag = (tag == OpTag.GRANT) | (tag == OpTag.GRANT_MISALIGNED) | \
                (tag == OpTag.GRANT_OUT_OF_WINDOW)
            refusal = valid & grant_tag & ~changed
            first_refusal = refusal & ~refused_before
            refused_before = refused_before | refusal
            for refusal_tag, firsts in refusals.items():
                firsts.append(first_refusal & (tag == refusal_tag))
            entered.append(valid & (tag == OpTag.ENTER) & changed)
            double_give.append(valid & (tag == OpTag.ENTER) & ~changed)
            left.append(valid & (tag != OpTag.ENTER) & changed)
            not_in_balloon.append(valid & (tag == OpTag.LEAVE) & ~changed)
            grants.append(valid & (tag == OpTag.GRANT) & changed)
        m.d.sync += refused.eq(refused_before)
        # In flight until the response comes: it is counted in the next clock, before the
        # result can be offered. (Which lanes answer is known early, from the bitmap's
        # registers.)
        handed_over = _count([issued & lane.enable for lane in request.lanes])
        coming = self.bitmap_response
        m.d.sync += in_flight.eq(in_flight + handed_over -
                                 _count([coming.valid & lane.enable
                                         for lane in coming.payload.lanes]))
        m.d.comb += [
            events.violation_misaligned.eq(
                _count(list(skipped_misaligned) + refusals[OpTag.GRANT_MISALIGNED])),
            events.violation_out_of_window.eq(
                _count(list(skipped_out_of_window) + refusals[OpTag.GRANT_OUT_OF_WINDOW])),
            events.pages_entered.eq(_count(entered)),
            events.violation_double_give.eq(_count(double_give)),
            events.pages_left.eq(_count(left)),
            events.violation_not_in_balloon.eq(_count(not_in_balloon)),
            events.granted.eq(_count(grants)),
        ]
        m.d.sync += granted.eq(granted + events.granted)
        # The command's totals: every event is in them by the time the result is offered.
        totals = Signal(CommandEffects)
        for name in _PAGE_COUNTS:
            m.d.sync += getattr(totals, name).eq(getattr(totals, name) + getattr(events, name))
        effects = self.effects.payload
        for name in _PAGE_COUNTS:
            m.d.comb += getattr(effects, name).eq(getattr(totals, name))

        # --- One command after the other ------------------------------------------------------
        header_sizes = Signal(_Sizes)       # of the header offered
        readable, writable = header.payload.readable, header.payload.writable
        m.d.comb += [
            header_sizes.count.eq(readable[3:] - 1),
            header_sizes.empty.eq(readable == 0),
            header_sizes.sized.eq((readable[:3] == 0) & (readable[3:] > 1)),
            header_sizes.even.eq(readable[3]),
            header_sizes.writes_8.eq(writable == 8),
            header_sizes.writes_none.eq(writable == 0),
        ]
        # While a command finishes, the next one's header and code word are taken ahead
        # (unless the core holds commands back), then its first payload beat into the
        # first decode stage, so that its operations follow the result at once (a GET's
        # once the budget counts the command before, C10). They reach the bitmap only
        # after the result: the committed copy's boundary (the effects) falls between two
        # commands' writes (C7).
        ahead_header = Signal()             # the next header was taken
        ahead_sizes = Signal(_Sizes)
        ahead_code = Signal()               # and its code word
        ahead_well_formed = Signal()
        ahead_kind = Signal(2)
        ahead_error = Signal()
        ahead_last = Signal()
        first_last = Signal()               # the beat taken ahead was the payload's last
        first_count = Signal.like(beat.count)   # and held these words

        effects_pushed = Signal()           # the effects went to the core a clock ago
        m.d.sync += effects_pushed.eq(self.effects.valid & self.effects.ready)

        def begin_header(header_sizes):
            m.d.sync += [
                sizes.eq(header_sizes),
                malformed.eq(1),
                granted.eq(0),
                totals.eq(0),
            ]

        def take_header():
            """Takes the next command's header unless the core holds commands back."""
            m.d.comb += header.ready.eq(~self.hold)
            with m.If(header.valid & ~self.hold):
                begin_header(header_sizes)
                with m.If(header_sizes.empty):
                    m.next = "Finish"
                with m.Else():
                    m.next = "Code"

        def begin_decode(code_kind, code_count):
            """The decode's side of a command whose code word is taken."""
            m.d.sync += [
                decode_kind.eq(code_kind),
                started.eq(0),
                wanted_left.eq(code_count[1:]),
            ]

        def begin_code(code_well_formed, code_kind, code_count, code_error, code_last,
                       payload_state):
            """Starts the command whose code word was checked (``payload_state`` once it
            is well formed): its result's side."""
            m.d.sync += [
                malformed.eq(~code_well_formed),
                kind.eq(code_kind),
                addresses.eq(code_count),
                refused.eq(0),
            ]
            with m.If(code_error):
                m.next = "Faulted"
            with m.Elif(code_well_formed):
                m.next = payload_state
            with m.Elif(code_last):
                m.next = "Finish"
            with m.Else():
                m.next = "Drain"

        def begin_ahead(payload_state):
            """Starts the command whose code word was taken ahead."""
            begin_code(ahead_well_formed, ahead_kind, ahead_sizes.count, ahead_error,
                       ahead_last, payload_state)

        def release_first():
            """The beat taken ahead goes on to the bitmap in this clock."""
            m.d.comb += first_waits_now.eq(0)
            m.d.sync += first_waits.eq(0)

        def take_budget(taken=0):
            """The grants this GET may make: the return budget now, at most the limit,
            less the ``taken`` words of a beat taken ahead."""
            m.d.sync += grants_left.eq(Mux(self.return_budget < self._grant_limit,
                                           self.return_budget, self._grant_limit) - taken)

        def look_ahead():
            """Takes the next command's header, then its code word, into ``ahead_*``, then
            its first payload beat into the first decode stage."""
            with m.If(~ahead_header):
                m.d.comb += header.ready.eq(~self.hold)
                with m.If(header.valid & ~self.hold):
                    m.d.sync += [
                        ahead_header.eq(1),
                        ahead_sizes.eq(header_sizes),
                    ]
            with m.Elif(~ahead_code & ~ahead_sizes.empty):
                m.d.comb += words.ready.eq(1)
                code_well_formed = _checked_code(beat.data[0], ahead_sizes)
                with m.If(words.valid):
                    m.d.sync += [
                        ahead_code.eq(1),
                        ahead_well_formed.eq(code_well_formed),
                        ahead_kind.eq(beat.data[0][:2]),
                        ahead_error.eq(error_beat),
                        ahead_last.eq(beat.last),
                    ]
                    begin_decode(beat.data[0][:2], ahead_sizes.count)
            with m.Elif(ahead_code & ahead_well_formed & ~ahead_error & ~first_waits):
                # A beat with a data fault is left for "Payload" to see (C7).
                m.d.comb += [
                    words.ready.eq(advance & ~words.payload.error),
                    payload_taken.eq(words.valid & words.ready),
                ]
                with m.If(payload_taken):
                    m.d.sync += [first_waits.eq(1), first_last.eq(beat.last),
                                 first_count.eq(beat.count)]

        with m.FSM():
            with m.State("Header"):
                m.d.comb += self.idle.eq(1)
                take_header()

            with m.State("Code"):
                # The first beat holds the code word alone (interface.CommandWords). A GET
                # right after a command's effects went to the core waits a clock: the
                # core's return budget counts them two clocks after (C10).
                code = beat.data[0]
                code_well_formed = _checked_code(code, sizes)
                budget_settling = (code == c.GuestCmd.GET_PAGES.value) & effects_pushed
                m.d.comb += words.ready.eq(~budget_settling)
                with m.If(words.valid & ~budget_settling):
                    take_budget()
                    begin_decode(code[:2], sizes.count)
                    begin_code(code_well_formed, code[:2], sizes.count, error_beat,
                               beat.last, "Payload")

            with m.State("Budget"):
                # A GET whose code word was taken ahead: the budget as in "Code". A first
                # beat taken ahead goes on now, its lanes' grant room from the budget.
                with m.If(~effects_pushed & first_waits):
                    take_budget(first_count)
                    m.d.comb += budget_room_now.eq(1)
                    release_first()
                    with m.If(first_last):
                        m.next = "Finish"
                    with m.Else():
                        m.next = "Payload"
                with m.Elif(~effects_pushed):
                    take_budget()
                    m.next = "Payload"

            with m.State("Payload"):
                m.d.comb += [
                    words.ready.eq(advance),
                    payload_taken.eq(words.valid & words.ready & ~words.payload.error),
                ]
                with m.If(error_beat & words.ready):
                    m.next = "Faulted"
                with m.Elif(payload_taken & beat.last):
                    m.next = "Finish"

            with m.State("Finish"):
                # K and the counts are final once the last operation has its response; the
                # core has room for the effects before the result is offered.
                look_ahead()
                with m.If((~first_valid | first_waits) & ~request_valid & (in_flight == 0) &
                          self.effects.ready):
                    m.next = "Result"

            with m.State("Drain"):
                m.d.comb += words.ready.eq(1)
                with m.If(error_beat):
                    m.next = "Faulted"
                with m.Elif(words.valid & beat.last):
                    m.next = "Finish"

            with m.State("Faulted"):
                pass                            # until the core's abort resets us

            with m.State("Result"):
                get_result = is_get & ~malformed
                m.d.comb += [
                    result.valid.eq(1),
                    result.payload.used_len.eq(Mux(get_result, 8, 0)),
                    result.payload.write_data.eq(granted),
                    result.payload.write_count.eq(Mux(get_result, 8, 0)),
                    self.effects.valid.eq(result.ready),
                    effects.cmd_malformed.eq(malformed),
                    effects.cmd_give.eq(~malformed & is_give),
                    effects.cmd_get.eq(~malformed & is_get),
                    effects.cmd_exchange.eq(~malformed & is_exchange),
                    effects.get_short.eq(~malformed & is_get & (granted < addresses)),
                    effects.granted.eq(granted),
                ]
                with m.If(~result.ready):
                    look_ahead()
                with m.Elif(ahead_header):
                    # The next command was taken ahead: its payload follows at once.
                    begin_header(ahead_sizes)
                    m.d.sync += [ahead_header.eq(0), ahead_code.eq(0)]
                    ahead_get = ahead_kind == c.GuestCmd.GET_PAGES.value
                    with m.If(ahead_sizes.empty):
                        m.next = "Finish"
                    with m.Elif(ahead_code & ahead_get):
                        begin_ahead("Budget")
                    with m.Elif(first_waits):
                        release_first()
                        with m.If(first_last):
                            begin_ahead("Finish")
                        with m.Else():
                            begin_ahead("Payload")
                    with m.Elif(ahead_code):
                        begin_ahead("Payload")
                    with m.Else():
                        m.next = "Code"
                with m.Else():
                    # The next header in the same clock: commands back to back.
                    m.next = "Header"
                    take_header()
        return m
