"""The virtio notification region (virtio 1.2 4.1.4.4)."""

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ... import constants as c
from ...params import DeviceParams
from ..regbus import RegBusSignature


class VirtioNotify(wiring.Component):
    """Turns a driver write to queue ``i``'s notify address (``i * notify_off_multiplier``,
    ``queue_notify_off`` reads ``i``) into a one-cycle pulse on ``notify[i]``.

    The written value (the queue index) is not needed: the address already names the
    queue. Reads return 0. Spurious notifications are harmless (C11): the queue engine
    drains what is available, however many pulses it sees.
    """

    def __init__(self, params: DeviceParams, addr_width=10):
        self._multiplier = params.bar.notify_off_multiplier
        super().__init__({
            "bus": In(RegBusSignature(addr_width)),
            "notify": Out(c.NUM_QUEUES),
        })

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.bus.ready.eq(1)
        for queue in range(c.NUM_QUEUES):
            byte_address = queue * self._multiplier
            lanes = 0b11 << (byte_address % 4)          # the le16 queue index written there
            m.d.sync += self.notify[queue].eq(
                self.bus.w_stb & (self.bus.addr == byte_address // 4) &
                (self.bus.w_strb & lanes).any())
        return m
