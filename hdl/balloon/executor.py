"""The todevq command executor (C5): GIVE_PAGES, GET_PAGES and EXCHANGE_PAGES."""

from amaranth.hdl import Const, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from memballoon import constants as c

from ..virtio.interface import CommandSignature
from .bitmap import BitmapAction, bitmap_request_layout, bitmap_response_layout

_ADDRESS_ONES = Const(2 ** 64 - 1, 64)


class OpTag(enum.Enum, shape=3):
    """What a bitmap request is for, so that its response is counted right."""
    ENTER = 0               # GIVE, or the second half of EXCHANGE
    LEAVE = 1               # the wanted half of EXCHANGE
    GRANT = 2               # GET
    GRANT_MISALIGNED = 3    # GET of an invalid address: never granted, counted if it is
    GRANT_OUT_OF_WINDOW = 4  # the first refusal


class ExecutorEvents(data.Struct):
    """One-cycle strobes; the names match :class:`.interface.BalloonCounters`."""
    cmd_give: 1
    cmd_get: 1
    cmd_exchange: 1
    cmd_malformed: 1
    violation_misaligned: 1
    violation_out_of_window: 1
    violation_double_give: 1
    violation_not_in_balloon: 1
    get_short: 1
    pages_entered: 1
    pages_left: 1
    #: A GET granted a page: one page of the return budget is spent (C10).
    granted: 1


class CommandExecutor(wiring.Component):
    """Executes each todevq command (C5) on the bitmap (C8).

    A command is checked from its header and first word before anything changes; a
    malformed one (unknown code, readable length not a multiple of 8, no payload, EXCHANGE
    with an odd payload count, GET without exactly 8 writable bytes, writable bytes on
    GIVE or EXCHANGE) is drained and completed with ``used_len`` 0.

    Each payload word is decoded in the cycle it is taken (C4: granularity = the
    negotiated page size; C8: the window starts at ``window_base`` rounded down to the
    page size, page = ``(address - base) >> page_shift``) into one bitmap request, one
    word per clock:

    - GIVE and the second half of EXCHANGE: SET. An invalid address is counted by kind
      (misaligned first, then out of window) and skipped; a refused SET is a double give.
    - the first half of EXCHANGE: CLEAR, refused for a page of the extra range without
      EXTRA_MEM (C8); a refused CLEAR is counted as not in the balloon. Its pages leave
      before the second half's enter because the bitmap keeps request order.
    - GET: a chained CLEAR per address, allowed when the address is valid, the page is
      not extra memory without EXTRA_MEM (C8), and the budget covers it. Because grants
      are a prefix, page ``i`` is granted only after ``i`` grants, so the budget check is
      ``i < budget`` on the budget taken when the GET starts (C10): a host write of the
      budget takes effect from the next GET. The bitmap's chaining stops the prefix at
      the first page whose bit is clear. An invalid address goes to the bitmap too, as a
      request that is never allowed: it stops the prefix, and its violation is counted
      only if it is the first refusal (the addresses after it are not looked at). A
      valid page that cannot be granted counts nothing but ``get_short``.

    GIVE and EXCHANGE complete as soon as their last word is taken (their result does not
    depend on the bitmap); GET waits for its last response and writes K (le64).

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
        Pages GET may still grant; all-ones = unlimited (C10).
    events : Out(ExecutorEvents)
    """

    def __init__(self, page_bits):
        self._page_bits = page_bits
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
            "events": Out(ExecutorEvents),
        })

    def elaborate(self, platform):
        m = Module()
        page_bits = self._page_bits
        header, words, result = self.command.header, self.command.words, self.command.result
        word = words.payload
        events = self.events

        readable = Signal(32)
        writable = Signal(32)
        malformed = Signal()
        kind = Signal(2)                    # a GuestCmd value, once the command is well formed
        addresses = Signal(32)              # payload words: N, or 2N for EXCHANGE
        index = Signal(32)                  # payload words taken so far
        budget = Signal(32)                 # the return budget when the GET started
        granted = Signal(32)                # K
        refused = Signal()                  # this GET has had its first refusal
        in_flight = Signal(2)               # bitmap requests without their response yet

        is_get = kind == c.GuestCmd.GET_PAGES.value
        is_give = kind == c.GuestCmd.GIVE_PAGES.value
        is_exchange = kind == c.GuestCmd.EXCHANGE_PAGES.value

        # --- Decode of the payload word (C4, C5, C8) ----------------------------------------
        address = word.data
        page_mask = ~(_ADDRESS_ONES << self.page_shift)[:64]
        misaligned = (address & page_mask).any()
        offset = address - (self.window_base & ~page_mask)     # bit 64 set: below the window
        page_number = offset[:64] >> self.page_shift
        in_window = ~offset[64] & (page_number[page_bits:] == 0)
        valid = ~misaligned & in_window
        page = page_number[:page_bits]
        in_extra = (page >= self.extra_first) & (page < self.extra_end)
        grantable = ~in_extra | self.extra_mem
        unlimited = budget == c.MGMT_UNLIMITED_BUDGET
        wanted = is_exchange & (index < addresses[1:])

        decoded = Signal(self.bitmap_request.payload.shape())
        m.d.comb += decoded.page.eq(page)
        with m.If(is_get):
            m.d.comb += [
                decoded.action.eq(BitmapAction.CLEAR),
                decoded.allowed.eq(valid & grantable & (unlimited | (index < budget))),
                decoded.chained.eq(index != 0),
                decoded.tag.eq(Mux(valid, OpTag.GRANT, Mux(misaligned, OpTag.GRANT_MISALIGNED,
                                                           OpTag.GRANT_OUT_OF_WINDOW))),
            ]
        with m.Elif(wanted):
            m.d.comb += [
                decoded.action.eq(BitmapAction.CLEAR),
                decoded.allowed.eq(grantable),
                decoded.tag.eq(OpTag.LEAVE),
            ]
        with m.Else():
            m.d.comb += [
                decoded.action.eq(BitmapAction.SET),
                decoded.allowed.eq(1),
                decoded.tag.eq(OpTag.ENTER),
            ]

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
        payload_taken = Signal()
        skipped = payload_taken & ~is_get & ~valid      # GIVE/EXCHANGE: counted, skipped
        with m.If(payload_taken & (is_get | valid)):
            m.d.sync += [request_valid.eq(1), request.eq(decoded)]

        # --- Responses ------------------------------------------------------------------------
        response = self.bitmap_response
        tag, changed = response.payload.tag, response.payload.changed
        m.d.sync += in_flight.eq(in_flight + issued - response.valid)
        grant_tag = (tag == OpTag.GRANT) | (tag == OpTag.GRANT_MISALIGNED) | \
            (tag == OpTag.GRANT_OUT_OF_WINDOW)
        first_refusal = response.valid & grant_tag & ~changed & ~refused
        with m.If(first_refusal):
            m.d.sync += refused.eq(1)
        # A GET has all its responses before the next command's words are taken, so these
        # never count one address of each kind in the same cycle.
        m.d.comb += [
            events.violation_misaligned.eq(skipped & misaligned |
                                           first_refusal & (tag == OpTag.GRANT_MISALIGNED)),
            events.violation_out_of_window.eq(skipped & ~misaligned |
                                              first_refusal &
                                              (tag == OpTag.GRANT_OUT_OF_WINDOW)),
            events.pages_entered.eq(response.valid & (tag == OpTag.ENTER) & changed),
            events.violation_double_give.eq(response.valid & (tag == OpTag.ENTER) & ~changed),
            events.pages_left.eq(response.valid & (tag != OpTag.ENTER) & changed),
            events.violation_not_in_balloon.eq(response.valid & (tag == OpTag.LEAVE) &
                                               ~changed),
            events.granted.eq(response.valid & (tag == OpTag.GRANT) & changed),
        ]
        with m.If(events.granted):
            m.d.sync += granted.eq(granted + 1)

        # --- One command after the other ------------------------------------------------------
        code = word.data
        count = (readable >> 3) - 1
        code_get = code == c.GuestCmd.GET_PAGES.value
        code_give = code == c.GuestCmd.GIVE_PAGES.value
        code_exchange = code == c.GuestCmd.EXCHANGE_PAGES.value
        well_formed = ((code_get | code_give | code_exchange) &
                       (readable[:3] == 0) & (count != 0) &
                       ~(code_exchange & count[0]) &
                       Mux(code_get, writable == 8, writable == 0))

        with m.FSM():
            with m.State("Header"):
                m.d.comb += header.ready.eq(1)
                with m.If(header.valid):
                    m.d.sync += [
                        readable.eq(header.payload.readable),
                        writable.eq(header.payload.writable),
                        malformed.eq(1),
                    ]
                    with m.If(header.payload.readable == 0):
                        m.next = "Result"
                    with m.Else():
                        m.next = "Code"

            with m.State("Code"):
                m.d.comb += words.ready.eq(1)
                with m.If(words.valid):
                    m.d.sync += [
                        malformed.eq(~well_formed),
                        kind.eq(code[:2]),
                        addresses.eq(count),
                        index.eq(0),
                        granted.eq(0),
                        refused.eq(0),
                        budget.eq(self.return_budget),
                    ]
                    with m.If(well_formed):
                        m.next = "Payload"
                    with m.Elif(word.last):
                        m.next = "Result"
                    with m.Else():
                        m.next = "Drain"

            with m.State("Payload"):
                m.d.comb += [
                    words.ready.eq(~request_valid | self.bitmap_request.ready),
                    payload_taken.eq(words.valid & words.ready),
                ]
                with m.If(payload_taken):
                    m.d.sync += index.eq(index + 1)
                    with m.If(word.last & is_get):
                        m.next = "Finish"
                    with m.Elif(word.last):
                        m.next = "Result"

            with m.State("Finish"):
                # K is final once the last request has its response.
                with m.If(~request_valid & (in_flight == 0)):
                    m.next = "Result"

            with m.State("Drain"):
                m.d.comb += words.ready.eq(1)
                with m.If(words.valid & word.last):
                    m.next = "Result"

            with m.State("Result"):
                get_result = is_get & ~malformed
                m.d.comb += [
                    result.valid.eq(1),
                    result.payload.used_len.eq(Mux(get_result, 8, 0)),
                    result.payload.write_data.eq(granted),
                    result.payload.write_count.eq(Mux(get_result, 8, 0)),
                ]
                with m.If(result.ready):
                    m.d.comb += [
                        events.cmd_malformed.eq(malformed),
                        events.cmd_give.eq(~malformed & is_give),
                        events.cmd_get.eq(~malformed & is_get),
                        events.cmd_exchange.eq(~malformed & is_exchange),
                        events.get_short.eq(~malformed & is_get & (granted < addresses)),
                    ]
                    m.next = "Header"
        return m
