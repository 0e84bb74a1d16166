"""The virtio ISR status byte (virtio 1.2 4.1.4.5) and the legacy INTx it stands for."""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In

from ... import constants as c
from ..pcie.interface import IntxSignature
from ..regbus import RegBusSignature


class VirtioIsr(wiring.Component):
    """ISR status: bit 0 queue interrupt, bit 1 configuration change.

    ``set_queue``/``set_config`` pulses set the bits; a read of byte 0 returns them and
    clears them in the same access (read-clear), a bit set in that very cycle survives.
    ``clear`` (virtio reset, C9) clears both.

    INTx (C11, virtio 1.2 4.1.5.3): with MSI-X disabled a non-zero byte is a pending
    legacy interrupt (``intx.pending``, the PCI Status register's Interrupt Status bit),
    and INTA is wanted while the command register's Interrupt Disable is clear
    (``intx.wanted``); the driver's clearing read ends both. With MSI-X enabled the bits
    are still set, and the messages go through the MSI-X table instead.
    """

    bus: In(RegBusSignature(10))
    set_queue: In(1)
    set_config: In(1)
    clear: In(1)
    msix_enable: In(1)
    interrupt_disable: In(1)
    intx: In(IntxSignature())

    def elaborate(self, platform):
        m = Module()
        status = Signal(8)
        read_clear = Signal()
        m.d.comb += [
            self.bus.ready.eq(1),
            read_clear.eq(self.bus.r_stb & (self.bus.addr == 0) & self.bus.r_strb[0]),
        ]
        with m.If(self.bus.r_stb & (self.bus.addr == 0)):
            m.d.sync += self.bus.r_data.eq(status)
        with m.Else():
            m.d.sync += self.bus.r_data.eq(0)
        set_bits = (self.set_queue * c.VIRTIO_PCI_ISR_QUEUE) | \
                   (self.set_config * c.VIRTIO_PCI_ISR_CONFIG)
        with m.If(self.clear):
            m.d.sync += status.eq(0)
        with m.Elif(read_clear):
            m.d.sync += status.eq(set_bits)
        with m.Else():
            m.d.sync += status.eq(status | set_bits)

        pending = status.any() & ~self.msix_enable
        m.d.comb += [
            self.intx.pending.eq(pending),
            self.intx.wanted.eq(pending & ~self.interrupt_disable),
        ]
        return m
