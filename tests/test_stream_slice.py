"""StreamSlice: every transfer passes in order, one a clock at full throughput, under
random idle and backpressure."""

import random

import pytest
from amaranth.sim import Simulator

from memballoon.hdl.stream_slice import StreamSlice
from memballoon.tb.seed import new_seed


def run(seed, count, *, idle, backpressure):
    """Send ``count`` random words through a slice; returns (words in, words out, cycle
    of each output transfer)."""
    dut = StreamSlice(16)
    rng = random.Random(seed)
    sent = [rng.getrandbits(16) for _ in range(count)]
    received, cycles = [], []
    producer_rng, consumer_rng = random.Random(seed + 1), random.Random(seed + 2)

    async def producer(ctx):
        for word in sent:
            while producer_rng.random() < idle:
                await ctx.tick()
            ctx.set(dut.input.payload, word)
            ctx.set(dut.input.valid, 1)
            await ctx.tick().until(dut.input.ready)
            ctx.set(dut.input.valid, 0)

    async def consumer(ctx):
        cycle = 0
        while len(received) < count:
            ready = consumer_rng.random() >= backpressure
            ctx.set(dut.output.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.output.valid, dut.output.payload)
            cycle += 1
            if ready and valid:
                received.append(payload)
                cycles.append(cycle)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run_until(1e-6 * 20 * (count + 10))
    return sent, received, cycles


@pytest.mark.parametrize("idle, backpressure", [(0, 0), (0.3, 0), (0, 0.5), (0.4, 0.4)])
def test_order_under_idle_and_backpressure(idle, backpressure):
    seed = new_seed()
    sent, received, _ = run(seed, 300, idle=idle, backpressure=backpressure)
    assert received == sent, f"seed {seed}"


def test_full_throughput():
    """Without idle or backpressure a word goes out every clock."""
    seed = new_seed()
    _, received, cycles = run(seed, 50, idle=0, backpressure=0)
    assert len(received) == 50
    assert cycles == list(range(cycles[0], cycles[0] + 50)), f"seed {seed}"
