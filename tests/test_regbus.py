"""Register-bus decoder and arbiter."""

import gc
import random
import warnings

from amaranth.hdl import Module, UnusedElaboratable
from amaranth.lib import wiring
from amaranth.sim import Simulator
import pytest

from memballoon.hdl.regbus_arbiter import RegBusArbiter
from memballoon.hdl.regbus_decoder import RegBusDecoder
from memballoon.tb.regbus_sim import regbus_read, regbus_write


def run(dut, *testbenches, processes=(), clock=True):
    sim = Simulator(dut)
    if clock:
        sim.add_clock(1e-8)
    for tb in testbenches:
        sim.add_testbench(tb)
    for process in processes:
        sim.add_process(process)
    sim.run()


def register_file_slave(window, store, name):
    """A slave with one-cycle read latency, always ready, recording into ``store``."""
    async def process(ctx):
        ctx.set(window.ready, 1)
        async for clk_edge, rst, r_stb, w_stb, addr, data, strb in ctx.tick().sample(
                window.r_stb, window.w_stb, window.addr, window.w_data, window.w_strb):
            if w_stb:
                old = store.get((name, addr), 0)
                mask = sum(0xFF << 8 * i for i in range(4) if strb >> i & 1)
                store[(name, addr)] = (old & ~mask) | (data & mask)
            ctx.set(window.r_data, store.get((name, addr), 0) if r_stb else 0)
    return process


def test_decoder_routes_windows_and_reads_zero_elsewhere():
    dut = RegBusDecoder(12, {"a": (0x0000, 0x40), "b": (0x1000, 0x1000), "c": (0x3000, 0x1000)})
    store = {}
    expected = {}
    rng = random.Random(1)

    async def master(ctx):
        for _ in range(200):
            byte = rng.choice([rng.randrange(0, 0x40), rng.randrange(0x1000, 0x2000),
                               rng.randrange(0x3000, 0x4000), rng.randrange(0x40, 0x1000),
                               rng.randrange(0x2000, 0x3000)]) & ~3
            if 0x40 <= byte < 0x1000 or 0x2000 <= byte < 0x3000:
                key = None
            elif byte < 0x40:
                key = ("a", byte >> 2)
            elif byte < 0x2000:
                key = ("b", (byte - 0x1000) >> 2)
            else:
                key = ("c", (byte - 0x3000) >> 2)
            if rng.random() < 0.5:
                value = rng.getrandbits(32)
                await regbus_write(ctx, dut.bus, byte >> 2, value)
                if key:
                    expected[key] = value
            else:
                got = await regbus_read(ctx, dut.bus, byte >> 2)
                assert got == (expected.get(key, 0) if key else 0), hex(byte)
        assert store == expected

    run(dut, master, processes=[register_file_slave(dut.a, store, "a"),
                                register_file_slave(dut.b, store, "b"),
                                register_file_slave(dut.c, store, "c")])


@pytest.mark.parametrize("windows", [
    {"a": (0x0, 0x30)},                       # not a power of two
    {"a": (0x20, 0x40)},                      # not aligned
    {"a": (0x0, 0x2000), "b": (0x1000, 0x1000)},   # overlap
])
def test_decoder_rejects_bad_windows(windows):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)   # the half-built object
        with pytest.raises(ValueError):
            RegBusDecoder(12, windows)
        gc.collect()


def test_arbiter_serves_both_requesters_without_losing_accesses():
    m = Module()
    m.submodules.arbiter = arbiter = RegBusArbiter(12, 2)
    m.submodules.decoder = decoder = RegBusDecoder(12, {"all": (0, 0x4000)})
    wiring.connect(m, arbiter.bus, decoder.bus)
    store = {}
    rng = random.Random(2)
    done = []

    def requester(index):
        async def testbench(ctx):
            bus = arbiter.requesters[index]
            mine = {}
            for i in range(100):
                addr = index * 0x100 + rng.randrange(0x100)
                if rng.random() < 0.6:
                    value = rng.getrandbits(32)
                    await regbus_write(ctx, bus, addr, value)
                    mine[addr] = value
                else:
                    assert await regbus_read(ctx, bus, addr) == mine.get(addr, 0)
                for _ in range(rng.randrange(2)):
                    await ctx.tick()
            done.append(index)
        return testbench

    run(m, requester(0), requester(1),
        processes=[register_file_slave(decoder.all, store, "all")])
    assert sorted(done) == [0, 1]


def test_arbiter_priority():
    dut = RegBusArbiter(4, 2)

    async def testbench(ctx):
        for requester in dut.requesters:
            ctx.set(requester.w_stb, 1)
        ctx.set(dut.bus.ready, 1)
        ctx.set(dut.requesters[0].addr, 1)
        ctx.set(dut.requesters[1].addr, 2)
        assert ctx.get(dut.requesters[0].ready) and not ctx.get(dut.requesters[1].ready)
        assert ctx.get(dut.bus.addr) == 1
        ctx.set(dut.requesters[0].w_stb, 0)
        assert ctx.get(dut.requesters[1].ready) and ctx.get(dut.bus.addr) == 2

    run(dut, testbench, clock=False)
