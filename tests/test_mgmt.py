"""Host management port (C10) over AXI4-Lite, alone and wired to the balloon core."""

import random

from amaranth.hdl import Module
from amaranth.lib import data, wiring

from memballoon import constants as c
from memballoon.hdl.balloon.core import BalloonCore
from memballoon.hdl.balloon.interface import BalloonCounters
from memballoon.hdl.mgmt import _COUNTER_REGISTERS, MgmtPort
from sim_util import simulate


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
    # A gap only while one half waits for the other: with both valid, the slave takes
    # the write at the next edge.
    for _ in range(rng.randrange(3) if order != "both" else 0):
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

    async def bench(ctx):
        await testbench(ctx, dut, resets)
    simulate(dut, bench, processes=[monitor])


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


# --- The balloon's registers (C6, C8, C10) ---------------------------------------------

def run_balloon(testbench, seed=0):
    """MgmtPort with the commits it sends to the balloon core collected per stream."""
    dut = MgmtPort()
    rng = random.Random(seed)
    commits = {"min_balloon": [], "return_budget_write": [], "extra_range_write": []}

    async def monitor(ctx):
        streams = [getattr(dut.balloon, name) for name in commits]
        async for _, _, *values in ctx.tick().sample(
                *(s.valid for s in streams), *(s.payload for s in streams)):
            for name, valid, payload in zip(commits, values, values[len(streams):]):
                if valid:
                    commits[name].append(payload)

    async def bench(ctx):
        await testbench(ctx, dut, commits, rng)
    simulate(dut, bench, processes=[monitor])


def test_balloon_state_and_counters_read_back():
    counter_names = list(data.Layout.cast(BalloonCounters).members)
    counter_offsets = {name: offset for offset, name in _COUNTER_REGISTERS.items()}

    async def testbench(ctx, dut, commits, rng):
        balloon = dut.balloon
        ctx.set(balloon.balloon_pages, -5)
        ctx.set(balloon.bitmap_pages, 2 ** 20)
        ctx.set(balloon.return_budget, 77)
        ctx.set(balloon.busy, 1)
        ctx.set(balloon.counters, {name: 0x100 + i for i, name in enumerate(counter_names)})
        ctx.set(dut.page_shift, 21)
        ctx.set(dut.device_status, c.VIRTIO_CONFIG_S_DRIVER)
        assert await axil_read(ctx, dut.axil, c.MGMT_PAGE_SHIFT) == 0    # not negotiated yet
        ctx.set(dut.device_status, c.VIRTIO_CONFIG_S_DRIVER | c.VIRTIO_CONFIG_S_FEATURES_OK)
        assert await axil_read(ctx, dut.axil, c.MGMT_PAGE_SHIFT) == 21
        assert await axil_read(ctx, dut.axil, c.MGMT_BALLOON_PAGES) == 2 ** 32 - 5
        assert await axil_read(ctx, dut.axil, c.MGMT_BITMAP_PAGES) == 2 ** 20
        assert await axil_read(ctx, dut.axil, c.MGMT_RETURN_BUDGET) == 77
        assert await axil_read(ctx, dut.axil, c.MGMT_BUSY) == 1
        for i, name in enumerate(counter_names):
            assert await axil_read(ctx, dut.axil, counter_offsets[name]) == 0x100 + i, name
    assert set(_COUNTER_REGISTERS.values()) == set(counter_names)
    run_balloon(testbench)


def test_window_base_is_written_only_while_driver_ok_is_clear():
    async def testbench(ctx, dut, commits, rng):
        await axil_write(ctx, dut.axil, c.MGMT_WINDOW_BASE_LO, 0x4000_0000, rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_WINDOW_BASE_HI, 0x12, rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_WINDOW_BASE_HI, 0xAB00, strb=0b0010, rng=rng)
        assert ctx.get(dut.balloon.window_base) == 0xAB12_4000_0000
        ctx.set(dut.device_status, c.VIRTIO_CONFIG_S_DRIVER_OK | c.VIRTIO_CONFIG_S_FEATURES_OK)
        await axil_write(ctx, dut.axil, c.MGMT_WINDOW_BASE_LO, 0, rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_WINDOW_BASE_HI, 0, rng=rng)
        assert ctx.get(dut.balloon.window_base) == 0xAB12_4000_0000
        assert await axil_read(ctx, dut.axil, c.MGMT_WINDOW_BASE_LO) == 0x4000_0000
        assert await axil_read(ctx, dut.axil, c.MGMT_WINDOW_BASE_HI) == 0xAB12
    run_balloon(testbench, seed=1)


def test_host_settings_commit_on_their_last_register():
    """MIN_BALLOON commits on the HI write (C6), the extra range on EXTRA_PAGES (C8), the
    budget on its write (C10); one commit per write."""
    async def testbench(ctx, dut, commits, rng):
        minimum = -(3 << 30)
        await axil_write(ctx, dut.axil, c.MGMT_MIN_BALLOON_LO, minimum & 0xFFFF_FFFF, rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_EXTRA_FIRST_PAGE, 4096, rng=rng)
        assert commits == {"min_balloon": [], "return_budget_write": [],
                           "extra_range_write": []}
        await axil_write(ctx, dut.axil, c.MGMT_MIN_BALLOON_HI, minimum >> 32 & 0xFFFF_FFFF,
                         rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_EXTRA_PAGES, 512, rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_RETURN_BUDGET, 99, rng=rng)
        await axil_write(ctx, dut.axil, c.MGMT_RETURN_BUDGET, c.MGMT_UNLIMITED_BUDGET, rng=rng)
        await ctx.tick()
        assert commits["min_balloon"] == [minimum]
        assert [(r.first, r.count) for r in commits["extra_range_write"]] == [(4096, 512)]
        assert commits["return_budget_write"] == [99, c.MGMT_UNLIMITED_BUDGET]
        assert await axil_read(ctx, dut.axil, c.MGMT_EXTRA_FIRST_PAGE) == 4096
        assert await axil_read(ctx, dut.axil, c.MGMT_EXTRA_PAGES) == 512
        assert await axil_read(ctx, dut.axil, c.MGMT_MIN_BALLOON_LO) == minimum & 0xFFFF_FFFF
        assert await axil_read(ctx, dut.axil, c.MGMT_MIN_BALLOON_HI) == \
            minimum >> 32 & 0xFFFF_FFFF
    run_balloon(testbench, seed=2)


def test_bitmap_data_waits_for_the_core():
    async def testbench(ctx, dut, commits, rng):
        balloon = dut.balloon
        for index in (0, 5, 0xFFFF_FFFF):
            await axil_write(ctx, dut.axil, c.MGMT_BITMAP_INDEX, index, rng=rng)
            assert await axil_read(ctx, dut.axil, c.MGMT_BITMAP_INDEX) == index
            ctx.set(dut.axil.araddr, c.MGMT_BITMAP_DATA)
            ctx.set(dut.axil.arvalid, 1)
            await ctx.tick().until(dut.axil.arready)
            ctx.set(dut.axil.arvalid, 0)
            await ctx.tick().until(balloon.bitmap_read.valid)
            assert ctx.get(balloon.bitmap_read.payload) == index
            ctx.set(balloon.bitmap_read.ready, 1)
            await ctx.tick()
            ctx.set(balloon.bitmap_read.ready, 0)
            for _ in range(rng.randrange(1, 6)):           # the core takes its time
                assert not ctx.get(dut.axil.rvalid) and not ctx.get(dut.axil.arready)
                assert not ctx.get(balloon.bitmap_read.valid)
                await ctx.tick()
            ctx.set(balloon.bitmap_data.valid, 1)
            ctx.set(balloon.bitmap_data.payload, index ^ 0x5A5A_5A5A)
            await ctx.tick()
            ctx.set(balloon.bitmap_data.valid, 0)
            await ctx.tick().until(dut.axil.rvalid)
            assert ctx.get(dut.axil.rdata) == index ^ 0x5A5A_5A5A
            ctx.set(dut.axil.rready, 1)
            await ctx.tick()
            ctx.set(dut.axil.rready, 0)
    run_balloon(testbench, seed=3)


def test_ring_faults_are_counted_and_the_last_kept():
    async def testbench(ctx, dut, commits, rng):
        for faults, kinds in [(0b01, (c.RingFault.DESC_INDEX, c.RingFault.NONE)),
                              (0b11, (c.RingFault.CHAIN_LOOP, c.RingFault.DMA_WRITE)),
                              (0b01, (c.RingFault.INDIRECT_LENGTH, c.RingFault.NONE))]:
            ctx.set(dut.ring_fault, faults)
            ctx.set(dut.ring_fault_kind, list(kinds))
            await ctx.tick()
            ctx.set(dut.ring_fault, 0)
            await ctx.tick()
            if faults == 0b11:
                assert await axil_read(ctx, dut.axil, c.MGMT_FAULT_INFO) == \
                    1 << 8 | c.RingFault.DMA_WRITE.value
        assert await axil_read(ctx, dut.axil, c.MGMT_RING_FAULTS) == 4
        assert await axil_read(ctx, dut.axil, c.MGMT_FAULT_INFO) == \
            c.RingFault.INDIRECT_LENGTH.value
    run_balloon(testbench, seed=4)


def test_the_host_sets_up_and_reads_the_balloon_core():
    """MgmtPort wired to BalloonCore as the device wires them: an extra range committed
    over AXI4-Lite is filled (BUSY meanwhile) and read back through the bitmap window."""
    m = Module()
    m.submodules.mgmt = mgmt = MgmtPort()
    m.submodules.core = core = BalloonCore(2 ** 10)
    wiring.connect(m, mgmt.balloon, core.host)

    async def testbench(ctx):
        rng = random.Random(5)
        await axil_write(ctx, mgmt.axil, c.MGMT_EXTRA_FIRST_PAGE, 40, rng=rng)
        await axil_write(ctx, mgmt.axil, c.MGMT_EXTRA_PAGES, 30, rng=rng)
        assert await axil_read(ctx, mgmt.axil, c.MGMT_BUSY) == 1
        while await axil_read(ctx, mgmt.axil, c.MGMT_BUSY):
            pass
        assert await axil_read(ctx, mgmt.axil, c.MGMT_EXTRA_FIRST_PAGE) == 40
        assert await axil_read(ctx, mgmt.axil, c.MGMT_EXTRA_PAGES) == 30
        words = []
        for index in range(4):
            await axil_write(ctx, mgmt.axil, c.MGMT_BITMAP_INDEX, index, rng=rng)
            words.append(await axil_read(ctx, mgmt.axil, c.MGMT_BITMAP_DATA))
        assert words == [0, 0xFFFF_FF00, 0x3F, 0]
        assert await axil_read(ctx, mgmt.axil, c.MGMT_BITMAP_PAGES) == 2 ** 10
        assert await axil_read(ctx, mgmt.axil, c.MGMT_RETURN_BUDGET) == c.MGMT_UNLIMITED_BUDGET

    simulate(m, testbench)
