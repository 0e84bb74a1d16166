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


class CommandExecutor(wiring.Component):
    """Executes each todevq command (C5) on the bitmap (C8), two pages a clock.

    A command is checked from its header and first word before anything changes; a
    malformed one (unknown code, readable length not a multiple of 8, no payload, EXCHANGE
    with an odd payload count, GET without exactly 8 writable bytes, writable bytes on
    GIVE or EXCHANGE) is drained and completed with ``used_len`` 0.

    The first beat holds the code alone; each later beat holds up to ``LANES`` payload
    words (word ``i`` in lane ``i % 2``). Each lane is decoded in the cycle its
    beat is taken (C4: granularity = the negotiated page size; C8: the window starts at
    ``window_base`` rounded down to the page size, page = ``(address - base) >>
    page_shift``) into one lane of a bitmap request, one beat per clock:

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
      ``i < budget`` per lane on the budget taken when the GET starts (C10): a host write
      of the budget takes effect from the next GET. The bitmap's chaining (across lanes
      and beats) stops the prefix at the first page whose bit is clear. An invalid
      address goes to the bitmap too, as an operation that is never allowed: it stops
      the prefix, and its violation is counted only if it is the first refusal (the
      addresses after it are not looked at). A valid page that cannot be granted counts
      nothing but ``get_short``.

    A GET also stops at ``grant_limit`` pages (C5's per-command grant limit, a build
    parameter: ``DeviceParams.get_grant_limit``): a longer GET is a prefix grant.

    Every command completes once its last operation has its response (GET writes K,
    le64), and hands its :class:`CommandEffects` to the balloon core with its result:
    the counters, ``balloon_pages`` and the budget change only when the command commits
    (C7), and the bitmap's committed copy knows where the command's writes end
    (``effects`` handshake = ``CommittedBitmap.boundary``). A word beat with ``error``
    (its data could not be read, C7) stops the executor without a result until it is
    reset (the core's abort restores what the command changed).

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

        readable = Signal(32)
        writable = Signal(32)
        malformed = Signal()
        kind = Signal(2)                    # a GuestCmd value, once the command is well formed
        addresses = Signal(32)              # payload words: N, or 2N for EXCHANGE
        index = Signal(32)                  # payload words taken so far
        budget = Signal(32)                 # the return budget when the GET started
        granted = Signal(32)                # K
        refused = Signal()                  # this GET has had its first refusal
        # Operations handed to the bitmap without their response yet. A split beat's
        # first lane may answer before the beat is taken: the count dips below zero then.
        in_flight = Signal(signed(4))

        is_get = kind == c.GuestCmd.GET_PAGES.value
        is_give = kind == c.GuestCmd.GIVE_PAGES.value
        is_exchange = kind == c.GuestCmd.EXCHANGE_PAGES.value
        page_mask = ~(_ADDRESS_ONES << self.page_shift)[:64]
        window_start = self.window_base & ~page_mask
        # The offset bits that put a page past the window, as a mask: the window check no
        # longer waits for the page-number shifter (timing).
        beyond_window = (_ADDRESS_ONES << (self.page_shift + page_bits))[:64]
        unlimited = budget == c.MGMT_UNLIMITED_BUDGET
        payload_taken = Signal()
        error_beat = words.valid & words.payload.error

        # --- Decode of the payload words, one per lane (C4, C5, C8) -------------------------
        decoded = Signal(self.bitmap_request.payload.shape())
        skipped_misaligned, skipped_out_of_window = [], []
        for lane in range(LANES):
            address = beat.data[lane]
            position = index + lane         # the payload word's index in the command
            present = lane < beat.count
            misaligned = (address & page_mask).any()
            offset = address - window_start                 # bit 64 set: below the window
            page_number = offset[:64] >> self.page_shift
            in_window = ~offset[64] & ~(offset[:64] & beyond_window).any()
            valid = ~misaligned & in_window
            page = page_number[:page_bits]
            in_extra = (page >= self.extra_first) & (page < self.extra_end)
            grantable = ~in_extra | self.extra_mem
            wanted = is_exchange & (position < addresses[1:])

            operation = decoded.lanes[lane]
            m.d.comb += [
                operation.page.eq(page),
                operation.enable.eq(present & (is_get | valid)),
            ]
            with m.If(is_get):
                m.d.comb += [
                    operation.action.eq(BitmapAction.CLEAR),
                    operation.allowed.eq(valid & grantable &
                                         (unlimited | (position < budget)) &
                                         (position < self._grant_limit)),
                    operation.chained.eq(position != 0),
                    operation.tag.eq(Mux(valid, OpTag.GRANT,
                                         Mux(misaligned, OpTag.GRANT_MISALIGNED,
                                             OpTag.GRANT_OUT_OF_WINDOW))),
                ]
            with m.Elif(wanted):
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
            # GIVE/EXCHANGE: an invalid address is counted and skipped.
            skipped = payload_taken & present & ~is_get & ~valid
            skipped_misaligned.append(skipped & misaligned)
            skipped_out_of_window.append(skipped & ~misaligned)

        # --- The decoded request waits here while the bitmap is busy ------------------------
        request_valid = Signal()
        request = Signal.like(decoded)
        m.d.comb += [
            self.bitmap_request.valid.eq(request_valid),
            self.bitmap_request.payload.eq(request),
        ]
        issued = self.bitmap_request.valid & self.bitmap_request.ready
        with m.If(self.bitmap_request.ready):
            m.d.sync += request_valid.eq(0)
        with m.If(payload_taken):
            m.d.sync += [
                request_valid.eq(Cat(lane.enable for lane in decoded.lanes).any()),
                request.eq(decoded),
            ]

        # --- Responses ------------------------------------------------------------------------
        response = self.bitmap_response
        answered, entered, double_give, left, not_in_balloon, grants = [], [], [], [], [], []
        refusals = {OpTag.GRANT_MISALIGNED: [], OpTag.GRANT_OUT_OF_WINDOW: []}
        refused_before = refused
        for lane in response.payload.lanes:
            valid = response.valid & lane.enable
            tag, changed = lane.tag, lane.changed
            grant_tag = (tag == OpTag.GRANT) | (tag == OpTag.GRANT_MISALIGNED) | \
                (tag == OpTag.GRANT_OUT_OF_WINDOW)
            refusal = valid & grant_tag & ~changed
            first_refusal = refusal & ~refused_before
            refused_before = refused_before | refusal
            for refusal_tag, firsts in refusals.items():
                firsts.append(first_refusal & (tag == refusal_tag))
            answered.append(valid)
            entered.append(valid & (tag == OpTag.ENTER) & changed)
            double_give.append(valid & (tag == OpTag.ENTER) & ~changed)
            left.append(valid & (tag != OpTag.ENTER) & changed)
            not_in_balloon.append(valid & (tag == OpTag.LEAVE) & ~changed)
            grants.append(valid & (tag == OpTag.GRANT) & changed)
        m.d.sync += refused.eq(refused_before)
        handed_over = _count([issued & lane.enable for lane in request.lanes])
        m.d.sync += in_flight.eq(in_flight + handed_over - _count(answered))
        # A GET has all its responses before the next command's words are taken, so the
        # skipped addresses and a first refusal never add up in one cycle.
        m.d.comb += [
            events.violation_misaligned.eq(
                _count(skipped_misaligned + refusals[OpTag.GRANT_MISALIGNED])),
            events.violation_out_of_window.eq(
                _count(skipped_out_of_window + refusals[OpTag.GRANT_OUT_OF_WINDOW])),
            events.pages_entered.eq(_count(entered)),
            events.violation_double_give.eq(_count(double_give)),
            events.pages_left.eq(_count(left)),
            events.violation_not_in_balloon.eq(_count(not_in_balloon)),
            events.granted.eq(_count(grants)),
        ]
        m.d.sync += granted.eq(granted + events.granted)
        # The command's totals, a clock behind its responses (timing): what a cycle adds
        # is registered first.
        totals = Signal(CommandEffects)
        late = Signal(CommandEffects)
        m.d.sync += late.eq(events)
        for name in _PAGE_COUNTS:
            m.d.sync += getattr(totals, name).eq(getattr(totals, name) + getattr(late, name))
        effects = self.effects.payload
        for name in _PAGE_COUNTS:
            m.d.comb += getattr(effects, name).eq(getattr(totals, name) + getattr(late, name))

        # --- One command after the other ------------------------------------------------------
        code = beat.data[0]
        count = (readable >> 3) - 1
        code_get = code == c.GuestCmd.GET_PAGES.value
        code_give = code == c.GuestCmd.GIVE_PAGES.value
        code_exchange = code == c.GuestCmd.EXCHANGE_PAGES.value
        well_formed = ((code_get | code_give | code_exchange) &
                       (readable[:3] == 0) & (count != 0) &
                       ~(code_exchange & count[0]) &
                       Mux(code_get, writable == 8, writable == 0))

        effects_pushed = Signal()           # the effects went to the core a clock ago
        m.d.sync += effects_pushed.eq(self.effects.valid & self.effects.ready)

        def take_header():
            """Takes the next command's header unless the core holds commands back."""
            m.d.comb += header.ready.eq(~self.hold)
            with m.If(header.valid & ~self.hold):
                m.d.sync += [
                    readable.eq(header.payload.readable),
                    writable.eq(header.payload.writable),
                    malformed.eq(1),
                    granted.eq(0),
                    totals.eq(0),
                ]
                with m.If(header.payload.readable == 0):
                    m.next = "Finish"
                with m.Else():
                    m.next = "Code"

        with m.FSM():
            with m.State("Header"):
                m.d.comb += self.idle.eq(1)
                take_header()

            with m.State("Code"):
                # The first beat holds the code word alone (interface.CommandWords). A GET
                # right after a command's effects went to the core waits a clock: the
                # core's return budget counts them two clocks after (C10).
                budget_settling = code_get & effects_pushed
                m.d.comb += words.ready.eq(~budget_settling)
                with m.If(words.valid & ~budget_settling):
                    m.d.sync += [
                        malformed.eq(~well_formed),
                        kind.eq(code[:2]),
                        addresses.eq(count),
                        index.eq(0),
                        refused.eq(0),
                        budget.eq(self.return_budget),
                    ]
                    with m.If(error_beat):
                        m.next = "Faulted"
                    with m.Elif(well_formed):
                        m.next = "Payload"
                    with m.Elif(beat.last):
                        m.next = "Finish"
                    with m.Else():
                        m.next = "Drain"

            with m.State("Payload"):
                m.d.comb += [
                    words.ready.eq(~request_valid | self.bitmap_request.ready),
                    payload_taken.eq(words.valid & words.ready & ~words.payload.error),
                ]
                with m.If(error_beat & words.ready):
                    m.next = "Faulted"
                with m.Elif(payload_taken):
                    m.d.sync += index.eq(index + beat.count)
                    with m.If(beat.last):
                        m.next = "Finish"

            with m.State("Finish"):
                # K and the counts are final once the last operation has its response; the
                # core has room for the effects before the result is offered.
                with m.If(~request_valid & (in_flight == 0) & self.effects.ready):
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
                with m.If(result.ready):
                    # The next header in the same clock: commands back to back.
                    m.next = "Header"
                    take_header()
        return m
