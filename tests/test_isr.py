"""ISR status byte: set by events, read-clear (virtio 1.2 4.1.4.5), cleared by reset (C9), and
the INTx level it stands for with MSI-X disabled (C11)."""

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


# --- INTx (C11): the level behind the byte ----------------------------------------------------

def intx(ctx, dut):
    return ctx.get(dut.intx.pending), ctx.get(dut.intx.wanted)


def test_intx_asserted_by_a_bit_and_deasserted_by_the_clearing_read():
    """With MSI-X disabled a set bit is a pending INTx and INTA is wanted; the driver's
    read that clears the byte ends both, a read that leaves byte 0 alone does not."""
    async def testbench(ctx, dut):
        assert intx(ctx, dut) == (0, 0)
        for set_bit, bit in ((dut.set_queue, c.VIRTIO_PCI_ISR_QUEUE),
                             (dut.set_config, c.VIRTIO_PCI_ISR_CONFIG)):
            await pulse(ctx, set_bit)
            assert intx(ctx, dut) == (1, 1)
            await regbus_read(ctx, dut.bus, 0, strb=0b1110)
            assert intx(ctx, dut) == (1, 1)
            assert await regbus_read(ctx, dut.bus, 0) == bit
            assert intx(ctx, dut) == (0, 0)
        await pulse(ctx, dut.set_queue)
        await pulse(ctx, dut.clear)                 # a virtio reset ends it too
        assert intx(ctx, dut) == (0, 0)
    run(testbench)


def test_intx_interrupt_disable_masks_inta_not_the_pending_bit():
    """PCI: Interrupt Disable keeps INTA deasserted, the Interrupt Status bit still shows
    the pending interrupt; clearing Interrupt Disable asserts INTA again."""
    async def testbench(ctx, dut):
        ctx.set(dut.interrupt_disable, 1)
        await pulse(ctx, dut.set_config)
        assert intx(ctx, dut) == (1, 0)
        ctx.set(dut.interrupt_disable, 0)
        assert intx(ctx, dut) == (1, 1)
        ctx.set(dut.interrupt_disable, 1)
        assert intx(ctx, dut) == (1, 0)
        assert await regbus_read(ctx, dut.bus, 0) == c.VIRTIO_PCI_ISR_CONFIG
        assert intx(ctx, dut) == (0, 0)
    run(testbench)


def test_no_intx_while_msix_is_enabled():
    """With MSI-X enabled the bits are set as before but nothing is pending on INTx;
    disabling MSI-X with a bit set makes it pending."""
    async def testbench(ctx, dut):
        ctx.set(dut.msix_enable, 1)
        await pulse(ctx, dut.set_queue)
        assert intx(ctx, dut) == (0, 0)
        ctx.set(dut.msix_enable, 0)
        assert intx(ctx, dut) == (1, 1)
        ctx.set(dut.msix_enable, 1)
        assert await regbus_read(ctx, dut.bus, 0) == c.VIRTIO_PCI_ISR_QUEUE
        assert intx(ctx, dut) == (0, 0)
    run(testbench)
