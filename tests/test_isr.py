"""ISR status byte: set by events, read-clear (virtio 1.2 4.1.4.5), cleared by reset (C9)."""

from memballoon import constants as c
from memballoon.hdl.virtio.isr import VirtioIsr
from memballoon.tb.regbus_sim import regbus_read
from sim_util import simulate


def run(testbench):
    dut = VirtioIsr()

    async def bench(ctx):
        await testbench(ctx, dut)
    simulate(dut, bench)


async def pulse(ctx, signal):
    ctx.set(signal, 1)
    await ctx.tick()
    ctx.set(signal, 0)


def test_read_returns_and_clears():
    async def testbench(ctx, dut):
        assert await regbus_read(ctx, dut.bus, 0) == 0
        await pulse(ctx, dut.set_queue)
        await pulse(ctx, dut.set_config)
        assert await regbus_read(ctx, dut.bus, 0) == c.VIRTIO_PCI_ISR_QUEUE | c.VIRTIO_PCI_ISR_CONFIG
        assert await regbus_read(ctx, dut.bus, 0) == 0
    run(testbench)


def test_read_without_byte_zero_does_not_clear():
    async def testbench(ctx, dut):
        await pulse(ctx, dut.set_config)
        await regbus_read(ctx, dut.bus, 0, strb=0b1110)
        assert await regbus_read(ctx, dut.bus, 0, strb=0b0001) == c.VIRTIO_PCI_ISR_CONFIG
    run(testbench)


def test_event_during_clearing_read_survives():
    async def testbench(ctx, dut):
        await pulse(ctx, dut.set_queue)
        ctx.set(dut.set_config, 1)
        assert await regbus_read(ctx, dut.bus, 0) == c.VIRTIO_PCI_ISR_QUEUE
        ctx.set(dut.set_config, 0)
        assert await regbus_read(ctx, dut.bus, 0) == c.VIRTIO_PCI_ISR_CONFIG
    run(testbench)


def test_reset_clears():
    async def testbench(ctx, dut):
        await pulse(ctx, dut.set_queue)
        await pulse(ctx, dut.clear)
        assert await regbus_read(ctx, dut.bus, 0) == 0
    run(testbench)
