"""fromdevq and MIN_BALLOON (C6), against a parking engine model: good buffers are
parked and asked back one per minimum, malformed ones are used at once."""

import random

import pytest

from balloon_sim import ParkingEngineModel
from memballoon import constants as c
from memballoon.hdl.balloon.fromdevq import MinBalloonSender
from sim_util import simulate

MIN_BALLOON = c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON
MASK64 = 2 ** 64 - 1


def message(value):
    """The 16 bytes C6 writes, as write_data: le64 command, le64 signed bytes."""
    return MIN_BALLOON | (value & MASK64) << 64


class Bench:
    def __init__(self, seed, idle=0.3, backpressure=0.3):
        self.rng = random.Random(seed)
        self.dut = MinBalloonSender()
        self.engine = ParkingEngineModel(self.dut.command, self.rng, idle, backpressure)
        self.events = {"fromdevq_malformed": 0, "min_sent": 0, "min_dropped": 0}

    async def commit(self, ctx, value):
        ctx.set(self.dut.minimum.valid, 1)
        ctx.set(self.dut.minimum.payload, value)
        await ctx.tick()
        ctx.set(self.dut.minimum.valid, 0)

    def run(self, testbench):
        async def count_events(ctx):
            async for _, _, events in ctx.tick().sample(self.dut.events):
                for name in self.events:
                    self.events[name] += getattr(events, name)

        async def bench(ctx):
            await testbench(ctx, self)
        simulate(self.dut, bench, background=self.engine.background(),
                 processes=[count_events])


def test_a_good_buffer_waits_for_the_minimum():
    async def testbench(ctx, bench):
        ctx.set(bench.dut.extra_mem, 1)
        bench.engine.submit(b"", 16)
        await ctx.tick().repeat(50)
        assert bench.engine.results == []
        await bench.commit(ctx, 5 << 30)
        await bench.engine.wait_results(ctx)
        assert bench.engine.results == [(16, message(5 << 30), 16)]
    bench = Bench(1)
    bench.run(testbench)
    assert bench.events == {"fromdevq_malformed": 0, "min_sent": 1, "min_dropped": 0}


def test_the_newest_value_waits_for_a_buffer_and_older_ones_are_dropped():
    async def testbench(ctx, bench):
        ctx.set(bench.dut.extra_mem, 1)
        for value in (1 << 20, -(3 << 20), 7 << 20):
            await bench.commit(ctx, value)
            await ctx.tick().repeat(3)
        bench.engine.submit(b"", 32)            # larger than 16 is fine
        bench.engine.submit(b"", 16)
        await bench.engine.wait_results(ctx, 1)
        await ctx.tick().repeat(40)
        assert bench.engine.results == [(16, message(7 << 20), 16)]
        await bench.commit(ctx, -(1 << 12))     # negative: EXTRA_MEM negotiated
        await bench.engine.wait_results(ctx)
        assert bench.engine.results[1] == (16, message(-(1 << 12)), 16)
    bench = Bench(2)
    bench.run(testbench)
    assert bench.events == {"fromdevq_malformed": 0, "min_sent": 2, "min_dropped": 2}


def test_without_extra_mem_a_negative_minimum_is_sent_as_zero():
    async def testbench(ctx, bench):
        for value in (-1, -(1 << 40), 1 << 40):
            bench.engine.submit(b"", 16)
            await bench.commit(ctx, value)
            await bench.engine.wait_results(ctx)
        assert [result[1] for result in bench.engine.results] == \
            [message(0), message(0), message(1 << 40)]
    Bench(3).run(testbench)


@pytest.mark.parametrize("readable,writable", [
    (b"\x01", 16), (bytes(8), 16), (bytes(20), 0), (bytes(40), 16), (bytes(17), 24),
    (b"", 15), (b"", 0), (b"", 8)])
def test_malformed_buffers_are_used_empty_and_keep_the_pending_value(readable, writable):
    """C6: readable bytes (drained, however many word beats they take) or fewer than 16
    writable bytes."""
    async def testbench(ctx, bench):
        ctx.set(bench.dut.extra_mem, 1)
        await bench.commit(ctx, 12345 << 12)
        bench.engine.submit(readable, writable)
        bench.engine.submit(b"", 16)
        await bench.engine.wait_results(ctx)
        assert bench.engine.results == [(0, bench.engine.results[0][1], 0),
                                        (16, message(12345 << 12), 16)]
    bench = Bench(len(readable) * 31 + writable)
    bench.run(testbench)
    assert bench.events == {"fromdevq_malformed": 1, "min_sent": 1, "min_dropped": 0}


@pytest.mark.parametrize("seed", range(4))
def test_random_buffers_and_minimums(seed):
    """Commits and buffers at random times: good buffers are answered in ring order, every
    value sent was committed and newer than the one sent before, each commit is sent,
    dropped or still pending, the last value reaches a buffer offered after it, and every
    malformed buffer is answered (without a minimum)."""
    bench = Bench(seed)
    rng = bench.rng
    committed = []
    kinds = []

    async def testbench(ctx, bench):
        ctx.set(bench.dut.extra_mem, 1)
        for _ in range(60):
            if rng.random() < 0.5:
                value = rng.randrange(-(1 << 40), 1 << 40) << 12
                committed.append(value)
                await bench.commit(ctx, value)
            if rng.random() < 0.5:
                good = rng.random() < 0.6
                kinds.append(good)
                if good:
                    bench.engine.submit(b"", rng.choice([16, 24, 4096]))
                else:
                    bench.engine.submit(bytes(rng.randrange(1, 30)), rng.randrange(40))
            await ctx.tick().repeat(rng.randrange(1, 30))
        # Values for the buffers still waiting, then one buffer after a last value.
        while len(bench.engine.results) < bench.engine.submitted:
            committed.append(len(committed) << 12)
            await bench.commit(ctx, committed[-1])
            await ctx.tick().repeat(60)
        committed.append(-4096)
        await bench.commit(ctx, -4096)
        kinds.append(True)
        bench.engine.submit(b"", 16)
        await bench.engine.wait_results(ctx)

    bench.run(testbench)
    results, used = bench.engine.results, bench.engine.used
    assert sorted(used) == list(range(len(kinds))), f"seed {seed}"
    good_order = [index for index in used if kinds[index]]
    assert good_order == sorted(good_order), f"seed {seed}: good buffers out of ring order"
    sent = []
    for index, (used_len, data, count) in zip(used, results):
        if kinds[index]:
            assert (used_len, count) == (16, 16) and data & MASK64 == MIN_BALLOON, \
                f"seed {seed}"
            value = data >> 64
            sent.append(value - (1 << 64) if value >> 63 else value)
        else:
            assert (used_len, count) == (0, 0), f"seed {seed}"
    positions = [committed.index(value) for value in sent]
    assert positions == sorted(set(positions)), f"seed {seed}: {sent} from {committed}"
    assert sent[-1] == -4096, f"seed {seed}"
    assert bench.events["min_sent"] == len(sent), f"seed {seed}"
    assert bench.events["min_sent"] + bench.events["min_dropped"] == len(committed), \
        f"seed {seed}"
    assert bench.events["fromdevq_malformed"] == kinds.count(False), f"seed {seed}"


def test_malformed_buffers_behind_held_good_ones_are_used_at_once():
    """C6: three good buffers held, malformed ones interleaved behind them: every
    malformed one is used at once, in ring order, with no minimum; then each minimum
    fills the oldest good buffer, in ring order."""
    layout = [(b"", 16), (b"", 24), (b"\x01" * 8, 16), (b"", 16), (b"", 15),
              (bytes(20), 0), (b"", 32), (b"", 8)]
    good = [index for index, (readable, writable) in enumerate(layout)
            if not readable and writable >= 16]

    async def testbench(ctx, bench):
        ctx.set(bench.dut.extra_mem, 1)
        for readable, writable in layout:
            bench.engine.submit(readable, writable)
        await bench.engine.wait_results(ctx, len(layout) - len(good))
        await ctx.tick().repeat(100)
        assert bench.engine.used == [i for i in range(len(layout)) if i not in good]
        assert all(result == (0, result[1], 0) for result in bench.engine.results)
        for n, index in enumerate(good):
            await bench.commit(ctx, n << 12)
            await bench.engine.wait_results(ctx, len(layout) - len(good) + n + 1)
            assert bench.engine.used[-1] == index
            assert bench.engine.results[-1] == (16, message(n << 12), 16)
    bench = Bench(5)
    bench.run(testbench)
    assert bench.events == {"fromdevq_malformed": len(layout) - len(good),
                            "min_sent": len(good), "min_dropped": 0}


def test_a_held_buffer_that_comes_back_malformed_passes_the_minimum_on():
    """A driver changed a held buffer (now 8 writable bytes): when it comes back for a
    minimum it is used with len 0 and counted, and the minimum goes to the next held one."""
    async def testbench(ctx, bench):
        ctx.set(bench.dut.extra_mem, 1)
        bench.engine.submit(b"", 16)
        bench.engine.submit(b"", 16)
        bench.engine.changed[0] = (b"", 8)
        await ctx.tick().repeat(100)
        await bench.commit(ctx, 9 << 12)
        await bench.engine.wait_results(ctx)
        assert bench.engine.used == [0, 1]
        assert bench.engine.results[0][0::2] == (0, 0)
        assert bench.engine.results[1] == (16, message(9 << 12), 16)
    bench = Bench(6)
    bench.run(testbench)
    assert bench.events == {"fromdevq_malformed": 1, "min_sent": 1, "min_dropped": 0}
