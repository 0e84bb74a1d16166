"""BAR completer: PCIe memory requests to register-bus accesses, and their completions.

Vendor-neutral: it sees only :class:`CompleterSignature` (``interface.py``) on one side and
the register bus (``regbus.py``) on the other; behind it lie the virtio structures and the
MSI-X table of the memory BAR (C2). Requests are served in order, one at a
time; every BAR dword is one register access with byte strobes, so read side effects
(ISR read-clear, virtio 1.2 4.1.4.5) hit only the bytes the host asked for.
"""

from amaranth.hdl import Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..regbus import RegBusSignature
from .interface import CompleterRequest, CompleterSignature, CplStatus, ReqKind

#: Largest PCIe payload (4096 bytes) in dwords; a read request never crosses a 4 KiB
#: boundary, so a max payload of 4096 bytes never splits a completion.
_MAX_PAYLOAD_DWORDS = 1024


def _low_pad(be):
    """Disabled bytes below the first enabled one (PCIe lower address bits 1..0; 0 for
    ``be == 0``, as PCIe asks for a zero-length read)."""
    return Mux(be[0], 0, Mux(be[1], 1, Mux(be[2], 2, Mux(be[3], 3, 0))))


def _high_pad(be):
    """Disabled bytes above the last enabled one."""
    return Mux(be[3], 0, Mux(be[2], 1, Mux(be[1], 2, Mux(be[0], 3, 0))))


class RegCompleter(wiring.Component):
    """Serves one BAR through a register bus and answers everything else.

    - ``MEM_WRITE`` to ``bar``: one register write per dword at ``(offset >> 2) + i``
      (wrapped to ``addr_width``), strobes ``first_be`` / ``0xF`` ... / ``last_be``.
    - ``MEM_READ`` to ``bar``: one register read per dword with the same strobes on
      ``r_strb``; the data returns in completions of at most ``128 << max_payload`` bytes,
      each ending on a max-payload-aligned boundary (also an RCB boundary), with the PCIe
      byte count counting down and the lower address of the first returned byte.
    - ``MEM_READ`` to another BAR, a locked ``MEM_READ`` (PCIe Base 6.5: only legacy
      endpoints support locking) and ``UNSUPPORTED_NP``: one UR completion without data,
      locked for a locked read (CplLk), and no register access.
    - ``MEM_WRITE`` to another BAR and ``UNSUPPORTED_P``: consumed and dropped.

    Attributes
    ----------
    completer : In(CompleterSignature())
        Requests in, completions out.
    bus : Out(RegBusSignature(addr_width))
        Register-bus master, dword addresses.
    max_payload : In(3)
        Device Control Max_Payload_Size, PCIe encoding (128 << n bytes).
    """

    def __init__(self, addr_width, bar=0):
        self._bar = bar
        super().__init__({
            "completer": In(CompleterSignature()),
            "bus": Out(RegBusSignature(addr_width)),
            "max_payload": In(3),
        })

    def elaborate(self, platform):
        m = Module()
        req, req_data = self.completer.req, self.completer.req_data
        cpl, cpl_data = self.completer.cpl, self.completer.cpl_data
        bus = self.bus

        header = Signal(CompleterRequest)
        dword_addr = Signal(30)         # offset >> 2 of the next dword to access
        dwords_left = Signal(11)        # dwords of the request not yet accessed
        issue_left = Signal(11)         # reads of this completion not yet issued
        send_left = Signal(11)          # read data of this completion still to arrive
        read_pending = Signal()         # a read was accepted last cycle: r_data valid now
        out_valid = Signal()
        out_data = Signal(32)
        out_last = Signal()

        # Strobes: first_be on the first dword, last_be on the last one of a multi-dword
        # request, all bytes in between (PCIe byte-enable rules). Registered with the dword
        # they belong to, so that no count compare reaches the register decode (timing).
        first_dword = dwords_left == header.dwords
        strobe = Signal(4)

        def next_dword():
            """Moves on to the request's next dword."""
            m.d.sync += [
                dword_addr.eq(dword_addr + 1),
                dwords_left.eq(dwords_left - 1),
                strobe.eq(Mux(dwords_left == 2, header.last_be, 0xF)),
            ]

        # Byte count and lower address of the next completion (PCIe 2.2.9, 2.3.1.1):
        # bytes still to return, without the disabled bytes below the first enabled
        # byte (first completion only) and above the last enabled one.
        end_be = Mux(header.dwords == 1, header.first_be, header.last_be)
        first_pad = Mux(first_dword, _low_pad(header.first_be), 0)
        zero_length = (header.dwords == 1) & (header.first_be == 0)
        read_byte_count = Mux(zero_length, 1,
                              (dwords_left << 2) - first_pad - _high_pad(end_be))
        read_lower_address = (dword_addr[:5] << 2) | first_pad

        # A completion ends at the next max-payload-aligned boundary or at the request's end.
        # Registered: a Device Control setting, and the next completion's header fields are
        # computed a state ahead ("Read-Size"), so that the completion's arithmetic does not
        # reach the hard IP's CC stream in the clock it is sent (timing).
        payload_dwords = Signal(11, init=32)
        m.d.sync += payload_dwords.eq(Mux(self.max_payload >= 5, _MAX_PAYLOAD_DWORDS,
                                          Const(32, 11) << self.max_payload))
        dwords_to_boundary = payload_dwords - (dword_addr[:10] & (payload_dwords - 1))
        next_chunk = Mux(dwords_left < dwords_to_boundary, dwords_left, dwords_to_boundary)
        chunk = Signal.like(next_chunk)
        chunk_byte_count = Signal.like(read_byte_count)
        chunk_lower_address = Signal.like(read_lower_address)

        m.d.comb += [
            bus.addr.eq(dword_addr),
            bus.w_data.eq(req_data.payload.data),
            bus.w_strb.eq(strobe),
            bus.r_strb.eq(strobe),
            cpl.payload.requester_id.eq(header.requester_id),
            cpl.payload.tag.eq(header.tag),
            cpl.payload.tc.eq(header.tc),
            cpl.payload.attr.eq(header.attr),
            cpl.payload.locked.eq(header.locked),
            cpl_data.valid.eq(out_valid),
            cpl_data.payload.data.eq(out_data),
            cpl_data.payload.last.eq(out_last),
        ]

        m.d.sync += read_pending.eq(bus.r_stb & bus.ready)
        with m.If(cpl_data.valid & cpl_data.ready):
            m.d.sync += out_valid.eq(0)
        with m.If(read_pending):
            m.d.sync += [
                out_valid.eq(1),
                out_data.eq(bus.r_data),
                out_last.eq(send_left == 1),
                send_left.eq(send_left - 1),
            ]

        with m.FSM():
            with m.State("Idle"):
                m.d.comb += req.ready.eq(1)
                with m.If(req.valid):
                    m.d.sync += [
                        header.eq(req.payload),
                        dword_addr.eq(req.payload.offset[2:]),
                        dwords_left.eq(req.payload.dwords),
                        strobe.eq(req.payload.first_be),
                    ]
                    ours = req.payload.bar == self._bar
                    with m.Switch(req.payload.kind):
                        with m.Case(ReqKind.MEM_WRITE):
                            with m.If(ours):
                                m.next = "Write"
                            with m.Else():
                                m.next = "Drop-Write"
                        with m.Case(ReqKind.MEM_READ):
                            with m.If(ours & ~req.payload.locked):
                                m.next = "Read-Size"
                            with m.Else():
                                m.next = "Unsupported-Read"
                        with m.Case(ReqKind.UNSUPPORTED_NP):
                            m.next = "Unsupported"

            with m.State("Write"):
                m.d.comb += [
                    bus.w_stb.eq(req_data.valid),
                    req_data.ready.eq(bus.ready),
                ]
                with m.If(req_data.valid & bus.ready):
                    next_dword()
                    with m.If(req_data.payload.last):
                        m.next = "Idle"

            with m.State("Drop-Write"):
                m.d.comb += req_data.ready.eq(1)
                with m.If(req_data.valid & req_data.payload.last):
                    m.next = "Idle"

            with m.State("Read-Size"):
                m.d.sync += [
                    chunk.eq(next_chunk),
                    chunk_byte_count.eq(read_byte_count),
                    chunk_lower_address.eq(read_lower_address),
                ]
                m.next = "Read-Header"

            with m.State("Read-Header"):
                m.d.comb += [
                    cpl.valid.eq(1),
                    cpl.payload.status.eq(CplStatus.SC),
                    cpl.payload.byte_count.eq(chunk_byte_count),
                    cpl.payload.lower_address.eq(chunk_lower_address),
                    cpl.payload.dwords.eq(chunk),
                ]
                with m.If(cpl.ready):
                    m.d.sync += [
                        issue_left.eq(chunk),
                        send_left.eq(chunk),
                    ]
                    m.next = "Read-Data"

            with m.State("Read-Data"):
                # One read in flight at a time, issued only when its data will find the
                # output register free: r_data is valid for one cycle only.
                m.d.comb += bus.r_stb.eq((issue_left != 0) & ~read_pending &
                                         (~out_valid | cpl_data.ready))
                with m.If(bus.r_stb & bus.ready):
                    m.d.sync += issue_left.eq(issue_left - 1)
                    next_dword()
                with m.If(out_valid & cpl_data.ready & out_last):
                    with m.If(dwords_left == 0):
                        m.next = "Idle"
                    with m.Else():
                        m.next = "Read-Size"

            with m.State("Unsupported-Read"):
                # A memory read completion keeps its byte count and lower address.
                m.d.comb += [
                    cpl.valid.eq(1),
                    cpl.payload.status.eq(CplStatus.UR),
                    cpl.payload.byte_count.eq(read_byte_count),
                    cpl.payload.lower_address.eq(read_lower_address),
                ]
                with m.If(cpl.ready):
                    m.next = "Idle"

            with m.State("Unsupported"):
                # Completions other than for memory reads: byte count 4, lower address 0.
                m.d.comb += [
                    cpl.valid.eq(1),
                    cpl.payload.status.eq(CplStatus.UR),
                    cpl.payload.byte_count.eq(4),
                ]
                with m.If(cpl.ready):
                    m.next = "Idle"

        return m
