"""The host management port (C10): an AXI4-Lite slave outside the virtio function."""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .. import constants as c
from .axi_lite import AxiLiteSignature
from .balloon.interface import BalloonHostSignature

#: Counter registers and the :class:`.balloon.interface.BalloonCounters` field each reads.
_COUNTER_REGISTERS = {
    c.MGMT_CMD_GIVE: "cmd_give",
    c.MGMT_CMD_GET: "cmd_get",
    c.MGMT_CMD_EXCHANGE: "cmd_exchange",
    c.MGMT_CMD_MALFORMED: "cmd_malformed",
    c.MGMT_VIOLATION_MISALIGNED: "violation_misaligned",
    c.MGMT_VIOLATION_OUT_OF_WINDOW: "violation_out_of_window",
    c.MGMT_VIOLATION_DOUBLE_GIVE: "violation_double_give",
    c.MGMT_VIOLATION_NOT_IN_BALLOON: "violation_not_in_balloon",
    c.MGMT_GET_SHORT: "get_short",
    c.MGMT_PAGES_ENTERED: "pages_entered",
    c.MGMT_PAGES_LEFT: "pages_left",
    c.MGMT_FROMDEVQ_MALFORMED: "fromdevq_malformed",
    c.MGMT_MIN_SENT: "min_sent",
    c.MGMT_MIN_DROPPED: "min_dropped",
}


class MgmtPort(wiring.Component):
    """Registers for the hypervisor or board manager (offsets ``MGMT_*`` in constants).

    It is reachable only through its own AXI4-Lite port, never through the virtio BARs
    (C10). Reads of unassigned offsets return 0 with OKAY; writes to them do nothing.
    Writes merge their strobed bytes into the register. ``request_reset`` pulses when the
    host writes ``MGMT_CONTROL_REQUEST_RESET``.

    The balloon's registers are those of the balloon core behind ``balloon``:

    - ``MGMT_WINDOW_BASE_*``: written only while the driver's status has DRIVER_OK clear,
      so the window cannot move under a running driver.
    - ``MGMT_MIN_BALLOON_LO`` holds the low half; writing ``_HI`` commits both and sends
      the minimum on fromdevq (C6). Both read back what was written.
    - ``MGMT_RETURN_BUDGET``: a write replaces the budget; reads show what is left.
    - ``MGMT_EXTRA_FIRST_PAGE`` holds the first page; writing ``MGMT_EXTRA_PAGES`` commits
      the range (C8); the core clips it to the window. Both read back what was written.
    - ``MGMT_BITMAP_DATA``: a read returns 32-bit word ``MGMT_BITMAP_INDEX`` of the bitmap
      (0 past its end); it waits a few cycles for the RAM, longer behind a running fill.
    - ``MGMT_RING_FAULTS`` counts the queues' C7 faults; ``MGMT_FAULT_INFO`` keeps the
      last one (the higher queue when both fault in one cycle).

    Attributes
    ----------
    page_shift : In(6)
        ``CommonCfg.page_shift``; ``MGMT_PAGE_SHIFT`` reads it while FEATURES_OK is set.
    ring_fault : In(NUM_QUEUES)
        Pulse per queue: its virtqueue engine stopped on a C7 fault (``fault``) ...
    ring_fault_kind : In(data.ArrayLayout(RingFault, NUM_QUEUES))
        ... of this kind (``fault_kind``).
    balloon : Out(BalloonHostSignature())
        To ``BalloonCore.host``.
    """

    axil: In(AxiLiteSignature(c.MGMT_ADDR_WIDTH))
    device_status: In(8)
    driver_features: In(64)
    page_shift: In(6)
    notify: In(c.NUM_QUEUES)
    msix_sent: In(32)
    msix_failed: In(32)
    ring_fault: In(c.NUM_QUEUES)
    ring_fault_kind: In(data.ArrayLayout(c.RingFault, c.NUM_QUEUES))
    request_reset: Out(1)
    balloon: Out(BalloonHostSignature())

    def elaborate(self, platform):
        m = Module()
        axil = self.axil
        balloon = self.balloon

        notify_count = [Signal(32, name=f"notify_count_q{q}") for q in range(c.NUM_QUEUES)]
        for q, count in enumerate(notify_count):
            with m.If(self.notify[q]):
                m.d.sync += count.eq(count + 1)

        ring_faults = Signal(32)
        fault_info = Signal(32)
        m.d.sync += ring_faults.eq(ring_faults + sum(self.ring_fault))
        for queue in range(c.NUM_QUEUES):
            with m.If(self.ring_fault[queue]):
                m.d.sync += fault_info.eq(self.ring_fault_kind[queue].as_value() | queue << 8)

        window_base = Signal(64)
        min_balloon = Signal(64)
        extra_first = Signal(32)
        extra_pages = Signal(32)
        bitmap_index = Signal(32)
        m.d.comb += balloon.window_base.eq(window_base)

        features_ok = (self.device_status & c.VIRTIO_CONFIG_S_FEATURES_OK).any()
        driver_ok = (self.device_status & c.VIRTIO_CONFIG_S_DRIVER_OK).any()

        registers = {
            c.MGMT_ID: c.MGMT_ID_VALUE,
            c.MGMT_VERSION: c.MGMT_VERSION_VALUE,
            c.MGMT_DEVICE_STATUS: self.device_status,
            c.MGMT_DRIVER_FEATURES_LO: self.driver_features[:32],
            c.MGMT_DRIVER_FEATURES_HI: self.driver_features[32:],
            c.MGMT_NOTIFY_COUNT_Q0: notify_count[0],
            c.MGMT_NOTIFY_COUNT_Q1: notify_count[1],
            c.MGMT_MSIX_SENT: self.msix_sent,
            c.MGMT_MSIX_FAILED: self.msix_failed,
            c.MGMT_BALLOON_PAGES: balloon.balloon_pages,
            c.MGMT_BITMAP_PAGES: balloon.bitmap_pages,
            c.MGMT_PAGE_SHIFT: Mux(features_ok, self.page_shift, 0),
            c.MGMT_WINDOW_BASE_LO: window_base[:32],
            c.MGMT_WINDOW_BASE_HI: window_base[32:],
            c.MGMT_MIN_BALLOON_LO: min_balloon[:32],
            c.MGMT_MIN_BALLOON_HI: min_balloon[32:],
            c.MGMT_RETURN_BUDGET: balloon.return_budget,
            c.MGMT_EXTRA_FIRST_PAGE: extra_first,
            c.MGMT_EXTRA_PAGES: extra_pages,
            c.MGMT_BITMAP_INDEX: bitmap_index,
            c.MGMT_BUSY: balloon.busy,
            **{offset: getattr(balloon.counters, name)
               for offset, name in _COUNTER_REGISTERS.items()},
            c.MGMT_RING_FAULTS: ring_faults,
            c.MGMT_FAULT_INFO: fault_info,
        }

        # Reads: one at a time, address captured with the handshake. A bitmap read waits
        # for the balloon core's answer.
        bitmap_waiting = Signal()
        bitmap_read = balloon.bitmap_read
        m.d.comb += axil.arready.eq(~axil.rvalid & ~bitmap_waiting)
        with m.If(bitmap_read.ready):
            m.d.sync += bitmap_read.valid.eq(0)
        with m.If(axil.arvalid & axil.arready):
            with m.If(axil.araddr[2:] == c.MGMT_BITMAP_DATA >> 2):
                m.d.sync += [
                    bitmap_waiting.eq(1),
                    bitmap_read.valid.eq(1),
                    bitmap_read.payload.eq(bitmap_index),
                ]
            with m.Else():
                m.d.sync += [axil.rvalid.eq(1), axil.rdata.eq(0)]
                with m.Switch(axil.araddr[2:]):
                    for offset, value in registers.items():
                        with m.Case(offset >> 2):
                            m.d.sync += axil.rdata.eq(value)
        with m.Elif(bitmap_waiting & balloon.bitmap_data.valid):
            m.d.sync += [
                bitmap_waiting.eq(0),
                axil.rvalid.eq(1),
                axil.rdata.eq(balloon.bitmap_data.payload),
            ]
        with m.Elif(axil.rready):
            m.d.sync += axil.rvalid.eq(0)

        # Writes: address and data may come in either order; both are taken together.
        m.d.comb += [
            axil.awready.eq(axil.awvalid & axil.wvalid & ~axil.bvalid),
            axil.wready.eq(axil.awready),
        ]

        def written(offset):
            return axil.awready & (axil.awaddr[2:] == offset >> 2)

        def merged(current):
            """``current`` with the strobed bytes of the write data."""
            return Cat(Mux(axil.wstrb[i], axil.wdata.word_select(i, 8),
                           current.word_select(i, 8)) for i in range(4))

        with m.If(axil.awready):
            m.d.sync += axil.bvalid.eq(1)
            with m.If(written(c.MGMT_CONTROL) & axil.wstrb[0]):
                m.d.comb += self.request_reset.eq(
                    (axil.wdata & c.MGMT_CONTROL_REQUEST_RESET).any())
        with m.Elif(axil.bready):
            m.d.sync += axil.bvalid.eq(0)

        for offset, half in ((c.MGMT_WINDOW_BASE_LO, window_base[:32]),
                             (c.MGMT_WINDOW_BASE_HI, window_base[32:])):
            with m.If(written(offset) & ~driver_ok):
                m.d.sync += half.eq(merged(half))
        with m.If(written(c.MGMT_MIN_BALLOON_LO)):
            m.d.sync += min_balloon[:32].eq(merged(min_balloon[:32]))
        with m.If(written(c.MGMT_MIN_BALLOON_HI)):
            m.d.sync += min_balloon[32:].eq(merged(min_balloon[32:]))
            m.d.comb += [
                balloon.min_balloon.valid.eq(1),
                balloon.min_balloon.payload.eq(Cat(min_balloon[:32],
                                                   merged(min_balloon[32:]))),
            ]
        with m.If(written(c.MGMT_RETURN_BUDGET)):
            m.d.comb += [
                balloon.return_budget_write.valid.eq(1),
                balloon.return_budget_write.payload.eq(merged(balloon.return_budget)),
            ]
        with m.If(written(c.MGMT_EXTRA_FIRST_PAGE)):
            m.d.sync += extra_first.eq(merged(extra_first))
        with m.If(written(c.MGMT_EXTRA_PAGES)):
            m.d.sync += extra_pages.eq(merged(extra_pages))
            m.d.comb += [
                balloon.extra_range_write.valid.eq(1),
                balloon.extra_range_write.payload.first.eq(extra_first),
                balloon.extra_range_write.payload.count.eq(merged(extra_pages)),
            ]
        with m.If(written(c.MGMT_BITMAP_INDEX)):
            m.d.sync += bitmap_index.eq(merged(bitmap_index))
        return m
