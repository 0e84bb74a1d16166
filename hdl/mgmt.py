"""The host management port (C10): an AXI4-Lite slave outside the virtio function."""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .. import constants as c
from .axi_lite import AxiLiteSignature


class MgmtPort(wiring.Component):
    """Registers for the hypervisor or board manager (offsets ``MGMT_*`` in constants).

    It is reachable only through its own AXI4-Lite port, never through the virtio BARs
    (C10). Reads of unassigned offsets return 0 with OKAY; writes to them do nothing.
    ``request_reset`` pulses when the host writes ``MGMT_CONTROL_REQUEST_RESET``.
    """

    axil: In(AxiLiteSignature(c.MGMT_ADDR_WIDTH))
    device_status: In(8)
    driver_features: In(64)
    notify: In(c.NUM_QUEUES)
    msix_sent: In(32)
    msix_failed: In(32)
    request_reset: Out(1)

    def elaborate(self, platform):
        m = Module()
        axil = self.axil

        notify_count = [Signal(32, name=f"notify_count_q{q}") for q in range(c.NUM_QUEUES)]
        for q, count in enumerate(notify_count):
            with m.If(self.notify[q]):
                m.d.sync += count.eq(count + 1)

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
        }

        # Reads: one at a time, address captured with the handshake.
        m.d.comb += axil.arready.eq(~axil.rvalid)
        with m.If(axil.arvalid & axil.arready):
            m.d.sync += [axil.rvalid.eq(1), axil.rdata.eq(0)]
            with m.Switch(axil.araddr[2:]):
                for offset, value in registers.items():
                    with m.Case(offset >> 2):
                        m.d.sync += axil.rdata.eq(value)
        with m.Elif(axil.rready):
            m.d.sync += axil.rvalid.eq(0)

        # Writes: address and data may come in either order; both are taken together.
        m.d.comb += [
            axil.awready.eq(axil.awvalid & axil.wvalid & ~axil.bvalid),
            axil.wready.eq(axil.awready),
        ]
        with m.If(axil.awready):
            m.d.sync += axil.bvalid.eq(1)
            with m.If((axil.awaddr[2:] == c.MGMT_CONTROL >> 2) & axil.wstrb[0]):
                m.d.comb += self.request_reset.eq(
                    (axil.wdata & c.MGMT_CONTROL_REQUEST_RESET).any())
        with m.Elif(axil.bready):
            m.d.sync += axil.bvalid.eq(0)
        return m
