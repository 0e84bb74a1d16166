"""Notification region (virtio 1.2 4.1.4.4, C11)."""

from memballoon import constants as c
from memballoon.hdl.virtio.notify import VirtioNotify
from memballoon.params import DeviceParams
from memballoon.tb.regbus_sim import regbus_read, regbus_write
from sim_util import simulate


def test_each_queue_address_pulses_its_queue_once():
    params = DeviceParams()
    dut = VirtioNotify(params)
    pulses = []

    async def monitor(ctx):
        async for _, _, notify in ctx.tick().sample(dut.notify):
            if notify:
                pulses.append(notify)

    async def driver(ctx):
        for queue in range(c.NUM_QUEUES):
            byte = queue * params.bar.notify_off_multiplier
            await regbus_write(ctx, dut.bus, byte // 4, queue << 8 * (byte % 4),
                               0b11 << (byte % 4))
            await ctx.tick().repeat(3)
        await regbus_write(ctx, dut.bus, 0x40, 0)               # not a queue address
        await regbus_write(ctx, dut.bus, 0, 0, strb=0)          # no byte written
        assert await regbus_read(ctx, dut.bus, 0) == 0
        await ctx.tick().repeat(3)
        assert pulses == [1 << q for q in range(c.NUM_QUEUES)]

    simulate(dut, driver, processes=[monitor])
