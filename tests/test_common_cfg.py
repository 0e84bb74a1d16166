"""CommonCfg against virtio 1.2 4.1.4.3 and the contract (C2, C3, C4, C9, C11)."""

import random

import pytest

from memballoon import constants as c
from memballoon.hdl.virtio.common_cfg import CommonCfg
from memballoon.params import DeviceParams
from sim_util import simulate

PARAMS = DeviceParams()
NO_VECTOR = c.VIRTIO_MSI_NO_VECTOR
ACK = c.VIRTIO_CONFIG_S_ACKNOWLEDGE
DRIVER = c.VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = c.VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = c.VIRTIO_CONFIG_S_DRIVER_OK
NEEDS_RESET = c.VIRTIO_CONFIG_S_NEEDS_RESET
FAILED = c.VIRTIO_CONFIG_S_FAILED
VERSION_1 = 1 << c.VIRTIO_F_VERSION_1

#: (offset, size) of every per-queue field (virtio 1.2 4.1.4.3).
QUEUE_FIELDS = (
    (c.VIRTIO_PCI_COMMON_Q_SIZE, 2), (c.VIRTIO_PCI_COMMON_Q_MSIX, 2),
    (c.VIRTIO_PCI_COMMON_Q_ENABLE, 2), (c.VIRTIO_PCI_COMMON_Q_NOFF, 2),
    (c.VIRTIO_PCI_COMMON_Q_DESCLO, 4), (c.VIRTIO_PCI_COMMON_Q_DESCHI, 4),
    (c.VIRTIO_PCI_COMMON_Q_AVAILLO, 4), (c.VIRTIO_PCI_COMMON_Q_AVAILHI, 4),
    (c.VIRTIO_PCI_COMMON_Q_USEDLO, 4), (c.VIRTIO_PCI_COMMON_Q_USEDHI, 4),
)


class RegBusMaster:
    """Accesses the structure as the BAR completer does: one naturally aligned 1-, 2- or
    4-byte access at a time (virtio 1.2 4.1.3.1), by byte offset."""

    def __init__(self, ctx, bus):
        self._ctx = ctx
        self._bus = bus

    def _address(self, offset, size):
        assert size in (1, 2, 4) and offset % size == 0
        assert self._ctx.get(self._bus.ready)
        self._ctx.set(self._bus.addr, offset // 4)
        return (offset % 4) * 8, ((1 << size) - 1) << offset % 4

    async def write(self, offset, value, size):
        shift, strobes = self._address(offset, size)
        self._ctx.set(self._bus.w_data, value << shift)
        self._ctx.set(self._bus.w_strb, strobes)
        self._ctx.set(self._bus.w_stb, 1)
        await self._ctx.tick()
        self._ctx.set(self._bus.w_stb, 0)

    async def read(self, offset, size):
        shift, strobes = self._address(offset, size)
        self._ctx.set(self._bus.r_strb, strobes)
        self._ctx.set(self._bus.r_stb, 1)
        await self._ctx.tick()
        self._ctx.set(self._bus.r_stb, 0)
        return self._ctx.get(self._bus.r_data) >> shift & ((1 << 8 * size) - 1)

    async def write64(self, low_offset, value):
        """virtio 1.2 4.1.3.1: the driver may write the two halves independently."""
        await self.write(low_offset, value & 0xFFFF_FFFF, 4)
        await self.write(low_offset + 4, value >> 32, 4)

    async def read64(self, low_offset):
        return await self.read(low_offset, 4) | await self.read(low_offset + 4, 4) << 32


class Driver(RegBusMaster):
    """The steps of virtio 1.2 3.1.1 that these tests repeat."""

    async def status(self):
        return await self.read(c.VIRTIO_PCI_COMMON_STATUS, 1)

    async def set_status(self, value):
        await self.write(c.VIRTIO_PCI_COMMON_STATUS, value, 1)

    async def write_features(self, features):
        for word in range(2):
            await self.write(c.VIRTIO_PCI_COMMON_GFSELECT, word, 4)
            await self.write(c.VIRTIO_PCI_COMMON_GF, features >> 32 * word & 0xFFFF_FFFF, 4)

    async def read_features(self):
        """The driver features as the device presents them."""
        features = 0
        for word in range(2):
            await self.write(c.VIRTIO_PCI_COMMON_GFSELECT, word, 4)
            features |= await self.read(c.VIRTIO_PCI_COMMON_GF, 4) << 32 * word
        return features

    async def negotiate(self, features):
        """Acknowledge, accept ``features``, set FEATURES_OK; the status read back."""
        await self.set_status(ACK)
        await self.set_status(ACK | DRIVER)
        await self.write_features(features)
        await self.set_status(ACK | DRIVER | FEATURES_OK)
        return await self.status()

    async def reset(self):
        """Write 0 and wait for 0 (virtio 1.2 4.1.4.3.2); the reads before the 0."""
        await self.set_status(0)
        nonzero_reads = []
        while value := await self.status():
            nonzero_reads.append(value)
            assert len(nonzero_reads) < 1000
        return nonzero_reads

    async def select(self, queue):
        await self.write(c.VIRTIO_PCI_COMMON_Q_SELECT, queue, 2)


async def power_on(ctx, dut):
    await ctx.tick().until(~dut.resetting)


def clearing_block(dut, busy_cycles):
    """Another block that clears its state after each ``reset_request``: it holds
    ``reset_busy`` from the cycle after the request (the latest the handshake allows) for
    the next number of cycles from ``busy_cycles``, and starts over on a new request."""
    async def testbench(ctx):
        durations = iter(busy_cycles)
        remaining = 0
        async for _, _, request in ctx.tick().sample(dut.reset_request):
            if request:
                remaining = next(durations)
            ctx.set(dut.reset_busy, remaining > 0)
            remaining = max(remaining - 1, 0)
    return testbench


def pulse_counter(dut, counts):
    """Counts the cycles in which ``reset_request`` and ``flr_done`` are high."""
    async def testbench(ctx):
        async for _, _, request, flr_done in ctx.tick().sample(dut.reset_request, dut.flr_done):
            counts["reset_request"] += request
            counts["flr_done"] += flr_done
    return testbench


def good_features(page_bit, params=PARAMS):
    """Everything offered except the other page sizes: a set C4 keeps."""
    other_pages = c.PAGE_SIZE_FEATURE_MASK & ~(1 << page_bit)
    return params.offered_features & ~other_pages


# --- Identity and read-only fields -----------------------------------------------------

def test_read_only_fields():
    dut = CommonCfg(PARAMS)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        assert await bus.read(c.VIRTIO_PCI_COMMON_NUMQ, 2) == c.NUM_QUEUES            # C2
        assert await bus.read(c.VIRTIO_PCI_COMMON_CFGGENERATION, 1) == 0              # C2
        for select in (0, 1):
            await bus.write(c.VIRTIO_PCI_COMMON_DFSELECT, select, 4)
            assert await bus.read(c.VIRTIO_PCI_COMMON_DFSELECT, 4) == select
            assert await bus.read(c.VIRTIO_PCI_COMMON_DF, 4) == \
                PARAMS.offered_features >> 32 * select & 0xFFFF_FFFF                 # C3
        for select in (2, 0xFFFF_FFFF):     # virtio 1.2 4.1.4.3.1: 0 beyond bit 63
            await bus.write(c.VIRTIO_PCI_COMMON_DFSELECT, select, 4)
            assert await bus.read(c.VIRTIO_PCI_COMMON_DF, 4) == 0

        # Driver writes to read-only fields change nothing (virtio 1.2 4.1.4.3.2).
        await bus.write(c.VIRTIO_PCI_COMMON_DFSELECT, 0, 4)
        await bus.write(c.VIRTIO_PCI_COMMON_DF, 0x1234_5678, 4)
        await bus.write(c.VIRTIO_PCI_COMMON_NUMQ, 7, 2)
        await bus.write(c.VIRTIO_PCI_COMMON_CFGGENERATION, 3, 1)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_NOFF, 5, 2)
        assert await bus.read(c.VIRTIO_PCI_COMMON_DF, 4) == PARAMS.offered_features & 0xFFFF_FFFF
        assert await bus.read(c.VIRTIO_PCI_COMMON_NUMQ, 2) == c.NUM_QUEUES
        assert await bus.read(c.VIRTIO_PCI_COMMON_CFGGENERATION, 1) == 0
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_NOFF, 2) == 0

        # queue_notify_data (NOTIF_CONFIG_DATA) and queue_reset (RING_RESET) are not
        # offered: they read 0 and ignore writes, even on an enabled queue.
        await bus.write(c.VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_NDATA, 0x1234, 2)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_RESET, 1, 2)
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_NDATA, 2) == 0
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_RESET, 2) == 0
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 1
        # The rest of the 0x40-byte window reads 0.
        assert await bus.read(c.VIRTIO_PCI_COMMON_CFG_SIZE, 4) == 0

    simulate(dut, testbench)


# --- C4 feature negotiation ----------------------------------------------------------

REFUSED_FEATURE_SETS = {
    "no page size": VERSION_1 | 1 << c.VIRTIO_MEMBALLOON_F_EXTRA_MEM,
    "two page sizes": VERSION_1 | 1 << c.VIRTIO_MEMBALLOON_F_4K | 1 << c.VIRTIO_MEMBALLOON_F_2M,
    "all page sizes": PARAMS.offered_features,
    "no VERSION_1": 1 << c.VIRTIO_MEMBALLOON_F_4K,
    "unoffered low feature": good_features(c.VIRTIO_MEMBALLOON_F_4K) |
                             1 << c.VIRTIO_MEMBALLOON_F_16G + 1,
    "unoffered high feature": good_features(c.VIRTIO_MEMBALLOON_F_2M) |
                              1 << c.VIRTIO_F_RING_PACKED,
    "unoffered page size": VERSION_1 | 1 << c.VIRTIO_MEMBALLOON_F_16G,
}


@pytest.mark.parametrize("features", REFUSED_FEATURE_SETS.values(),
                         ids=REFUSED_FEATURE_SETS.keys())
def test_features_ok_refused_until_reset(features):
    dut = CommonCfg(PARAMS)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        # C4: FEATURES_OK reads back clear, the other bits stay.
        assert await bus.negotiate(features) == ACK | DRIVER
        assert not ctx.get(dut.features_ok)
        # virtio 1.2 4.1.4.3.2: the device may present what the driver wrote.
        assert await bus.read_features() == features

        # A retry with an acceptable set is still refused: unusable until reset (C4).
        valid = good_features(c.VIRTIO_MEMBALLOON_F_4K)
        await bus.write_features(valid)
        assert await bus.read_features() == valid
        await bus.set_status(ACK | DRIVER | FEATURES_OK)
        assert await bus.status() == ACK | DRIVER
        await bus.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        assert await bus.status() == ACK | DRIVER | DRIVER_OK
        assert not ctx.get(dut.features_ok)
        assert not ctx.get(dut.driver_ok)

        # Reset clears the failure.
        await bus.reset()
        assert await bus.negotiate(valid) == ACK | DRIVER | FEATURES_OK
        assert ctx.get(dut.features_ok)

    simulate(dut, testbench)


SMALL_PAGES = tuple(c.feature_of_page_size(size) for size in (8 << 10, 16 << 10, 4 << 20))
ACCEPT_CASES = [(PARAMS, bit) for bit in PARAMS.page_size_bits] + [
    (DeviceParams(page_size_bits=(c.VIRTIO_MEMBALLOON_F_16G,)), c.VIRTIO_MEMBALLOON_F_16G),
    (DeviceParams(page_size_bits=SMALL_PAGES), SMALL_PAGES[1]),
]


@pytest.mark.parametrize("params, page_bit", ACCEPT_CASES,
                         ids=[f"{c.FEATURE_NAMES[bit]}-of-{len(params.page_size_bits)}"
                              for params, bit in ACCEPT_CASES])
def test_features_ok_kept(params, page_bit):
    dut = CommonCfg(params)
    minimal = VERSION_1 | 1 << page_bit
    full = good_features(page_bit, params)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        for features in (minimal, full):
            assert await bus.negotiate(features) == ACK | DRIVER | FEATURES_OK
            assert ctx.get(dut.features_ok)
            assert ctx.get(dut.driver_features) == features
            assert ctx.get(dut.page_shift) == c.page_shift_of_feature(page_bit)
            assert not ctx.get(dut.driver_ok)

            # Features are fixed once FEATURES_OK is set (C4).
            await bus.write_features(params.offered_features)
            assert await bus.read_features() == features
            assert ctx.get(dut.driver_features) == features

            await bus.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
            assert await bus.status() == ACK | DRIVER | FEATURES_OK | DRIVER_OK
            assert ctx.get(dut.driver_ok)
            await bus.reset()
            assert not ctx.get(dut.features_ok)
            assert ctx.get(dut.driver_features) == 0

    simulate(dut, testbench)


def test_driver_feature_select_beyond_63():
    dut = CommonCfg(PARAMS)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        await bus.write_features(VERSION_1 | 1 << c.VIRTIO_MEMBALLOON_F_4K)
        await bus.write(c.VIRTIO_PCI_COMMON_GFSELECT, 2, 4)
        await bus.write(c.VIRTIO_PCI_COMMON_GF, 0xFFFF_FFFF, 4)
        assert await bus.read(c.VIRTIO_PCI_COMMON_GFSELECT, 4) == 2
        assert await bus.read(c.VIRTIO_PCI_COMMON_GF, 4) == 0
        assert ctx.get(dut.driver_features) == VERSION_1 | 1 << c.VIRTIO_MEMBALLOON_F_4K

    simulate(dut, testbench)


# --- Device status -----------------------------------------------------------------------

def test_status_bits():
    dut = CommonCfg(PARAMS)
    reserved = 0xFF & ~sum(c.DeviceStatus)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        assert await bus.status() == 0
        # Reserved bits read 0; DEVICE_NEEDS_RESET is the device's to set.
        await bus.set_status(ACK | reserved | NEEDS_RESET)
        assert await bus.status() == ACK
        # Bits stay set until reset: the driver must not clear them (virtio 1.2 3.1.1).
        assert await bus.negotiate(good_features(c.VIRTIO_MEMBALLOON_F_1G)) == \
            ACK | DRIVER | FEATURES_OK
        await bus.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        await bus.set_status(DRIVER_OK)
        assert await bus.status() == ACK | DRIVER | FEATURES_OK | DRIVER_OK
        assert ctx.get(dut.features_ok) and ctx.get(dut.driver_ok)
        assert ctx.get(dut.device_status) == ACK | DRIVER | FEATURES_OK | DRIVER_OK
        # A driver that gives up (FAILED) stops the device.
        await bus.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED)
        assert await bus.status() == ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED
        assert ctx.get(dut.features_ok) and not ctx.get(dut.driver_ok)

    simulate(dut, testbench)


def test_needs_reset_is_sticky():
    dut = CommonCfg(PARAMS)
    running = ACK | DRIVER | FEATURES_OK | DRIVER_OK

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        await bus.negotiate(good_features(c.VIRTIO_MEMBALLOON_F_2M))
        await bus.set_status(running)
        ctx.set(dut.set_needs_reset, 1)
        await ctx.tick()
        ctx.set(dut.set_needs_reset, 0)
        assert await bus.status() == running | NEEDS_RESET
        # Driver writes cannot clear it.
        await bus.set_status(running)
        assert await bus.status() == running | NEEDS_RESET
        # C7 stops only the faulting queue: the device stays running.
        assert ctx.get(dut.driver_ok)
        # Only reset clears it.
        assert await bus.reset() == [running | NEEDS_RESET] * 2
        assert await bus.status() == 0

        # Set before the driver started: reads alone, survives status writes.
        ctx.set(dut.set_needs_reset, 1)
        await ctx.tick()
        ctx.set(dut.set_needs_reset, 0)
        assert await bus.status() == NEEDS_RESET
        await bus.set_status(ACK)
        assert await bus.status() == ACK | NEEDS_RESET

    simulate(dut, testbench)


# --- C9 reset handshake -----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_reset_waits_for_clearing_blocks(seed):
    """device_status reads non-zero until reset_busy has been low for a cycle after the
    request, then 0 (C9). Reads are back to back, one per cycle: counted from the request
    cycle, exactly busy + 2 reads see non-zero."""
    rng = random.Random(seed)
    busy_cycles = [rng.randint(0, 30) for _ in range(4)] + [0]
    dut = CommonCfg(PARAMS)
    counts = {"reset_request": 0, "flr_done": 0}

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        # Power-on is a reset from status 0: DEVICE_NEEDS_RESET until the clear is done.
        reads = []
        while value := await bus.status():
            reads.append(value)
        assert reads == [NEEDS_RESET] * (busy_cycles[0] + 2)

        # From a running device: the old status is held.
        await bus.negotiate(good_features(c.VIRTIO_MEMBALLOON_F_4K))
        await bus.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        assert ctx.get(dut.driver_ok)
        await bus.set_status(0)
        assert ctx.get(dut.resetting) and not ctx.get(dut.driver_ok)
        assert not ctx.get(dut.features_ok)
        reads = []
        while value := await bus.status():
            reads.append(value)
        assert reads == [ACK | DRIVER | FEATURES_OK | DRIVER_OK] * (busy_cycles[1] + 2)
        assert not ctx.get(dut.resetting)

        # From an acknowledged device.
        await bus.set_status(ACK)
        assert await bus.reset() == [ACK] * (busy_cycles[2] + 2)

        # From status 0: DEVICE_NEEDS_RESET stands in while resetting.
        assert await bus.reset() == [NEEDS_RESET] * (busy_cycles[3] + 2)
        assert await bus.status() == 0

    simulate(dut, testbench,
             background=[clearing_block(dut, busy_cycles), pulse_counter(dut, counts)])
    assert counts == {"reset_request": 4, "flr_done": 0}


def test_reset_restores_every_register():
    dut = CommonCfg(PARAMS)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        initial = ctx.get(dut.queues)
        assert [initial[q].size for q in range(c.NUM_QUEUES)] == [PARAMS.max_queue_size] * 2
        assert [initial[q].msix_vector for q in range(c.NUM_QUEUES)] == [NO_VECTOR] * 2
        assert ctx.get(dut.config_msix_vector) == NO_VECTOR

        await bus.negotiate(VERSION_1)          # latches a C4 failure
        await bus.write(c.VIRTIO_PCI_COMMON_MSIX, 0, 2)
        for queue in range(c.NUM_QUEUES):
            await bus.select(queue)
            await bus.write(c.VIRTIO_PCI_COMMON_Q_SIZE, 4, 2)
            await bus.write(c.VIRTIO_PCI_COMMON_Q_MSIX, 1, 2)
            for offset in (c.VIRTIO_PCI_COMMON_Q_DESCLO, c.VIRTIO_PCI_COMMON_Q_AVAILLO,
                           c.VIRTIO_PCI_COMMON_Q_USEDLO):
                await bus.write64(offset, 0xFEDC_BA98_7654_3210)
            await bus.write(c.VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2)
        await bus.write(c.VIRTIO_PCI_COMMON_DFSELECT, 1, 4)
        assert ctx.get(dut.queues) != initial

        await bus.set_status(0)
        # Everything is back at once, while device_status still reads non-zero.
        assert ctx.get(dut.resetting)
        assert ctx.get(dut.queues) == initial
        assert ctx.get(dut.config_msix_vector) == NO_VECTOR
        assert ctx.get(dut.driver_features) == 0
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SELECT, 2) == 0
        assert await bus.read(c.VIRTIO_PCI_COMMON_DFSELECT, 4) == 0
        assert await bus.read(c.VIRTIO_PCI_COMMON_GFSELECT, 4) == 0
        while await bus.status():
            pass
        # virtio 1.2 4.1.4.3.2: queue_enable reads 0 after reset; the C4 latch is gone.
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
        assert await bus.negotiate(VERSION_1 | 1 << c.VIRTIO_MEMBALLOON_F_4K) == \
            ACK | DRIVER | FEATURES_OK

    simulate(dut, testbench)


def test_writes_ignored_while_resetting():
    dut = CommonCfg(PARAMS)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        assert ctx.get(dut.resetting)
        await bus.set_status(ACK)
        await bus.write(c.VIRTIO_PCI_COMMON_MSIX, 0, 2)
        await bus.select(1)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2)
        await bus.write(c.VIRTIO_PCI_COMMON_GF, 1, 4)
        assert ctx.get(dut.resetting)
        assert await bus.status() == NEEDS_RESET
        await power_on(ctx, dut)
        assert await bus.status() == 0
        assert ctx.get(dut.config_msix_vector) == NO_VECTOR
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SELECT, 2) == 0
        assert ctx.get(dut.queues)[1].enable == 0
        assert ctx.get(dut.driver_features) == 0

    simulate(dut, testbench, background=[clearing_block(dut, [20])])


def test_flr():
    dut = CommonCfg(PARAMS)
    counts = {"reset_request": 0, "flr_done": 0}
    running = ACK | DRIVER | FEATURES_OK | DRIVER_OK

    async def flr_done_cycle(ctx):
        # flr_done comes with the first cycle in which device_status reads 0.
        resetting, status = await ctx.tick().sample(
            dut.resetting, dut.device_status).until(dut.flr_done)
        assert (resetting, status) == (0, 0)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        await bus.negotiate(good_features(c.VIRTIO_MEMBALLOON_F_4K))
        await bus.select(1)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2)
        await bus.set_status(running)
        assert ctx.get(dut.driver_ok)

        # The rising edge of flr resets; flr staying high does not reset again.
        ctx.set(dut.flr, 1)
        await ctx.tick()
        assert ctx.get(dut.reset_request) and ctx.get(dut.resetting)
        assert not ctx.get(dut.driver_ok)
        assert ctx.get(dut.queues)[1].enable == 0
        reads = []
        while value := await bus.status():
            reads.append(value)
        assert reads == [running] * (7 + 2)
        await ctx.tick().repeat(5)
        ctx.set(dut.flr, 0)
        await ctx.tick().repeat(5)
        assert counts == {"reset_request": 2, "flr_done": 1}

        # An FLR during a driver's reset restarts it; flr_done once at the end.
        await bus.set_status(ACK)
        await bus.set_status(0)
        await ctx.tick().repeat(3)
        ctx.set(dut.flr, 1)
        await ctx.tick()
        assert ctx.get(dut.reset_request)
        await ctx.tick().until(~dut.resetting)
        ctx.set(dut.flr, 0)
        await ctx.tick().repeat(3)
        assert counts == {"reset_request": 4, "flr_done": 2}

        # FLR from a status of 0.
        ctx.set(dut.flr, 1)
        await ctx.tick()
        ctx.set(dut.flr, 0)
        assert await bus.status() == NEEDS_RESET
        await ctx.tick().until(dut.flr_done)
        await ctx.tick()
        assert counts == {"reset_request": 5, "flr_done": 3}

    simulate(dut, testbench, flr_done_cycle,
             background=[clearing_block(dut, [0, 7, 10, 10, 4]), pulse_counter(dut, counts)])


# --- MSI-X vectors (virtio 1.2 4.1.5.1.2; C11) -------------------------------------------

@pytest.mark.parametrize("params", [PARAMS, DeviceParams(msix_vectors=8)],
                         ids=["3-vectors", "8-vectors"])
def test_msix_vector_mapping(params):
    dut = CommonCfg(params)
    vectors = [0, 1, params.msix_vectors - 1, params.msix_vectors, 0x7FF, 0x8000,
               NO_VECTOR - 1, NO_VECTOR, 2]

    def mapped(vector):
        return vector if vector < params.msix_vectors or vector == NO_VECTOR else NO_VECTOR

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        assert await bus.read(c.VIRTIO_PCI_COMMON_MSIX, 2) == NO_VECTOR
        for vector in vectors:
            await bus.write(c.VIRTIO_PCI_COMMON_MSIX, vector, 2)
            assert await bus.read(c.VIRTIO_PCI_COMMON_MSIX, 2) == mapped(vector)
            assert ctx.get(dut.config_msix_vector) == mapped(vector)
        for queue in range(c.NUM_QUEUES):
            await bus.select(queue)
            assert await bus.read(c.VIRTIO_PCI_COMMON_Q_MSIX, 2) == NO_VECTOR
            for vector in vectors:
                await bus.write(c.VIRTIO_PCI_COMMON_Q_MSIX, vector, 2)
                assert await bus.read(c.VIRTIO_PCI_COMMON_Q_MSIX, 2) == mapped(vector)
                assert ctx.get(dut.queues)[queue].msix_vector == mapped(vector)
            await bus.write(c.VIRTIO_PCI_COMMON_Q_MSIX, queue, 2)
        assert [ctx.get(dut.queues)[q].msix_vector for q in range(c.NUM_QUEUES)] == [0, 1]

    simulate(dut, testbench)


# --- Virtqueues -----------------------------------------------------------------------

def test_queue_registers():
    dut = CommonCfg(PARAMS)

    def areas(queue):
        return {c.VIRTIO_PCI_COMMON_Q_DESCLO: 0x1_0000_1000 + (queue << 40),
                c.VIRTIO_PCI_COMMON_Q_AVAILLO: 0x2_0000_2002 + (queue << 40),
                c.VIRTIO_PCI_COMMON_Q_USEDLO: 0x3_0000_3004 + (queue << 40)}

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        for queue in range(c.NUM_QUEUES):
            await bus.select(queue)
            assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SELECT, 2) == queue
            assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SIZE, 2) == PARAMS.max_queue_size
            assert await bus.read(c.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
            # Notify address = notify base + index * notify_off_multiplier.
            assert await bus.read(c.VIRTIO_PCI_COMMON_Q_NOFF, 2) == queue
            for offset in areas(queue):
                assert await bus.read64(offset) == 0
            await bus.write(c.VIRTIO_PCI_COMMON_Q_SIZE, 16 << queue, 2)
            for offset, address in areas(queue).items():
                await bus.write64(offset, address)

        for queue in range(c.NUM_QUEUES):
            await bus.select(queue)
            assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 16 << queue
            for offset, address in areas(queue).items():
                assert await bus.read64(offset) == address
            config = ctx.get(dut.queues)[queue]
            assert (config.size, config.desc, config.driver, config.device) == \
                (16 << queue, *areas(queue).values())

        # A queue that does not exist: every per-queue field reads 0 (virtio 1.2
        # 4.1.4.3.2: queue_size 0 = unavailable) and writes change nothing.
        before = ctx.get(dut.queues)
        for select in (c.NUM_QUEUES, 0x100, 0xFFFF):
            await bus.select(select)
            assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SELECT, 2) == select
            for offset, size in QUEUE_FIELDS:
                await bus.write(offset, 1, size)
                assert await bus.read(offset, size) == 0
        assert ctx.get(dut.queues) == before

    simulate(dut, testbench)


@pytest.mark.parametrize("max_queue_size", [256, 2, 32768])
def test_queue_size_validation(max_queue_size):
    dut = CommonCfg(DeviceParams(max_queue_size=max_queue_size))
    # Split ring only (RING_PACKED not offered): a power of two (virtio 1.2 2.7), 2**0
    # included, no larger than the maximum the device presented.
    powers = {1 << n for n in range(16) if 1 << n <= max_queue_size}
    sizes = [0, 1, 2, 3, 6, 12, 255, 256, 257, 1024, 32767, 32768, 0xFFFF]

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        for queue in range(c.NUM_QUEUES):
            await bus.select(queue)
            current = max_queue_size
            for size in sizes:
                await bus.write(c.VIRTIO_PCI_COMMON_Q_SIZE, size, 2)
                current = size if size in powers else current
                assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SIZE, 2) == current
                assert ctx.get(dut.queues)[queue].size == current

    simulate(dut, testbench)


def test_queue_locked_while_enabled():
    dut = CommonCfg(PARAMS)

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        await bus.select(c.TODEVQ)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_SIZE, 64, 2)
        await bus.write64(c.VIRTIO_PCI_COMMON_Q_DESCLO, 0x1000)
        await bus.write64(c.VIRTIO_PCI_COMMON_Q_AVAILLO, 0x2000)
        await bus.write64(c.VIRTIO_PCI_COMMON_Q_USEDLO, 0x3000)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2)
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 1
        locked = ctx.get(dut.queues)[c.TODEVQ]
        assert locked.enable == 1

        await bus.write(c.VIRTIO_PCI_COMMON_Q_SIZE, 32, 2)
        for offset in (c.VIRTIO_PCI_COMMON_Q_DESCLO, c.VIRTIO_PCI_COMMON_Q_AVAILLO,
                       c.VIRTIO_PCI_COMMON_Q_USEDLO):
            await bus.write64(offset, 0xDEAD_0000)
        # Writing 0 does not disable: only reset does without RING_RESET.
        await bus.write(c.VIRTIO_PCI_COMMON_Q_ENABLE, 0, 2)
        assert ctx.get(dut.queues)[c.TODEVQ] == locked
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 64
        assert await bus.read64(c.VIRTIO_PCI_COMMON_Q_DESCLO) == 0x1000
        assert await bus.read64(c.VIRTIO_PCI_COMMON_Q_AVAILLO) == 0x2000
        assert await bus.read64(c.VIRTIO_PCI_COMMON_Q_USEDLO) == 0x3000
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 1

        # The vector stays writable (Linux unmaps it before resetting the device).
        await bus.write(c.VIRTIO_PCI_COMMON_Q_MSIX, 2, 2)
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_MSIX, 2) == 2

        # The other queue is not locked.
        await bus.select(c.FROMDEVQ)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_SIZE, 32, 2)
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 32
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0

    simulate(dut, testbench)


# --- Byte lanes of shared dwords -------------------------------------------------------

def test_shared_dwords():
    dut = CommonCfg(PARAMS)
    status_dword = c.VIRTIO_PCI_COMMON_STATUS // 4 * 4
    queue_dword = c.VIRTIO_PCI_COMMON_Q_SIZE // 4 * 4

    async def testbench(ctx):
        bus = Driver(ctx, dut.bus)
        await power_on(ctx, dut)
        # A dword write to status | config_generation | queue_select sets the writable
        # fields; a dword read returns all of them.
        await bus.write(status_dword, 0x0001_AA00 | ACK, 4)
        assert await bus.read(status_dword, 4) == 0x0001_0000 | ACK
        assert await bus.status() == ACK
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SELECT, 2) == 1
        # Writing 0 to the neighbours is no write of 0 to device_status: no reset.
        await bus.write(c.VIRTIO_PCI_COMMON_Q_SELECT, 0, 2)
        await bus.write(c.VIRTIO_PCI_COMMON_CFGGENERATION, 0, 1)
        assert not ctx.get(dut.resetting)
        assert await bus.status() == ACK
        # Bytes merge into a field.
        await bus.write(c.VIRTIO_PCI_COMMON_Q_SELECT + 1, 0x80, 1)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_SELECT, 0x01, 1)
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SELECT, 2) == 0x8001
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SELECT + 1, 1) == 0x80

        # config_msix_vector | num_queues.
        await bus.write(c.VIRTIO_PCI_COMMON_MSIX, 1, 2)
        await bus.write(c.VIRTIO_PCI_COMMON_NUMQ, 0, 2)
        assert await bus.read(c.VIRTIO_PCI_COMMON_MSIX // 4 * 4, 4) == c.NUM_QUEUES << 16 | 1
        # A byte write to half a vector validates the merged field: 0xFF01 maps nothing
        # (drivers use 16-bit writes, virtio 1.2 4.1.3.1).
        await bus.write(c.VIRTIO_PCI_COMMON_MSIX + 1, 0xFF, 1)
        assert await bus.read(c.VIRTIO_PCI_COMMON_MSIX, 2) == NO_VECTOR

        # queue_size | queue_msix_vector, then queue_enable | queue_notify_off.
        await bus.select(c.FROMDEVQ)
        await bus.write(queue_dword, 1 << 16 | 8, 4)
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 8
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_MSIX, 2) == 1
        await bus.write(c.VIRTIO_PCI_COMMON_Q_MSIX, 0, 2)
        assert await bus.read(queue_dword, 4) == 8
        await bus.write(c.VIRTIO_PCI_COMMON_Q_SIZE, 4, 2)
        assert await bus.read(queue_dword, 4) == 4
        await bus.select(c.TODEVQ)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_NOFF, 0, 2)
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_ENABLE, 4) == c.TODEVQ << 16
        await bus.write(c.VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2)
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_ENABLE, 4) == c.TODEVQ << 16 | 1

        # The halves of a 64-bit field, and single bytes of a 32-bit one.
        await bus.select(c.FROMDEVQ)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_DESCHI, 0x1234, 4)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_DESCLO + 2, 0xABCD, 2)
        await bus.write(c.VIRTIO_PCI_COMMON_Q_DESCLO, 0x40, 1)
        assert await bus.read64(c.VIRTIO_PCI_COMMON_Q_DESCLO) == 0x1234_ABCD_0040
        assert await bus.read(c.VIRTIO_PCI_COMMON_Q_DESCLO + 2, 2) == 0xABCD

    simulate(dut, testbench)
