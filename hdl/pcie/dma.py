"""DMA engine: a client's byte-granular reads and writes as PCIe memory requests.

Vendor-neutral, like verilog-pcie's ``dma_if_pcie``: it sees only the requester interface
of ``interface.py`` (:class:`RequesterSignature`); the hard-IP shim turns that into the
vendor's streams. The client side is :class:`DmaSignature`, the port the virtqueue engines
use (through :class:`~memballoon.hdl.pcie.dma_mux.DmaMux` when there are several).

Reads are split into requests of at most Max_Read_Request_Size that never cross a
4 KiB boundary; each request gets one of ``TAGS`` (32) tags, a slice of a completion
buffer (``read_buffer_bytes``, 16 KiB by default) and its completion headers, reserved
before it is sent (it waits until they are free). Completions may arrive in any order
across tags, split at the read completion boundary; they are written into the buffer at
their place, and the buffer is read out in request order and shifted to byte 0 of the
client's range. Tags and buffer slices are used in a ring, so a request that completes
early waits in the buffer until the ones before it are read out. The buffer is four
32-bit banks, dword ``d`` in bank ``d % 4``: a completion beat of up to four dwords lands
in one clock at any dword alignment, and the read-out takes one 16-byte line (a client
beat) a clock.

What is reserved keeps the hard IP's receive buffer from overflowing: the endpoint
advertises infinite completion credit, so only the engine limits what the host sends. PG213
gives 128 completion headers (CPH) and 32 KiB of completion data (CPD) at performance level
Extreme; cocotbext-pcie's PCIE4 model drops completions past 256 and past 2048 data credits
of 16 bytes, a completion costing its data credits plus one. Headers: a request comes back
in at most as many completions as the ``RCB_BYTES`` blocks its bytes touch, and reserves
that many of ``CPL_HEADER_BUDGET`` (128). Data: a completion begins and ends at an end of
its request or at an RCB boundary (16-byte aligned), so it fills no more 16-byte credits
than the buffer lines it lands in; at worst 16 KiB of lines (1024 credits) plus one
credit for each of 128 completions is 1152 credits (18 KiB), within both 2048 and CPD (a
32 KiB buffer would not be: 2048 + 128). Lines and headers are released when the read-out
passes the request: after its last completion, or at once for a failed one (error,
timeout, enable low), whose late completions, dropped, may then overrun them.

Writes are split at Max_Payload_Size-aligned boundaries (so none crosses 4 KiB), with
byte enables for an unaligned start and end; they are posted, in command order, and
``write_done`` follows a command's last TLP.

``enable`` (bus master enable and DRIVER_OK, C12) is sampled when a request is decided,
one cycle before it is presented: while it is low no request is decided, a read command
ends with an error beat, requests in flight count as failed, and a write command consumes
its data and completes with ``error`` set.
"""

from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In

from .interface import (DMA_READ_BEAT_BYTES, CompletionBeat, CplError, CplStatus,
                        DmaReadBeat, DmaSignature, RequesterKind, RequesterRequest,
                        RequesterSignature)

#: Read tags in flight: 5-bit tags, which the PCIE4 block takes whatever the host set
#: (PG213). 8-bit tags (256) need the host's Extended Tag Field Enable, and the engine
#: cannot observe that bit on this IP, so it never uses them.
TAGS = 32
TAG_BITS = (TAGS - 1).bit_length()

#: Completion headers the PCIE4 block's receive buffer holds at performance level Extreme
#: (PG213 "Receiver-Buffer Completion Space": CPH 128). The endpoint advertises infinite
#: completion credit, so the engine keeps what it has asked for within them.
CPL_HEADER_BUDGET = 128
#: Read completion boundary of the hosts that split completions most: a request comes
#: back in at most as many completions as RCB-aligned blocks its bytes touch.
RCB_BYTES = 64
RCB_SHIFT = RCB_BYTES.bit_length() - 1
#: The most blocks one request touches (it never crosses a 4 KiB boundary).
MAX_REQUEST_BLOCKS = 4096 // RCB_BYTES

#: Completion-buffer sizes the engine builds (powers of two, for the ring of lines): at
#: least one largest request, at most what keeps the receive buffer's data within its
#: space (see the module docstring).
READ_BUFFER_BYTES = (4096, 8192, 16384)

#: A completion-buffer line is one client read beat; the buffer is one bank per dword of
#: a line, so that dwords ``d`` .. ``d + BANKS - 1`` are in different banks.
LINE_BYTES = DMA_READ_BEAT_BYTES
LINE_SHIFT = LINE_BYTES.bit_length() - 1
BANKS = LINE_BYTES // 4
BANK_SHIFT = BANKS.bit_length() - 1

#: Bits of a completion-buffer line index in the largest buffer.
LINE_INDEX_BITS = (max(READ_BUFFER_BYTES) // LINE_BYTES - 1).bit_length()

#: Read commands the engine holds unanswered at most (taken on ``read_cmd``, last beat not
#: yet out): one on each tag, the one the issuer is splitting while it waits for a tag,
#: the next one waiting beside it, and two past the ring in the read-out (its
#: buffer-read stage and its realign stage).
READ_COMMANDS_HELD = TAGS + 4

#: Payload dwords per completion beat of the requester interface.
CPL_BEAT_DWORDS = data.Layout.cast(CompletionBeat)["data"].shape // 32
assert CPL_BEAT_DWORDS <= BANKS and CPL_BEAT_DWORDS & (CPL_BEAT_DWORDS - 1) == 0, \
    "a completion beat must land in one line's worth of banks"


def _size_bytes(encoding):
    """Max_Payload_Size / Max_Read_Request_Size encoding to bytes (128 << n; the reserved
    encodings 6 and 7 as 4096)."""
    return Mux(encoding >= 5, 4096, Const(128, 13) << encoding)


#: Lines of the completion buffer one request fills at most (it never crosses 4 KiB).
MAX_REQUEST_LINES = 4096 // LINE_BYTES

#: Whether a write command shorter than this is one TLP is a short test (the smallest
#: Max_Payload boundary is 128): it is, unless it starts in the last this many bytes
#: before a boundary and its end passes it. So its TLP is planned from the command in
#: the clock it is taken.
SHORT_WRITE_BYTES = 128
SHORT_SHIFT = SHORT_WRITE_BYTES.bit_length() - 1


class _Plan(data.Struct):
    """The next request (read) or TLP (write) of a command, decided a clock before it is
    used, so that the split itself only compares and adds registered figures (timing)."""
    bytes: 13
    last: 1                     # the command's last request
    dwords: 11
    first_be: 4
    last_be: 4
    lines: MAX_REQUEST_LINES.bit_length()        # completion-buffer lines it fills
    blocks: MAX_REQUEST_BLOCKS.bit_length()      # RCB blocks it touches


def _ends_command(address, remaining_m1, mask):
    """Whether the ``remaining_m1 + 1`` bytes left at ``address`` end before the next
    multiple of ``mask + 1`` (a power of two up to 4096): one comparison against the bytes
    after the first up to the boundary."""
    return remaining_m1 <= (~address[:12] & mask)


def _plan(plan, address, remaining, mask, last):
    """Statements that set ``plan`` (a :class:`_Plan`) to the next request for the
    ``remaining`` bytes at ``address``: at most up to the next multiple of ``mask + 1``,
    so that none crosses a 4 KiB boundary. Both candidates are computed side by side,
    each one carry chain deep, and ``last`` (whether everything left fits) picks one."""
    a = address[:12]
    # everything left: at most 4096 bytes when it is the last request
    whole = remaining[:13]
    end = (a[:2] + remaining[:2] - 1)[:2]          # last byte's lane
    whole_single = (remaining[3:] == 0) & ((a[:2] + remaining[:3]) <= 4)
    # up to the boundary: bytes after the first (the boundary is MPS/MRRS-aligned, so
    # the request ends at the end of a dword, a line and a block)
    after = ~a & mask
    first_be = (Const(0xF, 4) << a[:2])[:4]
    last_be = Mux(last, Const(0xF, 4) >> ~end, 0xF)
    single = Mux(last, whole_single, after[2:] == 0)
    return [
        plan.last.eq(last),
        plan.bytes.eq(Mux(last, whole, after + 1)),
        plan.dwords.eq(Mux(last, (a[:2] + 3 + whole) >> 2, (after >> 2) + 1)),
        plan.lines.eq(Mux(last, (a[:LINE_SHIFT] + LINE_BYTES - 1 + whole) >> LINE_SHIFT,
                          (after >> LINE_SHIFT) + 1)),
        plan.blocks.eq(Mux(last, (a[:RCB_SHIFT] + RCB_BYTES - 1 + whole) >> RCB_SHIFT,
                           (after >> RCB_SHIFT) + 1)),
        plan.first_be.eq(Mux(single, first_be & last_be, first_be)),
        plan.last_be.eq(Mux(single, 0, last_be)),
    ]


def _advance(address, size):
    """``address + size`` for a TLP's ``size`` (at most 4096): the low 12 bits and their
    carry first, the upper bits' increment beside them, so that the long carry chain
    does not follow the split arithmetic (timing)."""
    low = address[:12] + size                       # 13 bits: at most one carry out
    return Cat(low[:12], Mux(low[12], address[12:] + 1, address[12:])[:len(address) - 12])


#: The completion timeout's default, in user_clk cycles (524 us at 250 MHz: PCIe's range
#: A, 50 us to 10 ms).
COMPLETION_TIMEOUT_CYCLES = 2 ** 17

class _TagEntry(data.Struct):
    """What the engine keeps of the read request (or failed-command marker) on one tag."""
    end: LINE_INDEX_BITS + LINE_SHIFT   # buffer byte just past its slice's last byte
    stop: 7                     # address bits 6..0 just past its last byte
    blocks: MAX_REQUEST_BLOCKS.bit_length()     # completion headers it reserved
    lines: MAX_REQUEST_LINES.bit_length()       # completion-buffer lines of its slice
    start: 7                    # address bits 6..0 of its first byte
    bytes: 13                   # its length (0: a marker that ends a command with an error)
    first: 1                    # first entry of a read command
    last: 1                     # last entry of a read command
    length: 20                  # the command's length (in a first entry)


class _Token(data.Struct):
    """One step of the read-out: a buffer line to realign, or an error beat."""
    error: 1
    first: 1                    # first line of the command
    last: 1                     # last line of the command
    shift: LINE_SHIFT           # byte offset of the command's first byte in its first line
    length: 20


class DmaEngine(wiring.Component):
    """One DMA client port on the vendor-neutral requester interface.

    Throughput of back-to-back commands through the UltraScale+ shim at 256 and 512 bits
    (MPS 256, MRRS 512; tests/test_dma.py): 4 KiB reads 15.95 bytes a clock sustained
    with the host answering after 64 or 125 cycles (15.17 and 14.75 from the first
    command), the 16-byte client beat less a one-clock flush per command; 16-byte reads
    at 125 cycles 3.56 (4.02 sustained), ``TAGS`` requests a round trip; 4 KiB writes
    7.92, the client's 8-byte write beat being the ceiling.

    Attributes
    ----------
    client : In(DmaSignature())
        Read and write commands of one client; read data in command order.
    requester : In(RequesterSignature())
        Requests to and completions from the hard-IP shim.
    max_payload, max_read_request : In(3)
        Device Control Max_Payload_Size / Max_Read_Request_Size (PCIe encodings).
    enable : In(1)
        Bus master enable and DRIVER_OK (C12).

    Parameters
    ----------
    timeout_cycles : int
        Completion timeout: a request without its last completion after 3/4 to 4/4 of this
        fails its read (C7); its tag is reused only after 7/4 to 8/4 of this, and
        completions that arrive for it in between are dropped.
    read_buffer_bytes : int
        Completion buffer, one of ``READ_BUFFER_BYTES``: the bytes of reads in flight (see
        above for why not more).
    """

    def __init__(self, *, timeout_cycles=COMPLETION_TIMEOUT_CYCLES,
                 read_buffer_bytes=max(READ_BUFFER_BYTES)):
        if timeout_cycles < 8:
            raise ValueError(f"timeout_cycles must be at least 8, not {timeout_cycles}")
        if read_buffer_bytes not in READ_BUFFER_BYTES:
            raise ValueError(f"read_buffer_bytes must be one of {READ_BUFFER_BYTES}, "
                             f"not {read_buffer_bytes}")
        self._tick_cycles = timeout_cycles // 4
        self._lines = read_buffer_bytes // LINE_BYTES
        super().__init__({
            "client": In(DmaSignature()),
            "requester": In(RequesterSignature()),
            "max_payload": In(3),
            "max_read_request": In(3),
            "enable": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        line_bits = self._lines.bit_length() - 1

        # Read state shared by the issuer, the completion writer and the read-out.
        m.submodules.tag_table = tag_table = Memory(shape=_TagEntry, depth=TAGS, init=[])
        banks = []
        for b in range(BANKS):
            banks.append(Memory(shape=32, depth=self._lines, init=[]))
            m.submodules[f"bank_{b}"] = banks[b]
        rd = SimpleNamespace(
            tag_write=tag_table.write_port(),
            # the ring of tags: entries are issued at issue_ptr and read out at read_ptr
            issue_ptr=Signal(TAG_BITS + 1, name="issue_ptr"),
            read_ptr=Signal(TAG_BITS + 1, name="read_ptr"),
            # completion buffer lines: reserved up to alloc_ptr, read out up to line_ptr
            alloc_ptr=Signal(line_bits + 1, name="alloc_ptr"),
            line_ptr=Signal(line_bits + 1, name="line_ptr"),
            # completion headers, counted like the lines: reserved, and released at read-out
            headers_reserved=Signal(CPL_HEADER_BUDGET.bit_length(), name="headers_reserved"),
            headers_released=Signal(CPL_HEADER_BUDGET.bit_length(), name="headers_released"),
            # per tag: request sent and completions may still come
            pending=Signal(TAGS, name="pending"),
            # per tag: its data is not wanted (error, timeout, skipped, marker)
            failed=Signal(TAGS, name="failed"),
            issued=Signal(name="issued"),       # a read request goes out on the issue slot
            marked=Signal(name="marked"),       # a failed marker is put on the issue slot
            abort=Signal(name="abort"),         # the read-out gives up on the command
            issuing_split=Signal(name="issuing_split"),
        )
        rd.slot = rd.issue_ptr[:TAG_BITS]

        read_header = Signal(RequesterRequest)
        read_header_valid = Signal()
        read_header_taken = Signal()
        write_header = Signal(RequesterRequest)
        write_header_valid = Signal()
        write_header_taken = Signal()

        self._issue_reads(m, rd, read_header, read_header_valid, read_header_taken)
        completion = self._write_completions(m, rd, tag_table, banks)
        readout = self._read_out(m, rd, tag_table, banks)
        self._track_tags(m, rd, completion, readout)
        self._write(m, write_header, write_header_valid, write_header_taken)
        self._arbitrate(m, read_header, read_header_valid, read_header_taken,
                        write_header, write_header_valid, write_header_taken)
        return m

    def _issue_reads(self, m, rd, header, header_valid, header_taken):
        """Split read commands into requests, each on the next tag of the ring with its
        slice of the completion buffer, or end a command with a failed marker entry."""
        cmd = self.client.read_cmd
        address = Signal(64)
        bytes_left = Signal(20)
        bytes_left_m1 = Signal(20)      # bytes_left - 1, for the plan's one comparison
        length = Signal(20)
        first = Signal()
        ending = Signal()               # the request presented is its command's last

        # Registered: a Device Control setting, not worth a path from the hard IP's status
        # through the split arithmetic (timing); it takes effect a clock later.
        max_read_mask = Signal(12, init=127)    # encoding 0 until the first clock
        m.d.sync += max_read_mask.eq(_size_bytes(self.max_read_request) - 1)

        # Free lines and headers, from the counters of the clock before: a request is
        # decided at most every other clock (Split, then Request), so its own reservation
        # is in them by the next split; a release is seen a clock late. Both counts are
        # ``budget - (reserved - released)``, the budget a power of two: the difference
        # the other way round with its top bit flipped.
        free_lines = Signal(len(rd.alloc_ptr))
        free_headers = Signal(len(rd.headers_reserved))
        m.d.sync += [
            free_lines.eq((rd.line_ptr - rd.alloc_ptr)[:len(free_lines)] ^ self._lines),
            free_headers.eq((rd.headers_released - rd.headers_reserved)[:len(free_headers)] ^
                            CPL_HEADER_BUDGET),
        ]
        ring_full = (rd.issue_ptr[:TAG_BITS] == rd.read_ptr[:TAG_BITS]) & \
            (rd.issue_ptr[TAG_BITS] != rd.read_ptr[TAG_BITS])
        slot_free = ~ring_full & ~rd.pending.bit_select(rd.slot, 1)

        # The next command waits in a register, so that the issuer goes from a command's
        # last request straight to the next one's split: two clocks a request.
        waiting = Signal.like(cmd.payload)
        waiting_m1 = Signal(20)
        waiting_valid = Signal()
        m.d.comb += cmd.ready.eq(~waiting_valid)
        with m.If(cmd.valid & cmd.ready):
            m.d.sync += [
                waiting.eq(cmd.payload),
                waiting_m1.eq(cmd.payload.length - 1),
                waiting_valid.eq(1),
            ]

        # The plan of the request to split next, every clock: from the waiting command
        # when the current one has no more (so a command's first request is planned in the
        # clock it starts), else from what is left of the current one.
        plan = Signal(_Plan)
        from_waiting = Signal()
        plan_address = Mux(from_waiting, waiting.address, address)
        plan_bytes = Mux(from_waiting, waiting.length, bytes_left)
        plan_m1 = Mux(from_waiting, waiting_m1, bytes_left_m1)
        m.d.sync += _plan(plan, plan_address, plan_bytes, max_read_mask,
                          _ends_command(plan_address, plan_m1, max_read_mask))
        room = slot_free & (plan.lines <= free_lines) & (plan.blocks <= free_headers)

        entry = rd.tag_write
        m.d.comb += [
            entry.addr.eq(rd.slot),
            entry.data.first.eq(first),
            entry.data.length.eq(length),
        ]

        def start_waiting():
            """Starts the waiting command, if there is one."""
            with m.If(waiting_valid):
                m.d.sync += [
                    address.eq(waiting.address),
                    bytes_left.eq(waiting.length),
                    bytes_left_m1.eq(waiting_m1),
                    length.eq(waiting.length),
                    first.eq(1),
                    waiting_valid.eq(0),
                ]
                m.next = "Split"

        with m.FSM() as fsm:
            m.d.comb += [
                rd.issuing_split.eq(fsm.ongoing("Split")),
                from_waiting.eq(fsm.ongoing("Idle") | (fsm.ongoing("Request") & ending)),
            ]
            with m.State("Idle"):
                start_waiting()

            with m.State("Split"):
                with m.If(rd.abort):                # the read-out gave up on this command
                    m.next = "Idle"
                with m.Elif(~self.enable):
                    with m.If(slot_free):
                        m.d.comb += [
                            entry.en.eq(1),
                            entry.data.last.eq(1),
                            rd.marked.eq(1),
                        ]
                        m.d.sync += rd.issue_ptr.eq(rd.issue_ptr + 1)
                        m.next = "Idle"
                with m.Elif(room):
                    m.d.comb += [
                        entry.en.eq(1),
                        entry.data.start.eq(address[:7]),
                        entry.data.bytes.eq(plan.bytes),
                        entry.data.end.eq(Cat(address[:LINE_SHIFT], rd.alloc_ptr[:-1]) +
                                          plan.bytes),
                        entry.data.stop.eq(address[:7] + plan.bytes),
                        entry.data.lines.eq(plan.lines),
                        entry.data.blocks.eq(plan.blocks),
                        entry.data.last.eq(plan.last),
                    ]
                    m.d.sync += [
                        header.kind.eq(RequesterKind.MEM_READ),
                        header.address.eq(Cat(Const(0, 2), address[2:])),
                        header.dwords.eq(plan.dwords),
                        header.first_be.eq(plan.first_be),
                        header.last_be.eq(plan.last_be),
                        header.tag.eq(rd.slot),
                        rd.alloc_ptr.eq(rd.alloc_ptr + plan.lines),
                        rd.headers_reserved.eq(rd.headers_reserved + plan.blocks),
                        address.eq(_advance(address, plan.bytes)),
                        bytes_left.eq(bytes_left - plan.bytes),
                        bytes_left_m1.eq(bytes_left_m1 - plan.bytes),
                        first.eq(0),
                        ending.eq(plan.last),
                    ]
                    m.next = "Request"

            with m.State("Request"):
                m.d.comb += header_valid.eq(1)
                with m.If(header_taken):
                    m.d.comb += rd.issued.eq(1)
                    m.d.sync += rd.issue_ptr.eq(rd.issue_ptr + 1)
                    with m.If(ending):
                        m.next = "Idle"
                        start_waiting()
                    with m.Else():
                        m.next = "Split"

    def _write_completions(self, m, rd, tag_table, banks):
        """Write completion payload into the buffer slice of its tag: payload dword ``i``
        goes to buffer dword ``p + i``, that is bank ``(p + i) % 4``, so the dwords of one
        beat fall in different banks and land in one cycle whatever ``p`` is. The first
        payload beat is taken with its header."""
        cpl, cpl_data = self.requester.cpl, self.requester.cpl_data
        header = cpl.payload
        tag = header.tag[:TAG_BITS]
        lookup = tag_table.read_port(domain="comb")
        entry = lookup.data
        m.d.comb += lookup.addr.eq(tag)

        # Where the completion's first byte lies: PCIe's byte count is what is left of the
        # request, this completion included (completions of one request arrive in address
        # order), so it is that many bytes before the request's end; the lower address
        # must agree. Each is one subtraction from what the tag's entry holds.
        known = (header.tag < TAGS) & rd.pending.bit_select(tag, 1) & \
            (header.error != CplError.UNEXPECTED)
        good = (header.status == CplStatus.SC) & (header.error == CplError.NONE) & \
            (header.byte_count <= entry.bytes) & \
            ((entry.stop - header.byte_count)[:7] == header.lower_address)
        position = Signal(len(rd.line_ptr) - 1 + BANK_SHIFT)  # dword of the next payload dword
        byte_bits = len(position) + 2

        def header_dword(ahead):
            """Buffer dword ``ahead`` dwords past the completion's first byte: the byte count
            and the constant are subtracted first, beside the tag table's read."""
            return ((entry.end - (header.byte_count - 4 * ahead)[:byte_bits])[:byte_bits]
                    >> 2)[:len(position)]

        busy = Signal()                 # the payload of a taken header is flowing
        dwords_left = Signal(11)
        writing = Signal()
        busy_known = Signal()
        completes = Signal()
        busy_tag = Signal(TAG_BITS)

        has_payload = header.dwords != 0
        taking_header = cpl.valid & ~busy
        m.d.comb += [
            cpl.ready.eq(~busy),
            # Not gated by has_payload (the header's 11-bit dword count, in front of the
            # shim's tready; timing): no beat comes before its header, so none is valid
            # beside a header without payload (RequesterSignature).
            cpl_data.ready.eq(busy | cpl.valid),
        ]
        at = Mux(busy, position, header_dword(0))
        left = Mux(busy, dwords_left, header.dwords)
        write = Mux(busy, writing, known & good & ~rd.failed.bit_select(tag, 1))
        beat = cpl_data.valid & cpl_data.ready
        beat_ends = beat & cpl_data.payload.last
        for b, bank in enumerate(banks):
            lane = (b + BANKS - at[:BANK_SHIFT])[:BANK_SHIFT]  # the beat's dword in this bank
            port = bank.write_port()
            # the first dword at or after ``at`` in bank b: (at + lane) >> BANK_SHIFT, with
            # the lane's constant part folded into the subtraction
            ahead = BANKS - 1 - b
            m.d.comb += [
                port.addr.eq(Mux(busy, (position + ahead) >> BANK_SHIFT,
                                 header_dword(ahead) >> BANK_SHIFT)),
                port.data.eq(cpl_data.payload.data.word_select(
                    lane[:(CPL_BEAT_DWORDS - 1).bit_length()], 32)),
                port.en.eq(beat & write & (lane < CPL_BEAT_DWORDS) & (lane < left)),
            ]

        m.d.sync += [
            position.eq(Mux(beat, Mux(busy, position + CPL_BEAT_DWORDS,
                                      header_dword(CPL_BEAT_DWORDS)), at)),
            dwords_left.eq(Mux(beat, left - CPL_BEAT_DWORDS, left)),
        ]
        with m.If(busy & beat_ends):
            m.d.sync += busy.eq(0)
        with m.If(taking_header & has_payload & ~beat_ends):
            m.d.sync += [
                busy.eq(1),
                writing.eq(write),
                busy_known.eq(known),
                completes.eq(header.request_completed),
                busy_tag.eq(tag),
            ]

        corrupt = beat_ends & cpl_data.payload.corrupt
        return SimpleNamespace(
            # a completion for an outstanding request reports an error: in its header, or
            # as corrupt payload at its end
            fail=Mux(busy, corrupt & busy_known, taking_header & known & (~good | corrupt)),
            fail_tag=Mux(busy, busy_tag, tag),
            # a completion has ended that ends its request
            done=Mux(busy, beat_ends & busy_known & completes,
                     taking_header & (~has_payload | beat_ends) & known &
                     header.request_completed),
            done_tag=Mux(busy, busy_tag, tag),
            # tags whose completion payload is flowing now
            active=Mux(busy, 1 << busy_tag, Mux(taking_header, 1 << tag, 0))[:TAGS],
        )

    def _read_out(self, m, rd, tag_table, banks):
        """Read the buffer in request order, a line a clock, and realign it to the client's
        first byte; a failed entry becomes one error beat and the rest of its command is
        skipped."""
        out = self.client.read_data
        lookup = tag_table.read_port(domain="comb")
        entry = lookup.data
        slot = rd.read_ptr[:TAG_BITS]
        m.d.comb += lookup.addr.eq(slot)
        ports = [bank.read_port() for bank in banks]
        slice_lines = entry.lines
        ring_empty = rd.issue_ptr == rd.read_ptr
        slot_ready = ~ring_empty & (~rd.pending.bit_select(slot, 1) |
                                    rd.failed.bit_select(slot, 1))

        # Stage 1: buffer read (one cycle) with its token; stage 2: realign into ``out``.
        token = Signal(_Token)
        token_valid = Signal()
        token_taken = Signal()
        stage_free = ~token_valid | token_taken
        lines_left = Signal(10)         # lines of the current entry still to read
        read_line = Signal()
        skip = Signal()
        for port in ports:
            m.d.comb += [port.addr.eq(rd.line_ptr), port.en.eq(read_line)]
        with m.If(token_taken):
            m.d.sync += token_valid.eq(0)

        def release_tag():
            """The entry leaves the ring: its tag and its completion headers are free."""
            m.d.sync += [
                rd.read_ptr.eq(rd.read_ptr + 1),
                rd.headers_released.eq(rd.headers_released + entry.blocks),
            ]

        def issue_line(first_line, last_line):
            m.d.comb += read_line.eq(1)
            m.d.sync += [
                token_valid.eq(1),
                token.error.eq(0),
                token.first.eq(first_line),
                token.last.eq(entry.last & last_line),
                token.shift.eq(entry.start[:LINE_SHIFT]),
                token.length.eq(entry.length),
                rd.line_ptr.eq(rd.line_ptr + 1),
            ]
            with m.If(last_line):
                release_tag()

        def pass_entry():
            release_tag()
            m.d.sync += rd.line_ptr.eq(rd.line_ptr + slice_lines)

        with m.FSM():
            with m.State("Entry"):
                with m.If(slot_ready & stage_free):
                    with m.If(rd.failed.bit_select(slot, 1)):
                        pass_entry()
                        m.d.sync += [token_valid.eq(1), token.error.eq(1)]
                        with m.If(~entry.last):
                            m.next = "Skip"
                    with m.Else():
                        issue_line(entry.first, slice_lines == 1)
                        m.d.sync += lines_left.eq(slice_lines - 1)
                        with m.If(slice_lines != 1):
                            m.next = "Stream"

            with m.State("Stream"):
                with m.If(stage_free):
                    issue_line(0, lines_left == 1)
                    m.d.sync += lines_left.eq(lines_left - 1)
                    with m.If(lines_left == 1):
                        m.next = "Entry"

            with m.State("Skip"):
                # The rest of a failed command: drop its entries (late completions for them
                # are not written) and stop the issuer if it is still splitting it.
                with m.If(~ring_empty):
                    m.d.comb += skip.eq(1)
                    pass_entry()
                    with m.If(entry.last):
                        m.next = "Entry"
                with m.Elif(rd.issuing_split):
                    m.d.comb += rd.abort.eq(1)
                    m.next = "Entry"

        # Realign: out beat i is bytes 16i .. 16i+15 of the command, i.e. lines i and i+1
        # shifted down by the command's start offset; the last line may leave one more beat.
        line = Cat(*(port.data for port in ports))
        previous = Signal(8 * LINE_BYTES)
        shift = Signal(LINE_SHIFT)
        bytes_left = Signal(20)
        flush = Signal()
        out_valid = Signal()
        beat = Signal(DmaReadBeat)
        m.d.comb += [out.valid.eq(out_valid), out.payload.eq(beat)]
        room = ~out_valid | out.ready
        m.d.comb += token_taken.eq(token_valid & ~flush & room)
        with m.If(out.ready):
            m.d.sync += out_valid.eq(0)

        def emit(data, count, last, error=0):
            m.d.sync += [
                out_valid.eq(1),
                beat.data.eq(data),
                beat.count.eq(count),
                beat.last.eq(last),
                beat.error.eq(error),
            ]

        with m.If(flush & room):
            emit(previous >> Cat(Const(0, 3), shift), bytes_left, 1)
            m.d.sync += flush.eq(0)
        with m.Elif(token_taken):
            with m.If(token.error):
                emit(0, 0, 1, error=1)
            with m.Elif(token.first & token.last):
                emit(line >> Cat(Const(0, 3), token.shift), token.length, 1)
            with m.Elif(token.first):
                m.d.sync += [
                    previous.eq(line),
                    shift.eq(token.shift),
                    bytes_left.eq(token.length),
                ]
            with m.Else():
                more = bytes_left > LINE_BYTES
                emit((Cat(previous, line) >> Cat(Const(0, 3), shift))[:8 * LINE_BYTES],
                     Mux(more, LINE_BYTES, bytes_left), ~more)
                m.d.sync += [
                    previous.eq(line),
                    bytes_left.eq(Mux(more, bytes_left - LINE_BYTES, 0)),
                    flush.eq(token.last & more),
                ]
        return SimpleNamespace(skip=skip, skip_tag=slot)

    def _track_tags(self, m, rd, completion, readout):
        """Pending/failed state of every tag, and the completion timeout: a prescaler
        ticks four times per timeout; a pending request fails at its 4th tick and its tag
        is released at its 8th (unless a completion for it is flowing right then)."""
        tick = Signal()
        if self._tick_cycles > 1:
            prescaler = Signal(range(self._tick_cycles))
            m.d.sync += prescaler.eq(Mux(tick, 0, prescaler + 1))
            m.d.comb += tick.eq(prescaler == self._tick_cycles - 1)
        else:
            m.d.comb += tick.eq(1)

        for t in range(TAGS):
            age = Signal(3, name=f"age_{t}")
            pending, failed = rd.pending[t], rd.failed[t]
            with m.If(tick & pending):
                m.d.sync += age.eq(age + 1)
                with m.If(age == 3):
                    m.d.sync += failed.eq(1)
                with m.If((age == 7) & ~completion.active[t]):
                    m.d.sync += pending.eq(0)
            with m.If(pending & (~self.enable | (completion.fail & (completion.fail_tag == t)))):
                m.d.sync += failed.eq(1)
            with m.If(completion.done & (completion.done_tag == t)):
                m.d.sync += pending.eq(0)
            with m.If(readout.skip & (readout.skip_tag == t)):
                m.d.sync += failed.eq(1)
            with m.If(rd.slot == t):
                with m.If(rd.issued):
                    m.d.sync += [pending.eq(1), failed.eq(0), age.eq(0)]
                with m.If(rd.marked):
                    m.d.sync += failed.eq(1)

    def _write(self, m, header, header_valid, header_taken):
        """Write commands to TLP headers and payload.

        Three steps run side by side: the header step decides the next TLP (while the
        payload of the one before flows), the word step turns the client's byte-packed
        beats into address-aligned 8-byte words (byte ``a % 8`` of a word is address ``a``),
        and the payload step packs a TLP's words into dword pairs from its first dword
        (only a TLP starting at an odd dword needs a one-dword shift; MPS-aligned boundaries
        keep every later TLP word-aligned).
        """
        cmd, data_in, done = (self.client.write_cmd, self.client.write_data,
                              self.client.write_done)
        req_data = self.requester.req_data

        # Registered like Max_Read_Request_Size, and latched per command from that register:
        # the first TLP's plan is made in the clock the command is taken.
        payload_mask = Signal(12, init=127)
        m.d.sync += payload_mask.eq(_size_bytes(self.max_payload) - 1)
        command_mask = Signal(12)
        shift = Signal(3)
        # header step: the next TLP is planned a clock ahead; a command's first plan is
        # made from the command itself when it is shorter than SHORT_WRITE_BYTES and
        # fits before the boundary, otherwise a clock later from the registers
        address = Signal(64)
        bytes_left = Signal(20)
        bytes_left_m1 = Signal(20)
        plan = Signal(_Plan)
        planned = Signal()
        claimed = Signal()              # the payload step has taken this header's TLP
        stopped = Signal()              # enable went low: no further TLPs
        # word step
        beats_left = Signal(18)
        words_left = Signal(18)
        carry = Signal(64)
        word = Signal(64)
        word_valid = Signal()
        word_taken = Signal()
        # payload step
        in_tlp = Signal()
        tlp_odd = Signal()
        tlp_left = Signal(11)
        high = Signal(32)               # upper dword of the previous word (odd TLPs)
        high_valid = Signal()
        draining = Signal()

        m.d.comb += done.payload.error.eq(stopped)

        with m.FSM():
            with m.State("Idle"):
                m.d.comb += cmd.ready.eq(1)
                a, n = cmd.payload.address, cmd.payload.length
                near_boundary = (a[SHORT_SHIFT:12] | ~payload_mask[SHORT_SHIFT:]) == \
                    (1 << (12 - SHORT_SHIFT)) - 1
                short = (n < SHORT_WRITE_BYTES) & \
                    (~near_boundary | (a[:SHORT_SHIFT] + n[:SHORT_SHIFT] <= SHORT_WRITE_BYTES))
                m.d.sync += [_plan(plan, a, n, payload_mask, 1), planned.eq(short)]
                with m.If(cmd.valid):
                    m.d.sync += [
                        command_mask.eq(payload_mask),
                        shift.eq(a[:3]),
                        address.eq(a),
                        bytes_left.eq(n),
                        bytes_left_m1.eq(n - 1),
                        stopped.eq(0),
                        beats_left.eq((n + 7) >> 3),
                        words_left.eq((a[:3] + n + 7) >> 3),
                        draining.eq(0),
                    ]
                    m.next = "Busy"

            with m.State("Busy"):
                # Header step.
                with m.If(header_taken):
                    m.d.sync += header_valid.eq(0)
                m.d.sync += [
                    _plan(plan, address, bytes_left, command_mask,
                          _ends_command(address, bytes_left_m1, command_mask)),
                    planned.eq(1),
                ]
                with m.If(~header_valid & (bytes_left != 0) & ~stopped):
                    with m.If(~self.enable):
                        m.d.sync += stopped.eq(1)
                    with m.Elif(planned):
                        m.d.sync += [
                            header.kind.eq(RequesterKind.MEM_WRITE),
                            header.address.eq(Cat(Const(0, 2), address[2:])),
                            header.dwords.eq(plan.dwords),
                            header.first_be.eq(plan.first_be),
                            header.last_be.eq(plan.last_be),
                            header_valid.eq(1),
                            claimed.eq(0),
                            address.eq(_advance(address, plan.bytes)),
                            bytes_left.eq(bytes_left - plan.bytes),
                            bytes_left_m1.eq(bytes_left_m1 - plan.bytes),
                            planned.eq(0),  # planned again from the advanced address
                        ]

                # Word step.
                with m.If(word_taken):
                    m.d.sync += word_valid.eq(0)
                with m.If((~word_valid | word_taken) & (words_left != 0)):
                    with m.If(beats_left != 0):
                        m.d.comb += data_in.ready.eq(1)
                        with m.If(data_in.valid):
                            m.d.sync += [
                                word.eq((Cat(carry, data_in.payload.data) <<
                                         Cat(Const(0, 3), shift))[64:128]),
                                carry.eq(data_in.payload.data),
                                beats_left.eq(beats_left - 1),
                                words_left.eq(words_left - 1),
                                word_valid.eq(1),
                            ]
                    with m.Else():          # the last word holds only the carried bytes
                        m.d.sync += [
                            word.eq((Cat(carry, Const(0, 64)) <<
                                     Cat(Const(0, 3), shift))[64:128]),
                            words_left.eq(words_left - 1),
                            word_valid.eq(1),
                        ]

                # Payload step.
                needs_high = tlp_odd & ~high_valid
                only_high = tlp_odd & high_valid & (tlp_left == 1)
                m.d.comb += [
                    req_data.valid.eq(in_tlp & ~needs_high & (only_high | word_valid)),
                    req_data.payload.data.eq(Mux(tlp_odd, Cat(high, Mux(only_high, 0, word[:32])),
                                                 word)),
                    req_data.payload.last.eq(tlp_left <= 2),
                ]
                sent = req_data.valid & req_data.ready
                tlp_ends = sent & (tlp_left <= 2)
                with m.If(in_tlp & needs_high & word_valid):
                    m.d.comb += word_taken.eq(1)
                    m.d.sync += [high.eq(word[32:]), high_valid.eq(1)]
                with m.If(sent):
                    m.d.sync += tlp_left.eq(tlp_left - 2)
                    with m.If(~only_high):
                        m.d.comb += word_taken.eq(1)
                        m.d.sync += high.eq(word[32:])
                with m.If(tlp_ends):
                    m.d.sync += in_tlp.eq(0)
                with m.If(header_valid & ~claimed & (~in_tlp | tlp_ends)):
                    m.d.sync += [
                        claimed.eq(1),
                        in_tlp.eq(1),
                        tlp_odd.eq(header.address[2]),
                        tlp_left.eq(header.dwords),
                        high_valid.eq(0),
                    ]
                with m.If(stopped & ~header_valid & ~in_tlp):
                    m.d.sync += draining.eq(1)
                with m.If(draining & word_valid):
                    m.d.comb += word_taken.eq(1)

                with m.If((words_left == 0) & ~word_valid & ~in_tlp & ~header_valid &
                          ((bytes_left == 0) | stopped)):
                    m.next = "Done"

            with m.State("Done"):
                m.d.comb += done.valid.eq(1)
                with m.If(done.ready):
                    m.next = "Idle"

    def _arbitrate(self, m, read_header, read_valid, read_taken,
                   write_header, write_valid, write_taken):
        """Read and write headers onto ``req``, alternating when both wait; a presented
        header keeps the grant until it is taken."""
        req = self.requester.req
        locked = Signal()
        locked_write = Signal()
        prefer_write = Signal()
        grant_write = Mux(locked, locked_write,
                          Mux(read_valid & write_valid, prefer_write, write_valid))
        m.d.comb += [
            req.valid.eq(Mux(grant_write, write_valid, read_valid)),
            req.payload.eq(Mux(grant_write, write_header, read_header)),
            read_taken.eq(req.valid & req.ready & ~grant_write),
            write_taken.eq(req.valid & req.ready & grant_write),
        ]
        with m.If(req.valid & ~req.ready):
            m.d.sync += [locked.eq(1), locked_write.eq(grant_write)]
        with m.If(req.valid & req.ready):
            m.d.sync += [locked.eq(0), prefer_write.eq(~grant_write)]

