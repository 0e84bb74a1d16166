# amaranth: UnusedElaboratable=no
"""VirtioCapWindow: the virtio capability chain (C2) read over cfg_ext and parsed with the
Linux header offsets, and PCI_CFG accesses into a BAR model (virtio 1.2 4.1.4.9)."""

import random
import struct

import pytest

from memballoon import constants as c
from memballoon.hdl.virtio.cap_window import VirtioCapWindow
from memballoon.params import BarLayout, DeviceParams
from sim_util import simulate

ANSWER_TIMEOUT = 200

PARAMS = [
    DeviceParams(),
    DeviceParams(cfg_ext_base=0x40, cfg_ext_size=0xC0,
                 bar=BarLayout(common_cfg=0x3000, notify=0x0000, isr=0x1000,
                               msix_table=0x2000, msix_pba=0x2800,
                               notify_off_multiplier=0)),
    # exactly as large as the chain
    DeviceParams(cfg_ext_base=0xB8, cfg_ext_size=0x48,
                 bar=BarLayout(notify_off_multiplier=8, size=0x8000)),
]


class ConfigHost:
    """The hard IP's side of cfg_ext: one access at a time, reads wait for their answer.
    ``monitor`` counts every ``read_data_valid`` cycle, to check each read of the window
    is answered exactly once."""

    def __init__(self, dut):
        self.cfg_ext = dut.cfg_ext
        self.reads = 0
        self.answers = 0

    async def monitor(self, ctx):
        while True:
            _, _, valid = await ctx.tick().sample(self.cfg_ext.read_data_valid)
            self.answers += valid

    async def read(self, ctx, register):
        ctx.set(self.cfg_ext.register_number, register)
        ctx.set(self.cfg_ext.read_received, 1)
        await ctx.tick()
        ctx.set(self.cfg_ext.read_received, 0)
        self.reads += 1
        for _ in range(ANSWER_TIMEOUT):
            _, _, valid, value = await ctx.tick().sample(self.cfg_ext.read_data_valid,
                                                         self.cfg_ext.read_data)
            if valid:
                return value
        raise AssertionError(f"read of register {register:#x} not answered")

    async def write(self, ctx, register, value, byte_enable=0xF):
        ctx.set(self.cfg_ext.register_number, register)
        ctx.set(self.cfg_ext.write_data, value)
        ctx.set(self.cfg_ext.write_byte_enable, byte_enable)
        ctx.set(self.cfg_ext.write_received, 1)
        await ctx.tick()
        ctx.set(self.cfg_ext.write_received, 0)

    async def write_byte_field(self, ctx, byte_address, value, size):
        """Write a field of ``size`` bytes that does not cross a dword."""
        lane = byte_address % 4
        await self.write(ctx, byte_address // 4, value << 8 * lane, ((1 << size) - 1) << lane)

    async def read_bytes(self, ctx, params):
        first, count = params.cfg_ext_dwords
        words = [await self.read(ctx, first + i) for i in range(count)]
        return b"".join(w.to_bytes(4, "little") for w in words)


class BarModel:
    """A register file on the register bus with random ``ready`` stalls; checks the
    master holds its request while stalled and logs every access."""

    def __init__(self, dut, rng, stall=0.5):
        self.bus = dut.bar
        self.rng = rng
        self.stall = stall
        self.dwords = 1 << len(self.bus.addr)
        self.mem = [rng.getrandbits(32) for _ in range(self.dwords)]
        self.accesses = []
        self.stall_next = 0

    async def run(self, ctx):
        bus = self.bus
        waiting = None
        while True:
            ready = self.rng.random() >= self.stall and not self.stall_next
            self.stall_next = max(0, self.stall_next - 1)
            ctx.set(bus.ready, ready)
            _, _, addr, r_stb, r_strb, w_stb, w_strb, w_data = await ctx.tick().sample(
                bus.addr, bus.r_stb, bus.r_strb, bus.w_stb, bus.w_strb, bus.w_data)
            request = (addr, r_stb, r_strb, w_stb, w_strb, w_data)
            assert not (r_stb and w_stb)
            if waiting is not None:
                assert request == waiting, "request changed while stalled"
            waiting = request if (r_stb or w_stb) and not ready else None
            ctx.set(bus.r_data, self.rng.getrandbits(32))
            if ready and r_stb:
                self.accesses.append(("read", addr * 4, r_strb))
                ctx.set(bus.r_data, self.mem[addr])
            if ready and w_stb:
                self.accesses.append(("write", addr * 4, w_strb, w_data))
                lanes = sum(0xFF << 8 * b for b in range(4) if w_strb >> b & 1)
                self.mem[addr] = self.mem[addr] & ~lanes | w_data & lanes

    def read_bytes(self, offset, length):
        value = self.mem[offset // 4] >> 8 * (offset % 4)
        return value & ((1 << 8 * length) - 1)


def parse_chain(window, base):
    """Follow cap_next from ``base`` through the window bytes, with the Linux header
    offsets; check each capability lies inside the window and the list ends."""
    caps = []
    position = base
    while position:
        assert position % 4 == 0, f"capability at {position:#x} not dword aligned"
        assert position not in [cap["position"] for cap in caps], "capability list loops"
        at = position - base
        assert 0 <= at and at + c.VIRTIO_PCI_CAP_SIZE <= len(window), "outside the window"
        cap = {
            "position": position,
            "vndr": window[at + c.VIRTIO_PCI_CAP_VNDR],
            "next": window[at + c.VIRTIO_PCI_CAP_NEXT],
            "len": window[at + c.VIRTIO_PCI_CAP_LEN],
            "type": window[at + c.VIRTIO_PCI_CAP_CFG_TYPE],
            "bar": window[at + c.VIRTIO_PCI_CAP_BAR],
            "id": window[at + c.VIRTIO_PCI_CAP_ID],
            "offset": struct.unpack_from("<I", window, at + c.VIRTIO_PCI_CAP_OFFSET)[0],
            "length": struct.unpack_from("<I", window, at + c.VIRTIO_PCI_CAP_LENGTH)[0],
        }
        assert at + cap["len"] <= len(window), "capability runs out of the window"
        if cap["type"] == c.VIRTIO_PCI_CAP_NOTIFY_CFG:
            cap["multiplier"] = struct.unpack_from("<I", window, at + c.VIRTIO_PCI_NOTIFY_CAP_MULT)[0]
        if cap["type"] == c.VIRTIO_PCI_CAP_PCI_CFG:
            cap["data"] = struct.unpack_from("<I", window, at + c.VIRTIO_PCI_CFG_CAP_DATA)[0]
        caps.append(cap)
        position = cap["next"]
    return caps


def pci_cfg_position(params, window):
    caps = parse_chain(window, params.cfg_ext_base)
    return next(cap["position"] for cap in caps if cap["type"] == c.VIRTIO_PCI_CAP_PCI_CFG)


@pytest.mark.parametrize("params", PARAMS, ids=["default", "base-0x40", "exact-fit"])
def test_capability_chain(params):
    dut = VirtioCapWindow(params)
    host = ConfigHost(dut)

    async def testbench(ctx):
        window = await host.read_bytes(ctx, params)
        caps = parse_chain(window, params.cfg_ext_base)

        assert [cap["type"] for cap in caps] == [
            c.VIRTIO_PCI_CAP_COMMON_CFG, c.VIRTIO_PCI_CAP_NOTIFY_CFG,
            c.VIRTIO_PCI_CAP_ISR_CFG, c.VIRTIO_PCI_CAP_PCI_CFG]
        common, notify, isr, pci_cfg = caps
        assert all(cap["vndr"] == c.PCI_CAP_ID_VNDR for cap in caps)
        assert all(cap["bar"] == 0 and cap["id"] == 0 for cap in caps)
        assert [cap["len"] for cap in caps] == [
            c.VIRTIO_PCI_CAP_SIZE, c.VIRTIO_PCI_NOTIFY_CAP_SIZE,
            c.VIRTIO_PCI_CAP_SIZE, c.VIRTIO_PCI_CFG_CAP_SIZE]
        assert (common["offset"], common["length"]) == \
            (params.bar.common_cfg, c.VIRTIO_PCI_COMMON_CFG_SIZE)
        multiplier = params.bar.notify_off_multiplier
        assert notify["multiplier"] == multiplier
        assert notify["offset"] == params.bar.notify
        # virtio 1.2 4.1.4.4: the area covers every queue's notify address
        notify_bytes = struct.calcsize("<H")                # le16 queue index
        assert notify["length"] == max(q * multiplier + notify_bytes
                                       for q in range(c.NUM_QUEUES))
        assert (isr["offset"], isr["length"]) == (params.bar.isr, 1)
        assert (pci_cfg["offset"], pci_cfg["length"], pci_cfg["data"]) == (0, 0, 0)
        for cap in caps:
            assert cap["offset"] + cap["length"] <= params.bar.size
        end = pci_cfg["position"] + pci_cfg["len"] - params.cfg_ext_base
        assert window[end:] == bytes(len(window) - end), "registers after the chain read 0"
        await ctx.tick().repeat(5)
        assert host.answers == host.reads == params.cfg_ext_size // 4

    simulate(dut, testbench, background=[host.monitor])


def test_window_too_small():
    with pytest.raises(ValueError, match="need 72 bytes"):
        VirtioCapWindow(DeviceParams(cfg_ext_base=0xC0, cfg_ext_size=0x40))


def test_outside_window_not_answered():
    params = DeviceParams(cfg_ext_base=0x80, cfg_ext_size=0x60)
    dut = VirtioCapWindow(params)
    host = ConfigHost(dut)
    first, count = params.cfg_ext_dwords

    async def testbench(ctx):
        before = await host.read_bytes(ctx, params)
        for register in (0, first - 1, first + count, 0x3FF):
            await host.write(ctx, register, 0xFFFF_FFFF)
            ctx.set(dut.cfg_ext.register_number, register)
            ctx.set(dut.cfg_ext.read_received, 1)
            await ctx.tick()
            ctx.set(dut.cfg_ext.read_received, 0)
            await ctx.tick().repeat(20)
        assert host.answers == host.reads
        assert await host.read_bytes(ctx, params) == before
        await ctx.tick()
        assert host.answers == host.reads

    simulate(dut, testbench, background=[host.monitor])


def test_writes_change_only_pci_cfg_fields():
    params = DeviceParams()
    dut = VirtioCapWindow(params)
    host = ConfigHost(dut)
    bar = BarModel(dut, random.Random(1))

    async def testbench(ctx):
        before = await host.read_bytes(ctx, params)
        pos = pci_cfg_position(params, before) - params.cfg_ext_base
        first, count = params.cfg_ext_dwords
        for register in range(first, first + count):   # bar becomes 0xFF before the data
            await host.write(ctx, register, 0xFFFF_FFFF)
        after = await host.read_bytes(ctx, params)
        expected = bytearray(before)
        for field, size in ((c.VIRTIO_PCI_CAP_BAR, 1), (c.VIRTIO_PCI_CAP_OFFSET, 4),
                            (c.VIRTIO_PCI_CAP_LENGTH, 4), (c.VIRTIO_PCI_CFG_CAP_DATA, 4)):
            expected[pos + field:pos + field + size] = b"\xff" * size
        assert after == bytes(expected)
        assert bar.accesses == [], "cap.bar is not 0: pci_cfg_data reaches no BAR"

        # Byte enables: one byte of cap.offset.
        offset_register = (params.cfg_ext_base + pos + c.VIRTIO_PCI_CAP_OFFSET) // 4
        await host.write(ctx, offset_register, 0x0012_3456, byte_enable=0b0100)
        assert await host.read(ctx, offset_register) == 0xFF12_FFFF
        await host.write(ctx, offset_register, 0, byte_enable=0)
        assert await host.read(ctx, offset_register) == 0xFF12_FFFF

    simulate(dut, testbench, background=[host.monitor, bar.run])


async def set_pci_cfg(ctx, host, base, bar_index, offset, length):
    await host.write_byte_field(ctx, base + c.VIRTIO_PCI_CAP_BAR, bar_index, 1)
    await host.write_byte_field(ctx, base + c.VIRTIO_PCI_CAP_OFFSET, offset, 4)
    await host.write_byte_field(ctx, base + c.VIRTIO_PCI_CAP_LENGTH, length, 4)


@pytest.mark.parametrize("params", PARAMS[:2], ids=["default", "base-0x40"])
def test_pci_cfg_accesses(params):
    """Lengths 1, 2 and 4 at every alignment (misaligned ones do nothing), and accesses
    that name another BAR, a bad length or an offset past the BAR, which do nothing."""
    dut = VirtioCapWindow(params)
    host = ConfigHost(dut)
    rng = random.Random(2)
    bar = BarModel(dut, random.Random(3), stall=0.6)

    async def testbench(ctx):
        window = await host.read_bytes(ctx, params)
        base = pci_cfg_position(params, window)
        data_register = (base + c.VIRTIO_PCI_CFG_CAP_DATA) // 4
        pci_cfg_data = 0

        cases = [(0, o, length) for length in (1, 2, 4) for o in range(4)]
        cases += [(b, 0, 4) for b in (1, 5, 0xFF)]
        cases += [(0, 0, length) for length in (0, 3, 8, 0x104)]
        cases += [(0, params.bar.size, 4), (0, params.bar.size - 4, 4), (0, 0xFFFF_FFFC, 4)]
        for bar_index, lane_or_offset, length in cases:
            offset = lane_or_offset if lane_or_offset >= 4 else \
                rng.randrange(params.bar.size // 4) * 4 + lane_or_offset
            valid = (bar_index == 0 and length in (1, 2, 4) and offset % length == 0
                     and offset < params.bar.size)
            await set_pci_cfg(ctx, host, base, bar_index, offset, length)

            value = rng.getrandbits(32)
            byte_enable = rng.choice([0xF, rng.randrange(1, 16)])
            lanes = sum(0xFF << 8 * b for b in range(4) if byte_enable >> b & 1)
            pci_cfg_data = pci_cfg_data & ~lanes | value & lanes
            old = bar.mem[offset // 4 % bar.dwords]
            await host.write(ctx, data_register, value, byte_enable)
            await host.read(ctx, (base + c.VIRTIO_PCI_CAP_LENGTH) // 4)  # let the write finish
            writes = [a for a in bar.accesses if a[0] == "write"]
            bar.accesses.clear()
            if valid:
                strobe = ((1 << length) - 1) << offset % 4
                assert [(a[1], a[2]) for a in writes] == [(offset & ~3, strobe)]
                shift = 8 * (offset % 4)
                mask = ((1 << 8 * length) - 1) << shift
                assert bar.mem[offset // 4] == old & ~mask | (pci_cfg_data << shift) & mask
            else:
                assert writes == []

            bar.mem[offset // 4 % bar.dwords] = rng.getrandbits(32)
            answer = await host.read(ctx, data_register)
            reads = [a for a in bar.accesses if a[0] == "read"]
            bar.accesses.clear()
            if valid:
                pci_cfg_data = bar.read_bytes(offset, length)
                assert reads == [("read", offset & ~3, ((1 << length) - 1) << offset % 4)]
            else:
                assert reads == []
            assert answer == pci_cfg_data
            assert await host.read(ctx, data_register) == pci_cfg_data

        # A write that enables no byte of pci_cfg_data is no write to it.
        await set_pci_cfg(ctx, host, base, 0, 0x40, 4)
        await host.write(ctx, data_register, 0x1234_5678, byte_enable=0)
        await ctx.tick().repeat(30)
        assert [a for a in bar.accesses if a[0] == "write"] == []
        assert host.answers == host.reads

    simulate(dut, testbench, background=[host.monitor, bar.run])


def test_access_held_while_bar_write_stalls():
    """A configuration access that comes while a PCI_CFG write waits for the bus is
    served after it, in order."""
    params = DeviceParams()
    dut = VirtioCapWindow(params)
    host = ConfigHost(dut)
    bar = BarModel(dut, random.Random(4), stall=0)

    async def testbench(ctx):
        window = await host.read_bytes(ctx, params)
        base = pci_cfg_position(params, window)
        data_register = (base + c.VIRTIO_PCI_CFG_CAP_DATA) // 4
        offset_register = (base + c.VIRTIO_PCI_CAP_OFFSET) // 4
        await set_pci_cfg(ctx, host, base, 0, 0x100, 4)

        bar.stall_next = 40
        await host.write(ctx, data_register, 0xAABB_CCDD)
        await host.write(ctx, offset_register, 0x200)        # back to back: held
        await ctx.tick().repeat(60)
        assert bar.accesses == [("write", 0x100, 0xF, 0xAABB_CCDD)]
        bar.accesses.clear()

        bar.stall_next = 40
        await host.write(ctx, data_register, 0x1122_3344)
        await ctx.tick().repeat(10)
        assert ctx.get(dut.bar.w_stb), "the read comes while the write is stalled"
        assert await host.read(ctx, offset_register) == 0x200
        assert bar.accesses == [("write", 0x200, 0xF, 0x1122_3344)]
        assert bar.mem[0x200 // 4] == 0x1122_3344
        await ctx.tick().repeat(5)
        assert host.answers == host.reads

    simulate(dut, testbench, background=[host.monitor, bar.run])
