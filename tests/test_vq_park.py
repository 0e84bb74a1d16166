"""ParkedHeads: heads of parked commands, oldest first, merged with the ring's fresh heads
in front of the ChainWalker (C6)."""

import random

import pytest

from memballoon.hdl.virtqueue.park import ParkedHeads
from memballoon.tb.seed import new_seed
from sim_util import simulate, stream_consumer, stream_put, wait_until

DEPTH = 8


@pytest.mark.parametrize("backpressure", [0.0, 0.6])
def test_random_parks_unparks_and_fresh_heads(backpressure):
    """Parks, unparks and fresh heads at random times: fresh heads go out in order,
    unparked heads in park order with ``parked`` set, one per unpark taken (none while
    nothing is parked); an offered walk holds until taken."""
    seed = new_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    dut = ParkedHeads(depth=DEPTH)
    fresh = [rng.randrange(1 << 16) for _ in range(60)]
    parks = [rng.randrange(1 << 16) for _ in range(40)]
    walks = []

    def producer(stream, payloads, idle):
        source = random.Random(rng.random())

        async def produce(ctx):
            for payload in payloads:
                await stream_put(ctx, stream, payload, source, idle)
        return produce

    async def testbench(ctx):
        await wait_until(ctx, lambda: len(walks) == len(fresh) + len(parks), "every walk")
        await ctx.tick().repeat(50)
        assert [head for head, parked in walks if not parked] == fresh
        assert [head for head, parked in walks if parked] == parks
        assert len(walks) == len(fresh) + len(parks)

    consumer = stream_consumer(dut.walks, lambda p: walks.append((p.head, p.parked)),
                               random.Random(rng.random()), backpressure)
    simulate(dut, testbench, background=[
        producer(dut.fresh, fresh, 0.7), producer(dut.park, parks, 0.5),
        producer(dut.unpark, [0] * len(parks), 0.8), consumer])


def test_an_unpark_goes_before_the_next_fresh_head():
    """Fresh heads waiting and one already offered: an unpark goes out right after the
    offered one, before the other fresh heads."""
    dut = ParkedHeads(depth=DEPTH)
    walks = []

    async def fresh(ctx):
        for head in (1, 2, 3):
            await stream_put(ctx, dut.fresh, head)

    async def testbench(ctx):
        await wait_until(ctx, lambda: ctx.get(dut.walks.valid), "the first walk offered")
        await stream_put(ctx, dut.park, 77)
        await ctx.tick().repeat(4)
        # The unpark is taken with the offered walk, and goes next.
        ctx.set(dut.walks.ready, 1)
        await stream_put(ctx, dut.unpark, 0)
        await wait_until(ctx, lambda: len(walks) == 4, "four walks")
        assert walks == [(1, 0), (77, 1), (2, 0), (3, 0)]

    async def collect(ctx):
        async for _, _, valid, ready, payload in ctx.tick().sample(
                dut.walks.valid, dut.walks.ready, dut.walks.payload):
            if valid and ready:
                walks.append((payload.head, payload.parked))

    simulate(dut, testbench, background=[fresh], processes=[collect])


def test_parking_waits_for_room():
    """``depth`` heads parked: the next park waits until an unpark makes room; nothing
    is unparked while nothing is parked."""
    dut = ParkedHeads(depth=DEPTH)

    async def testbench(ctx):
        ctx.set(dut.walks.ready, 1)
        ctx.set(dut.unpark.valid, 1)
        await ctx.tick().repeat(10)
        assert not ctx.get(dut.walks.valid), "unparked with nothing parked"
        ctx.set(dut.unpark.valid, 0)
        ctx.set(dut.walks.ready, 0)
        for head in range(DEPTH):
            await stream_put(ctx, dut.park, 100 + head)
        ctx.set(dut.park.valid, 1)
        ctx.set(dut.park.payload, 200)
        await ctx.tick().repeat(20)
        assert not ctx.get(dut.park.ready), "parked past the depth"
        await stream_put(ctx, dut.unpark, 0)
        await wait_until(ctx, lambda: ctx.get(dut.park.ready), "room after an unpark")
        assert ctx.get(dut.walks.valid) and ctx.get(dut.walks.payload.head) == 100

    simulate(dut, testbench)
