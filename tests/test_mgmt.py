"""Host management port (C10) over AXI4-Lite."""

import random

from amaranth.sim import Simulator

from memballoon import constants as c
from memballoon.hdl.mgmt import MgmtPort


async def axil_write(ctx, axil, addr, data, strb=0xF, rng=None):
    """Address and data may arrive in either order, with gaps (AXI4-Lite allows both)."""
    rng = rng or random.Random(0)
    ctx.set(axil.bready, 0)
    order = rng.choice(["aw", "w", "both"])
    if order in ("aw", "both"):
        ctx.set(axil.awaddr, addr)
        ctx.set(axil.awvalid, 1)
    if order in ("w", "both"):
        ctx.set(axil.wdata, data)
        ctx.set(axil.wstrb, strb)
        ctx.set(axil.wvalid, 1)
    for _ in range(rng.randrange(3)):
        await ctx.tick()
    ctx.set(axil.awaddr, addr)
    ctx.set(axil.awvalid, 1)
    ctx.set(axil.wdata, data)
    ctx.set(axil.wstrb, strb)
    ctx.set(axil.wvalid, 1)
    await ctx.tick().until(axil.awready & axil.wready)
    ctx.set(axil.awvalid, 0)
    ctx.set(axil.wvalid, 0)
    await ctx.tick().until(axil.bvalid)
    ctx.set(axil.bready, 1)
    assert ctx.get(axil.bresp) == 0
    await ctx.tick()
    ctx.set(axil.bready, 0)


async def axil_read(ctx, axil, addr):
    ctx.set(axil.araddr, addr)
    ctx.set(axil.arvalid, 1)
    await ctx.tick().until(axil.arready)
    ctx.set(axil.arvalid, 0)
    await ctx.tick().until(axil.rvalid)
    value, resp = ctx.get(axil.rdata), ctx.get(axil.rresp)
    ctx.set(axil.rready, 1)
    await ctx.tick()
    ctx.set(axil.rready, 0)
    assert resp == 0
    return value


def run(testbench):
    dut = MgmtPort()
    resets = []

    async def monitor(ctx):
        async for _, _, request_reset in ctx.tick().sample(dut.request_reset):
            if request_reset:
                resets.append(1)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_process(monitor)

    async def bench(ctx):
        await testbench(ctx, dut, resets)
    sim.add_testbench(bench)
    sim.run()


def test_identity_and_mirrored_state():
    async def testbench(ctx, dut, resets):
        ctx.set(dut.device_status, 0x0F)
        ctx.set(dut.driver_features, 0x0000_0011_0000_0403)
        ctx.set(dut.msix_sent, 7)
        ctx.set(dut.msix_failed, 2)
        assert await axil_read(ctx, dut.axil, c.MGMT_ID) == c.MGMT_ID_VALUE
        assert await axil_read(ctx, dut.axil, c.MGMT_VERSION) == c.MGMT_VERSION_VALUE
        assert await axil_read(ctx, dut.axil, c.MGMT_DEVICE_STATUS) == 0x0F
        assert await axil_read(ctx, dut.axil, c.MGMT_DRIVER_FEATURES_LO) == 0x0000_0403
        assert await axil_read(ctx, dut.axil, c.MGMT_DRIVER_FEATURES_HI) == 0x0000_0011
        assert await axil_read(ctx, dut.axil, c.MGMT_MSIX_SENT) == 7
        assert await axil_read(ctx, dut.axil, c.MGMT_MSIX_FAILED) == 2
        assert await axil_read(ctx, dut.axil, 0xFFC) == 0
    run(testbench)


def test_notify_counters():
    async def testbench(ctx, dut, resets):
        for queue, count in [(0, 3), (1, 5)]:
            for _ in range(count):
                ctx.set(dut.notify, 1 << queue)
                await ctx.tick()
                ctx.set(dut.notify, 0)
                await ctx.tick()
        assert await axil_read(ctx, dut.axil, c.MGMT_NOTIFY_COUNT_Q0) == 3
        assert await axil_read(ctx, dut.axil, c.MGMT_NOTIFY_COUNT_Q1) == 5
    run(testbench)


def test_control_requests_reset_once_per_write():
    async def testbench(ctx, dut, resets):
        rng = random.Random(4)
        await axil_write(ctx, dut.axil, c.MGMT_CONTROL, 0, rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_ID, c.MGMT_CONTROL_REQUEST_RESET, rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_CONTROL, c.MGMT_CONTROL_REQUEST_RESET,
                         strb=0b1110, rng=rng)
        assert resets == []
        for _ in range(3):
            await axil_write(ctx, dut.axil, c.MGMT_CONTROL, c.MGMT_CONTROL_REQUEST_RESET, rng=rng)
        await ctx.tick().repeat(2)
        assert resets == [1, 1, 1]
    run(testbench)
