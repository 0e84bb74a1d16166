"""MSI-X table, pending bit array and message generation (C11).

The MSI-X capability itself lives in the hard IP, configured for an external table: the
function holds the table and the PBA in BAR0 and hands one message at a time to the hard
IP, which sends it. Vector 0 is the configuration-change vector, then one per queue.
"""

from amaranth.hdl import C, Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from memballoon import constants as c
from memballoon.hdl.pcie.interface import MsixSignature
from memballoon.hdl.regbus import RegBusSignature

_ENTRY_DWORDS = c.PCI_MSIX_ENTRY_SIZE // 4
_VECTOR_CTRL_DWORD = c.PCI_MSIX_ENTRY_VECTOR_CTRL // 4
_PCIE_MAX_VECTORS = c.PCI_MSIX_FLAGS_QSIZE + 1


class MsixEntry(data.Struct):
    """The message part of one table entry, in BAR byte order (PCI_MSIX_ENTRY_LOWER_ADDR,
    _UPPER_ADDR, _DATA); the vector control dword is held apart as one mask bit."""
    address: 64
    data: 32


def _lowest_set(m, bits, name):
    """Index of the lowest set bit of ``bits`` (0 when none is set)."""
    index = Signal(range(len(bits)), name=name)
    for i in reversed(range(len(bits))):
        with m.If(bits[i]):
            m.d.comb += index.eq(i)
    return index


class MsixTable(wiring.Component):
    """The MSI-X table and PBA of one BAR window, and the message engine.

    Bus window (byte offsets, local to ``bus``): entry ``v`` at ``16 * v`` (address low,
    address high, data, vector control); the PBA at ``pba_offset``, one bit per vector,
    read-only. Other addresses read 0 and ignore writes. Of vector control only the mask
    bit is implemented; it resets to 1 (masked) as PCIe requires.

    Delivery (C11): a ``request`` for vector ``v`` sets its pending bit, unless MSI-X is
    disabled: then it is dropped, since the event is in the ISR byte, which signals it by
    INTx (``hdl/virtio/isr.py``). A pending vector is delivered once neither the function
    mask, its own mask bit nor a clear Bus Master Enable stops it; its pending bit clears
    when the message starts, so a request that comes during the message makes a new one,
    while repeated requests before it make one message. Among deliverable vectors the
    engine goes round-robin, so a busy queue cannot starve the others. A message the hard
    IP answers with ``fail`` was not delivered: its vector becomes pending again (dropped
    if MSI-X is now disabled). ``request.ready`` is always high: every request goes
    through the pending bits, so none is lost while a message is in flight.

    Everything here (table, masks, PBA) resets with this block's own reset (PCIe reset,
    FLR), never with a virtio device reset (C9). The address and data words are a RAM and
    keep their contents over reset; the mask bits, which do reset, keep a stale entry
    from being used before software writes it.

    Attributes
    ----------
    bus : In(RegBusSignature(addr_width))
        Register-bus window holding table and PBA.
    request : In(stream.Signature(range(vectors)))
        "Raise vector v" from the device.
    msix : In(MsixSignature())
        To the hard IP: one message at a time, held until ``sent`` or ``fail``.
    bus_master_enable : In(1)
        Command register bit; a message is a memory write, so none is sent while clear.
    sent_count, fail_count : Out(32)
        Messages the hard IP sent and refused, for the management port (C10).
    """

    def __init__(self, vectors, addr_width=10, pba_offset=0x800):
        table_bytes = vectors * c.PCI_MSIX_ENTRY_SIZE
        pba_bytes = 8 * -(-vectors // 64)               # whole qwords, as PCIe lays it out
        if not 1 <= vectors <= _PCIE_MAX_VECTORS:
            raise ValueError(f"MSI-X has 1..{_PCIE_MAX_VECTORS} vectors, not {vectors}")
        if pba_offset % 8 or pba_offset < table_bytes:
            raise ValueError(f"PBA offset {pba_offset:#x} must be qword aligned and after "
                             f"the {table_bytes:#x}-byte table")
        if pba_offset + pba_bytes > 4 << addr_width:
            raise ValueError(f"PBA at {pba_offset:#x} does not fit a window of "
                             f"{4 << addr_width:#x} bytes")
        self._vectors = vectors
        self._pba_offset = pba_offset
        super().__init__({
            "bus": In(RegBusSignature(addr_width)),
            "request": In(stream.Signature(range(vectors))),
            "msix": In(MsixSignature()),
            "bus_master_enable": In(1),
            "sent_count": Out(32),
            "fail_count": Out(32),
        })

    @property
    def vectors(self):
        return self._vectors

    def elaborate(self, platform):
        m = Module()
        vectors = self._vectors

        m.submodules.table = table = Memory(
            shape=MsixEntry.as_shape().size, depth=vectors, init=[])
        table_write = table.write_port(granularity=8)
        table_read = table.read_port()          # bus reads
        message_read = table.read_port()        # the entry of the message being sent
        message = MsixEntry(message_read.data)

        vector_masked = Signal(vectors, init=(1 << vectors) - 1)
        pending = Signal(vectors)

        # --- Bus window ---------------------------------------------------------------
        bus = self.bus
        dword_in_entry = bus.addr[:ceil_log2(_ENTRY_DWORDS)]
        entry = bus.addr[ceil_log2(_ENTRY_DWORDS):]
        in_table = bus.addr < vectors * _ENTRY_DWORDS
        in_entry_words = in_table & (dword_in_entry != _VECTOR_CTRL_DWORD)
        in_vector_ctrl = in_table & (dword_in_entry == _VECTOR_CTRL_DWORD)
        pba_first_dword = self._pba_offset // 4
        pba_dwords = -(-vectors // 32)
        in_pba = (bus.addr >= pba_first_dword) & (bus.addr < pba_first_dword + pba_dwords)
        pba_dword = (bus.addr - pba_first_dword).as_unsigned()
        pba_padded = Cat(pending, C(0, 32 * pba_dwords - vectors))

        m.d.comb += [
            bus.ready.eq(1),
            table_read.addr.eq(entry),
            table_write.addr.eq(entry),
            table_write.data.eq(Cat(bus.w_data, bus.w_data, bus.w_data)),
        ]
        with m.If(bus.w_stb & in_entry_words):
            m.d.comb += table_write.en.eq(bus.w_strb << (dword_in_entry * 4))
        with m.If(bus.w_stb & in_vector_ctrl & bus.w_strb[0]):
            m.d.sync += vector_masked.bit_select(entry, 1).eq(
                (bus.w_data & c.PCI_MSIX_ENTRY_CTRL_MASKBIT).any())

        # Table words come from the RAM one cycle after the read; everything else is
        # captured in a register at the read.
        read_from_table = Signal()
        read_dword = Signal.like(dword_in_entry)
        read_register = Signal(32)
        with m.If(bus.r_stb):
            m.d.sync += [
                read_from_table.eq(in_entry_words),
                read_dword.eq(dword_in_entry),
                read_register.eq(0),
            ]
            with m.If(in_vector_ctrl):
                m.d.sync += read_register.eq(Mux(vector_masked.bit_select(entry, 1),
                                                 c.PCI_MSIX_ENTRY_CTRL_MASKBIT, 0))
            with m.If(in_pba):
                m.d.sync += read_register.eq(pba_padded.word_select(pba_dword, 32))
        m.d.comb += bus.r_data.eq(Mux(read_from_table,
                                      table_read.data.word_select(read_dword, 32),
                                      read_register))

        # --- Message engine -------------------------------------------------------------
        msix = self.msix
        delivery_allowed = msix.enable & ~msix.function_mask & self.bus_master_enable
        deliverable = Signal(vectors)
        m.d.comb += deliverable.eq(Mux(delivery_allowed, pending & ~vector_masked, 0))

        current = Signal(range(vectors))        # vector of the message in flight or last sent
        after_last_sent = Cat(current < i for i in range(vectors))
        next_after = _lowest_set(m, deliverable & after_last_sent, "next_after_last")
        next_from_start = _lowest_set(m, deliverable, "next_from_start")
        next_vector = Signal(range(vectors))
        m.d.comb += next_vector.eq(Mux((deliverable & after_last_sent).any(),
                                       next_after, next_from_start))

        m.d.comb += [
            message_read.addr.eq(next_vector),
            message_read.en.eq(0),
            msix.address.eq(message.address),
            msix.data.eq(message.data),
        ]
        with m.FSM():
            with m.State("Idle"):
                m.d.comb += message_read.en.eq(1)
                with m.If(deliverable.any()):
                    m.d.sync += [
                        current.eq(next_vector),
                        pending.bit_select(next_vector, 1).eq(0),
                    ]
                    m.next = "Send"
            with m.State("Send"):
                m.d.comb += msix.valid.eq(1)
                with m.If(msix.sent):
                    m.d.sync += self.sent_count.eq(self.sent_count + 1)
                    m.next = "Idle"
                with m.If(msix.fail):
                    m.d.sync += self.fail_count.eq(self.fail_count + 1)
                    with m.If(msix.enable):
                        m.d.sync += pending.bit_select(current, 1).eq(1)
                    m.next = "Idle"

        # After the engine's clear, so a request in the same cycle wins.
        m.d.comb += self.request.ready.eq(1)
        with m.If(self.request.valid & msix.enable):
            m.d.sync += pending.bit_select(self.request.payload, 1).eq(1)

        return m
