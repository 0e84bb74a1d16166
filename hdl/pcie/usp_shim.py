"""Xilinx UltraScale+ PCIE4 shim: the only vendor-specific block.

On one side the user-logic ports of the PCIE4 integrated block (AMD PG213), with the
exact flat names a user design sees, so the top level re-exports them 1:1 and
cocotbext-pcie's ``UltraScalePlusPcieDevice`` connects by name; on the other side the
vendor-neutral interfaces of ``interface.py`` for physical function 0. The IP is used in
DWORD-aligned mode without straddling, so every TLP starts in lane 0 of a beat and its
payload follows the descriptor in the next lane.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .interface import (CompleterRequest, CompleterSignature, ConfigExtSignature, CplError,
                        FunctionStatusSignature, IntxSignature, MsixSignature, ReqKind,
                        RequesterCompletion, RequesterKind, RequesterSignature)

#: Device Capabilities Max_Payload_Size the IP is built with (``platform/pcie_ip.py``)
#: and the testbench model too: the longest write the CQ interface delivers.
MAX_PAYLOAD_BYTES = 512

#: CQ descriptor request types (PG213 "Completer Request Descriptor Format"; the other
#: codes: 0010/0011 I/O, 0100..0110 atomics, 10xx configuration, 11xx messages).
_REQ_MEM_READ = 0b0000
_REQ_MEM_WRITE = 0b0001
_REQ_MEM_READ_LOCKED = 0b0111

#: tuser widths per data width (PG213 port tables; cocotbext-pcie ``interface.py``).
_TUSER_WIDTHS = {
    512: dict(cq=183, cc=81, rq=137, rc=161),
    256: dict(cq=88, cc=33, rq=62, rc=75),
}


class CqDescriptor(data.Struct):
    """The 128-bit completer request descriptor in lanes 0..3 of a CQ TLP's first beat."""
    address_type: 2
    address: 62                 # byte address bits 63..2
    dword_count: 11
    request_type: 4
    _reserved0: 1
    requester_id: 16
    tag: 8
    target_function: 8
    bar_id: 3
    bar_aperture: 6             # log2 of the BAR size in bytes
    tc: 3
    attr: 3
    _reserved1: 1


class CcDescriptor(data.Struct):
    """The 96-bit completer completion descriptor in lanes 0..2 of a CC TLP's first beat."""
    lower_address: 7
    _reserved0: 1
    address_type: 2
    _reserved1: 6
    byte_count: 13
    locked_read_completion: 1
    _reserved2: 2
    dword_count: 11
    status: 3
    poisoned: 1
    _reserved3: 1
    requester_id: 16
    tag: 8
    completer_id: 16
    completer_id_enable: 1
    tc: 3
    attr: 3
    force_ecrc: 1


class RqDescriptor(data.Struct):
    """The 128-bit requester request descriptor in lanes 0..3 of an RQ TLP's first beat."""
    address_type: 2
    address: 62                 # byte address bits 63..2
    dword_count: 11
    request_type: 4
    poisoned: 1
    requester_id: 16
    tag: 8
    completer_id: 16
    requester_id_enable: 1
    tc: 3
    attr: 3
    force_ecrc: 1


class RcDescriptor(data.Struct):
    """The 96-bit requester completion descriptor in lanes 0..2 of an RC TLP's first beat."""
    lower_address: 12
    error_code: 4
    byte_count: 13
    locked_read_completion: 1
    request_completed: 1
    _reserved0: 1
    dword_count: 11
    status: 3
    poisoned: 1
    _reserved1: 1
    requester_id: 16
    tag: 8
    completer_id: 16
    _reserved2: 1
    tc: 3
    attr: 3
    _reserved3: 1


#: RC descriptor error codes (PG213 "Requester Completion Descriptor Format") in neutral form.
_RC_ERROR_CODES = {
    0b0000: CplError.NONE,
    0b0001: CplError.POISONED,
    0b0010: CplError.BAD_STATUS,
    0b0110: CplError.UNEXPECTED,
    0b1000: CplError.RESET,
    0b1001: CplError.TIMEOUT,
}


class UspShim(wiring.Component):
    """PCIE4 CQ/CC, configuration and interrupt ports to the neutral PF0 interfaces.

    - CQ: the descriptor becomes one :class:`CompleterRequest` (offset = address modulo
      the BAR aperture; a locked read is a locked ``MEM_READ``) once the TLP's last beat is
      in; a memory write is followed by one :class:`DwordBeat` per payload dword, one per
      cycle (a write over several beats is buffered first); the payload of any other
      request is discarded. A TLP whose last beat has discontinue set is dropped whole.
    - CC: a :class:`CompleterCompletion` and its ``cpl_data`` dwords become the completion
      descriptor (locked read completion for ``locked``) and payload beats, with tkeep,
      tlast, odd byte parity and (512 bits) is_sop/is_eop in tuser.
    - RQ: a :class:`RequesterRequest` (and for a write its payload, two dwords a beat)
      becomes the requester request descriptor and payload, with tkeep, tlast, the byte
      enables, odd byte parity and (512 bits) is_sop/is_eop in tuser; a header and its first
      payload beat are taken in one cycle, and a filled beat is handed on while the next one
      fills, so the payload flows at two dwords a clock.
    - RC: a completion descriptor becomes one :class:`RequesterCompletion`; its payload
      (from lane 3 of the first beat on) leaves as four dwords a beat, the first beat in the
      same cycle as the header, so a TLP's payload flows at 16 bytes a clock (at 256 bits
      an RC beat lasts two clocks, at 512 bits four); discontinue on its last beat marks
      the last neutral beat corrupt.
    - cfg_ext, MSI-X (external table), command/status and FLR map 1:1 for PF0.
    - INTx: ``intx.wanted`` becomes INTA on ``cfg_interrupt_int[0]`` with PG213's
      handshake (each edge waits for the previous one's ``cfg_interrupt_sent``);
      ``cfg_interrupt_pending[0]`` (the Status register's Interrupt Status bit) is
      ``intx.pending``, held up while INTA is.

    Attributes
    ----------
    completer : Out(CompleterSignature())
    requester : Out(RequesterSignature())
    cfg_ext : Out(ConfigExtSignature())
    msix : Out(MsixSignature())
    intx : Out(IntxSignature())
    status : Out(FunctionStatusSignature())
    s_axis_cq_* ... cfg_flr_done
        PCIE4 user-logic ports, named and sized as in PG213.
    """

    def __init__(self, data_width):
        if data_width not in _TUSER_WIDTHS:
            raise ValueError(f"data_width must be 256 or 512, not {data_width}")
        self._data_width = data_width
        lanes = data_width // 32
        tuser = _TUSER_WIDTHS[data_width]
        super().__init__({
            # Completer request (from the IP)
            "s_axis_cq_tdata": In(data_width),
            "s_axis_cq_tkeep": In(lanes),
            "s_axis_cq_tlast": In(1),
            "s_axis_cq_tready": Out(1),
            "s_axis_cq_tuser": In(tuser["cq"]),
            "s_axis_cq_tvalid": In(1),
            "pcie_cq_np_req": Out(2),
            "pcie_cq_np_req_count": In(6),
            # Completer completion (to the IP)
            "m_axis_cc_tdata": Out(data_width),
            "m_axis_cc_tkeep": Out(lanes),
            "m_axis_cc_tlast": Out(1),
            "m_axis_cc_tready": In(1),
            "m_axis_cc_tuser": Out(tuser["cc"]),
            "m_axis_cc_tvalid": Out(1),
            # Requester request and completion (DMA)
            "m_axis_rq_tdata": Out(data_width),
            "m_axis_rq_tkeep": Out(lanes),
            "m_axis_rq_tlast": Out(1),
            "m_axis_rq_tready": In(1),
            "m_axis_rq_tuser": Out(tuser["rq"]),
            "m_axis_rq_tvalid": Out(1),
            "s_axis_rc_tdata": In(data_width),
            "s_axis_rc_tkeep": In(lanes),
            "s_axis_rc_tlast": In(1),
            "s_axis_rc_tready": Out(1),
            "s_axis_rc_tuser": In(tuser["rc"]),
            "s_axis_rc_tvalid": In(1),
            # Configuration extend interface
            "cfg_ext_read_received": In(1),
            "cfg_ext_write_received": In(1),
            "cfg_ext_register_number": In(10),
            "cfg_ext_function_number": In(8),
            "cfg_ext_write_data": In(32),
            "cfg_ext_write_byte_enable": In(4),
            "cfg_ext_read_data": Out(32),
            "cfg_ext_read_data_valid": Out(1),
            # MSI-X, external table
            "cfg_interrupt_msix_enable": In(4),
            "cfg_interrupt_msix_mask": In(4),
            "cfg_interrupt_msix_address": Out(64),
            "cfg_interrupt_msix_data": Out(32),
            "cfg_interrupt_msix_int": Out(1),
            "cfg_interrupt_msix_sent": In(1),
            "cfg_interrupt_msix_fail": In(1),
            "cfg_interrupt_msi_function_number": Out(8),
            # Legacy interrupt (INTA..INTD; PF0..PF3 pending)
            "cfg_interrupt_int": Out(4),
            "cfg_interrupt_pending": Out(4),
            "cfg_interrupt_sent": In(1),
            # Function status and FLR
            "cfg_max_payload": In(2),
            "cfg_max_read_req": In(3),
            "cfg_function_status": In(16),
            "cfg_flr_in_process": In(4),
            "cfg_flr_done": Out(4),
            # Neutral side, physical function 0
            "completer": Out(CompleterSignature()),
            "requester": Out(RequesterSignature()),
            "cfg_ext": Out(ConfigExtSignature()),
            "msix": Out(MsixSignature()),
            "intx": Out(IntxSignature()),
            "status": Out(FunctionStatusSignature()),
        })

    def elaborate(self, platform):
        m = Module()
        self._completer_request(m)
        self._completer_completion(m)
        self._requester_request(m)
        self._requester_completion(m)
        self._config_and_interrupts(m)
        return m

    def _completer_request(self, m):
        """CQ beats to request headers and write-payload dwords."""
        width = self._data_width
        req, req_data = self.completer.req, self.completer.req_data
        descriptor = CqDescriptor(self.s_axis_cq_tdata[:128])
        tuser = self.s_axis_cq_tuser
        # First/last byte enables: tuser[3:0]/[7:4] at 256 bits, [3:0]/[11:8] at 512 bits
        # (the 512-bit bus has a second set for a straddled TLP, unused here).
        first_be = tuser[0:4]
        last_be = tuser[8:12] if width == 512 else tuser[4:8]
        # PG213 CQ tuser discontinue, bit 96 at 512 bits, 41 at 256: raised on a TLP's last
        # beat when the IP found an uncorrectable error reading the TLP from its internal
        # memory, and "the user application must discard the entire TLP". So a request is
        # handed over only once its last beat is in without it: a write spanning several
        # beats is collected in ``payload`` first, and a dropped read gets no completion.
        discontinue = tuser[96 if width == 512 else 41]

        # pcie_cq_np_req: the IP only delivers a non-posted request while its NP credit
        # count is non-zero, and adds one credit per cycle in which this input is non-zero
        # (PG213 "Selective Flow Control for Non-Posted Requests"; usp_model.py
        # _run_cq_logic). Holding it at 0b01 keeps credit available at all times: no
        # selective back pressure, NP requests flow in link order and s_axis_cq_tready
        # alone paces the stream.
        m.d.comb += self.pcie_cq_np_req.eq(0b01)

        header = Signal(CompleterRequest)
        held = Signal(width)                # not-yet-forwarded dwords of the held beat,
        held_keep = Signal(width // 32)     # next one in lane 0
        beat_is_last = Signal()
        dropped = Signal()                  # discontinue came with the TLP's last beat

        # A multi-beat write's payload, filled one dword a clock and then handed over. The
        # IP drops a TLP longer than Max_Payload_Size as malformed, so one fits.
        payload_dwords = MAX_PAYLOAD_BYTES // 4
        m.submodules.payload = payload = Memory(shape=32, depth=payload_dwords, init=[])
        fill = payload.write_port()
        replay = payload.read_port(domain="comb")
        filled = Signal(range(payload_dwords + 1))
        replayed = Signal(range(payload_dwords))

        kind = Signal(ReqKind)
        with m.Switch(descriptor.request_type):
            with m.Case(_REQ_MEM_READ, _REQ_MEM_READ_LOCKED):
                m.d.comb += kind.eq(ReqKind.MEM_READ)
            with m.Case(_REQ_MEM_WRITE):
                m.d.comb += kind.eq(ReqKind.MEM_WRITE)
            with m.Case("0---", "10--"):                # I/O, atomics, configuration
                m.d.comb += kind.eq(ReqKind.UNSUPPORTED_NP)
            with m.Default():                           # messages
                m.d.comb += kind.eq(ReqKind.UNSUPPORTED_P)

        address = descriptor.address[:30] << 2
        outside_aperture = (Const(0xFFFF_FFFF, 32) << descriptor.bar_aperture)[:32]
        m.d.comb += [
            req.payload.eq(header),
            fill.addr.eq(filled),
            fill.data.eq(held[:32]),
            replay.addr.eq(replayed),
        ]

        def take_beat():
            """Hold the beat on the bus: a later beat of the TLP, from lane 0 on."""
            m.d.comb += self.s_axis_cq_tready.eq(1)
            with m.If(self.s_axis_cq_tvalid):
                m.d.sync += [
                    held.eq(self.s_axis_cq_tdata),
                    held_keep.eq(self.s_axis_cq_tkeep),
                    beat_is_last.eq(self.s_axis_cq_tlast),
                    dropped.eq(self.s_axis_cq_tlast & discontinue),
                ]

        with m.FSM():
            with m.State("Descriptor"):
                m.d.comb += self.s_axis_cq_tready.eq(1)
                with m.If(self.s_axis_cq_tvalid):
                    m.d.sync += [
                        header.kind.eq(kind),
                        header.bar.eq(descriptor.bar_id),
                        header.offset.eq(address & ~outside_aperture),
                        header.dwords.eq(descriptor.dword_count),
                        header.first_be.eq(first_be),
                        header.last_be.eq(last_be),
                        header.requester_id.eq(descriptor.requester_id),
                        header.tag.eq(descriptor.tag),
                        header.tc.eq(descriptor.tc),
                        header.attr.eq(descriptor.attr),
                        header.locked.eq(descriptor.request_type == _REQ_MEM_READ_LOCKED),
                        held.eq(self.s_axis_cq_tdata[128:]),
                        held_keep.eq(self.s_axis_cq_tkeep[4:]),
                        beat_is_last.eq(self.s_axis_cq_tlast),
                        filled.eq(0),
                    ]
                    with m.If(self.s_axis_cq_tlast):
                        with m.If(~discontinue):
                            m.next = "Request"
                    with m.Elif(kind == ReqKind.MEM_WRITE):
                        m.next = "Collect"
                    with m.Else():
                        m.next = "Discard"

            with m.State("Collect"):
                # Buffer lane 0 of the held beat and shift the next lane down; when the
                # beat is used up, take the next one, or end with the TLP. tkeep is
                # contiguous, so the TLP's last dword is the last kept lane of the last beat.
                with m.If(held_keep[0]):
                    m.d.comb += fill.en.eq(1)
                    m.d.sync += [
                        held.eq(held >> 32),
                        held_keep.eq(held_keep >> 1),
                        filled.eq(filled + 1),
                    ]
                with m.Elif(~beat_is_last):
                    take_beat()
                with m.Elif(dropped):
                    m.next = "Descriptor"
                with m.Else():
                    m.next = "Request"

            with m.State("Discard"):
                # Any other request with a payload: only its last beat matters.
                m.d.comb += self.s_axis_cq_tready.eq(1)
                with m.If(self.s_axis_cq_tvalid & self.s_axis_cq_tlast):
                    with m.If(discontinue):
                        m.next = "Descriptor"
                    with m.Else():
                        m.next = "Request"

            with m.State("Request"):
                m.d.comb += req.valid.eq(1)
                with m.If(req.ready):
                    with m.If(header.kind != ReqKind.MEM_WRITE):
                        m.next = "Descriptor"
                    with m.Elif(held_keep[0]):       # came in one beat
                        m.next = "Write-Held"
                    with m.Else():
                        m.d.sync += replayed.eq(0)
                        m.next = "Write-Buffered"

            with m.State("Write-Held"):
                # A write that came in one beat: its payload, from lane 0 of ``held``.
                m.d.comb += [
                    req_data.valid.eq(1),
                    req_data.payload.data.eq(held[:32]),
                    req_data.payload.last.eq(~held_keep[1]),
                ]
                with m.If(req_data.ready):
                    m.d.sync += [
                        held.eq(held >> 32),
                        held_keep.eq(held_keep >> 1),
                    ]
                    with m.If(~held_keep[1]):
                        m.next = "Descriptor"

            with m.State("Write-Buffered"):
                m.d.comb += [
                    req_data.valid.eq(1),
                    req_data.payload.data.eq(replay.data),
                    req_data.payload.last.eq(replayed + 1 == filled),
                ]
                with m.If(req_data.ready):
                    m.d.sync += replayed.eq(replayed + 1)
                    with m.If(req_data.payload.last):
                        m.next = "Descriptor"

    def _completer_completion(self, m):
        """Completion headers and their dwords to CC beats."""
        width = self._data_width
        lanes = width // 32
        cpl, cpl_data = self.completer.cpl, self.completer.cpl_data

        beat = Signal(width)
        keep = Signal(lanes)
        next_lane = Signal(range(lanes + 1))
        first_beat = Signal()
        last_beat = Signal()

        # Completer ID enable stays 0: the IP inserts its own bus and device number, and
        # the function number field (bits 7..0) stays 0 for PF0.
        descriptor = Signal(CcDescriptor)
        m.d.comb += [
            descriptor.lower_address.eq(cpl.payload.lower_address),
            descriptor.byte_count.eq(cpl.payload.byte_count),
            descriptor.locked_read_completion.eq(cpl.payload.locked),
            descriptor.dword_count.eq(cpl.payload.dwords),
            descriptor.status.eq(cpl.payload.status),
            descriptor.requester_id.eq(cpl.payload.requester_id),
            descriptor.tag.eq(cpl.payload.tag),
            descriptor.tc.eq(cpl.payload.tc),
            descriptor.attr.eq(cpl.payload.attr),
        ]

        # Odd parity per byte (PG213 CC tuser parity, cocotbext-pcie dword_parity ^ 0xF).
        parity = Cat(~beat[8 * i:8 * i + 8].xor() for i in range(width // 8))
        if width == 512:
            # is_sop[0], is_sop0_ptr = 0, is_eop[0], is_eop0_ptr, discontinue 0, parity
            tuser = Cat(first_beat, Const(0, 1), Const(0, 4), last_beat, Const(0, 1),
                        (next_lane - 1)[:4], Const(0, 4), Const(0, 1), parity)
        else:
            tuser = Cat(Const(0, 1), parity)    # discontinue 0, parity
        m.d.comb += [
            self.m_axis_cc_tdata.eq(beat),
            self.m_axis_cc_tkeep.eq(keep),
            self.m_axis_cc_tlast.eq(last_beat),
            self.m_axis_cc_tuser.eq(tuser),
        ]

        with m.FSM():
            with m.State("Descriptor"):
                m.d.comb += cpl.ready.eq(1)
                with m.If(cpl.valid):
                    m.d.sync += [
                        beat[:96].eq(descriptor),
                        keep.eq(0b111),
                        next_lane.eq(3),
                        first_beat.eq(1),
                        last_beat.eq(cpl.payload.dwords == 0),
                    ]
                    with m.If(cpl.payload.dwords == 0):
                        m.next = "Send"
                    with m.Else():
                        m.next = "Fill"

            with m.State("Fill"):
                m.d.comb += cpl_data.ready.eq(1)
                with m.If(cpl_data.valid):
                    m.d.sync += [
                        beat.word_select(next_lane, 32).eq(cpl_data.payload.data),
                        keep.eq(keep | (1 << next_lane)),
                        next_lane.eq(next_lane + 1),
                        last_beat.eq(cpl_data.payload.last),
                    ]
                    with m.If(cpl_data.payload.last | (next_lane == lanes - 1)):
                        m.next = "Send"

            with m.State("Send"):
                m.d.comb += self.m_axis_cc_tvalid.eq(1)
                with m.If(self.m_axis_cc_tready):
                    m.d.sync += [
                        keep.eq(0),
                        next_lane.eq(0),
                        first_beat.eq(0),
                    ]
                    with m.If(last_beat):
                        m.next = "Descriptor"
                    with m.Else():
                        m.next = "Fill"

    def _requester_request(self, m):
        """Request headers and write-payload dword pairs to RQ beats."""
        width = self._data_width
        lanes = width // 32
        req, req_data = self.requester.req, self.requester.req_data

        # The beat being filled, and the one on the bus. A filled beat moves to the bus in
        # the cycle the bus frees up, and filling goes on into the emptied buffer at once.
        fill_data = Signal(width)
        fill_lanes = Signal(range(lanes + 1))
        fill_done = Signal()                # complete: waiting to move to the bus
        fill_sop = Signal()
        fill_eop = Signal()
        first_be = Signal(4)
        last_be = Signal(4)
        dwords_left = Signal(11)            # payload dwords of the TLP not yet taken

        tdata = Signal(width)
        tkeep = Signal(lanes)
        sop = Signal()
        eop = Signal()
        tvalid = Signal()
        out_first_be = Signal(4)
        out_last_be = Signal(4)

        bus_free = ~tvalid | self.m_axis_rq_tready
        move = fill_done & bus_free
        room = ~fill_done | move
        lane = Mux(fill_done, 0, fill_lanes)        # where this cycle's dwords go

        fill_descriptor = RqDescriptor(fill_data[:128])

        last_lane = (Cat(tkeep[1:], Const(0, 1)) ^ tkeep)   # one-hot: the last kept lane
        eop_ptr = Signal(4)
        for i in range(lanes):
            with m.If(last_lane[i]):
                m.d.comb += eop_ptr.eq(i)
        # Odd parity per byte (PG213 RQ tuser parity, cocotbext-pcie dword_parity ^ 0xF).
        parity = Cat(~tdata[8 * i:8 * i + 8].xor() for i in range(width // 8))
        if width == 512:
            # first_be[3:0], last_be[11:8], is_sop[20], is_eop[26], is_eop0_ptr[31:28],
            # seq_num0/1 0, parity[136:73]
            tuser = Cat(out_first_be, Const(0, 4), out_last_be, Const(0, 8), sop,
                        Const(0, 5), eop, Const(0, 1), eop_ptr, Const(0, 41), parity)
        else:
            # first_be[3:0], last_be[7:4], addr_offset/discontinue/TPH/seq_num 0, parity[59:28]
            tuser = Cat(out_first_be, out_last_be, Const(0, 20), parity, Const(0, 2))
        m.d.comb += [
            self.m_axis_rq_tdata.eq(tdata),
            self.m_axis_rq_tkeep.eq(tkeep),
            self.m_axis_rq_tlast.eq(eop),
            self.m_axis_rq_tuser.eq(tuser),
            self.m_axis_rq_tvalid.eq(tvalid),
        ]

        with m.If(self.m_axis_rq_tready):
            m.d.sync += tvalid.eq(0)
        with m.If(move):
            m.d.sync += [
                tdata.eq(fill_data),
                tkeep.eq(Cat(fill_lanes > i for i in range(lanes))),
                sop.eq(fill_sop),
                eop.eq(fill_eop),
                out_first_be.eq(first_be),
                out_last_be.eq(last_be),
                tvalid.eq(1),
                fill_done.eq(0),
                fill_lanes.eq(0),
                fill_sop.eq(0),
                fill_eop.eq(0),
            ]

        def take_payload(at_lane, dwords):
            """Put one payload beat at ``at_lane``; end the beat when full or the TLP ends."""
            two = dwords >= 2
            m.d.sync += [
                fill_data.word_select(at_lane, 32).eq(req_data.payload.data[:32]),
                fill_data.word_select(at_lane + 1, 32).eq(req_data.payload.data[32:]),
                fill_lanes.eq(at_lane + Mux(two, 2, 1)),
                dwords_left.eq(dwords - Mux(two, 2, 1)),
            ]
            with m.If(dwords <= 2):
                m.d.sync += [fill_done.eq(1), fill_eop.eq(1)]
            with m.Elif(at_lane + 2 == lanes):
                m.d.sync += fill_done.eq(1)
            return dwords <= 2

        with m.FSM():
            with m.State("Descriptor"):
                m.d.comb += req.ready.eq(room)
                is_write = req.payload.kind == RequesterKind.MEM_WRITE
                with m.If(req.valid & room):
                    # Requester ID 0 with requester ID enable 0: the IP puts in its own bus
                    # and device number, and the function number field (bits 7..0) stays 0
                    # for PF0 (usp_model.py _run_rq_logic routes by it). Tags are the
                    # engine's (client tags). Other fields 0.
                    m.d.sync += [
                        fill_data[:128].eq(0),
                        fill_descriptor.address.eq(req.payload.address[2:]),
                        fill_descriptor.dword_count.eq(req.payload.dwords),
                        fill_descriptor.request_type.eq(Mux(is_write, 0b0001, 0b0000)),
                        fill_descriptor.tag.eq(req.payload.tag),
                        fill_lanes.eq(4),
                        fill_sop.eq(1),
                        first_be.eq(req.payload.first_be),
                        last_be.eq(req.payload.last_be),
                        dwords_left.eq(req.payload.dwords),
                    ]
                    with m.If(is_write):
                        m.d.comb += req_data.ready.eq(1)
                        with m.If(req_data.valid):
                            with m.If(~take_payload(4, req.payload.dwords)):
                                m.next = "Payload"
                        with m.Else():
                            m.next = "Payload"
                    with m.Else():
                        m.d.sync += [fill_done.eq(1), fill_eop.eq(1)]

            with m.State("Payload"):
                m.d.comb += req_data.ready.eq(room)
                with m.If(req_data.valid & room):
                    with m.If(take_payload(lane, dwords_left)):
                        m.next = "Descriptor"

    def _requester_completion(self, m):
        """RC beats to completion headers and payload beats of up to four dwords."""
        width = self._data_width
        lanes = width // 32
        cpl, cpl_data = self.requester.cpl, self.requester.cpl_data
        beat_dwords = len(cpl_data.payload.data) // 32
        descriptor = RcDescriptor(self.s_axis_rc_tdata[:96])

        header = Signal(RequesterCompletion)
        header_valid = Signal()
        # Payload dwords not yet forwarded, next in lane 0: a new RC beat is appended behind
        # the fewer than ``beat_dwords`` still held, so the register holds at most
        # ``beat_dwords - 1`` of them plus a full beat.
        held = Signal(width + 32 * (beat_dwords - 1))
        held_dwords = Signal(range(lanes + beat_dwords))
        more_beats = Signal()               # the TLP goes on in later beats
        corrupt = Signal()                  # discontinue came with the TLP's last beat
        # PG213 RC tuser discontinue: bit 96 at 512 bits, bit 42 at 256 bits.
        discontinue = self.s_axis_rc_tuser[96 if width == 512 else 42]

        # A beat leaves when it is full, or with the TLP's last one to four dwords.
        ends_tlp = ~more_beats & (held_dwords <= beat_dwords)
        m.d.comb += [
            cpl.valid.eq(header_valid),
            cpl.payload.eq(header),
            cpl_data.valid.eq((held_dwords >= beat_dwords) |
                              ((held_dwords != 0) & ~more_beats)),
            cpl_data.payload.data.eq(held[:32 * beat_dwords]),
            cpl_data.payload.last.eq(ends_tlp),
            cpl_data.payload.corrupt.eq(ends_tlp & corrupt),
        ]
        with m.If(cpl.ready):
            m.d.sync += header_valid.eq(0)

        forwarded = cpl_data.valid & cpl_data.ready
        left = Signal.like(held_dwords)     # dwords still held after this cycle's beat
        m.d.comb += left.eq(Mux(~forwarded, held_dwords,
                                Mux(held_dwords >= beat_dwords, held_dwords - beat_dwords, 0)))
        remaining = Mux(forwarded, held >> 32 * beat_dwords, held)
        kept = sum(self.s_axis_rc_tkeep[i] for i in range(lanes))
        m.d.sync += [held.eq(remaining), held_dwords.eq(left)]

        error = Signal(CplError)
        with m.Switch(descriptor.error_code):
            for code, value in _RC_ERROR_CODES.items():
                with m.Case(code):
                    m.d.comb += error.eq(value)
            with m.Default():                   # invalid length, mismatch, invalid address
                m.d.comb += error.eq(CplError.MALFORMED)
        # A timeout or FLR report is a descriptor without payload whatever its dword count.
        no_payload = (error == CplError.TIMEOUT) | (error == CplError.RESET)

        with m.If(more_beats):
            # Next beat of the same TLP, appended behind the dwords still held (fewer than
            # a completion beat's worth, so the register has room for a whole RC beat).
            # The IP's beats before the last are full, which leaves one dword held here
            # (3 descriptor dwords, beats of 8 or 16); taking any count keeps a short
            # beat from stalling the stream.
            m.d.comb += self.s_axis_rc_tready.eq(left < beat_dwords)
            with m.If(self.s_axis_rc_tvalid & self.s_axis_rc_tready):
                with m.Switch(left):
                    for still_held in range(beat_dwords):
                        with m.Case(still_held):
                            m.d.sync += held.eq(Cat(remaining[:32 * still_held],
                                                    self.s_axis_rc_tdata))
                m.d.sync += [
                    held_dwords.eq(left + kept),
                    more_beats.eq(~self.s_axis_rc_tlast),
                    corrupt.eq(self.s_axis_rc_tlast & discontinue),
                ]
        with m.Else():
            # First beat of the next TLP: only once the previous payload is all forwarded
            # and its header taken.
            m.d.comb += self.s_axis_rc_tready.eq((left == 0) & (~header_valid | cpl.ready))
            with m.If(self.s_axis_rc_tvalid & self.s_axis_rc_tready):
                m.d.sync += [
                    header.tag.eq(descriptor.tag),
                    header.status.eq(descriptor.status),
                    header.error.eq(error),
                    header.byte_count.eq(descriptor.byte_count),
                    header.lower_address.eq(descriptor.lower_address[:7]),
                    header.dwords.eq(Mux(no_payload, 0, descriptor.dword_count)),
                    header.request_completed.eq(descriptor.request_completed),
                    header_valid.eq(1),
                    held.eq(self.s_axis_rc_tdata[96:]),
                    held_dwords.eq(kept - 3),
                    more_beats.eq(~self.s_axis_rc_tlast),
                    corrupt.eq(self.s_axis_rc_tlast & discontinue),
                ]

    def _config_and_interrupts(self, m):
        """cfg_ext, MSI-X, INTx and function status for PF0."""
        cfg_ext, msix, intx, status = self.cfg_ext, self.msix, self.intx, self.status
        m.d.comb += [
            cfg_ext.read_received.eq(self.cfg_ext_read_received),
            cfg_ext.write_received.eq(self.cfg_ext_write_received),
            cfg_ext.register_number.eq(self.cfg_ext_register_number),
            cfg_ext.function_number.eq(self.cfg_ext_function_number),
            cfg_ext.write_data.eq(self.cfg_ext_write_data),
            cfg_ext.write_byte_enable.eq(self.cfg_ext_write_byte_enable),
            self.cfg_ext_read_data.eq(cfg_ext.read_data),
            self.cfg_ext_read_data_valid.eq(cfg_ext.read_data_valid),

            # cfg_function_status per PF: bit 0 I/O enable, 1 memory enable, 2 bus master
            # enable (no DMA while it is clear, C12), 3 INTx disable (C11); FLR resets the
            # device (C9).
            status.memory_enable.eq(self.cfg_function_status[1]),
            status.bus_master_enable.eq(self.cfg_function_status[2]),
            status.interrupt_disable.eq(self.cfg_function_status[3]),
            status.max_payload.eq(self.cfg_max_payload),
            status.max_read_request.eq(self.cfg_max_read_req),
            status.flr.eq(self.cfg_flr_in_process[0]),
            self.cfg_flr_done.eq(status.flr_done),

            msix.enable.eq(self.cfg_interrupt_msix_enable[0]),
            msix.function_mask.eq(self.cfg_interrupt_msix_mask[0]),
            msix.sent.eq(self.cfg_interrupt_msix_sent),
            msix.fail.eq(self.cfg_interrupt_msix_fail),
            self.cfg_interrupt_msix_address.eq(msix.address),
            self.cfg_interrupt_msix_data.eq(msix.data),
            self.cfg_interrupt_msi_function_number.eq(0),
        ]

        # MSI-X with the table in the function's BAR (C2, C11). The IP sends one message
        # per cycle of cfg_interrupt_msix_int, so the held msix.valid becomes a one-cycle
        # pulse; the next message may start after the IP's sent/fail answer.
        awaiting_answer = Signal()
        m.d.comb += self.cfg_interrupt_msix_int.eq(msix.valid & ~awaiting_answer)
        with m.If(self.cfg_interrupt_msix_sent | self.cfg_interrupt_msix_fail):
            m.d.sync += awaiting_answer.eq(0)
        with m.Elif(self.cfg_interrupt_msix_int):
            m.d.sync += awaiting_answer.eq(1)

        # Legacy INTA (PG213 "Legacy Interrupt Mode"): the IP sends Assert_INTA for a
        # rising edge of cfg_interrupt_int[0] and Deassert_INTA for a falling one, and
        # answers each with one cycle of cfg_interrupt_sent; INTA must hold until then. So
        # an edge waits for the previous one's answer, and a request shorter than that
        # still makes an assert and a deassert. cfg_interrupt_pending[0] drives PF0's
        # Interrupt Status bit; PG213 wants it up for as long as INTA is.
        inta = Signal()
        awaiting_sent = Signal()
        with m.If(awaiting_sent):
            with m.If(self.cfg_interrupt_sent):
                m.d.sync += awaiting_sent.eq(0)
        with m.Elif(intx.wanted != inta):
            m.d.sync += [inta.eq(intx.wanted), awaiting_sent.eq(1)]
        m.d.comb += [
            self.cfg_interrupt_int.eq(inta),
            self.cfg_interrupt_pending.eq(intx.pending | inta),
        ]
