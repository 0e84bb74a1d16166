"""Event -> ISR bit + MSI-X vector routing (C11)."""

import random


from memballoon import constants as c
from memballoon.hdl.virtio.irq_router import IrqRouter
from sim_util import simulate

VECTORS = 3


def run(testbench, ready_probability=1.0, seed=0):
    dut = IrqRouter(VECTORS)
    requests = []
    rng = random.Random(seed)

    async def consumer(ctx):
        while True:
            ready = rng.random() < ready_probability
            ctx.set(dut.msix_request.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.msix_request.valid,
                                                           dut.msix_request.payload)
            if ready and valid:
                requests.append(payload)

    async def bench(ctx):
        await testbench(ctx, dut, requests)
    simulate(dut, bench, processes=[consumer])


async def fire(ctx, signal, value=1):
    ctx.set(signal, value)
    await ctx.tick()
    ctx.set(signal, 0)


def test_each_source_reaches_its_vector():
    async def testbench(ctx, dut, requests):
        ctx.set(dut.config_vector, 0)
        ctx.set(dut.queue_vectors[0], 1)
        ctx.set(dut.queue_vectors[1], 2)
        for source, vector in [("config", 0), (0, 1), (1, 2)]:
            if source == "config":
                ctx.set(dut.config_event, 1)
                assert ctx.get(dut.isr_config) and not ctx.get(dut.isr_queue)
                await ctx.tick()
                ctx.set(dut.config_event, 0)
            else:
                ctx.set(dut.queue_event, 1 << source)
                assert ctx.get(dut.isr_queue) and not ctx.get(dut.isr_config)
                await ctx.tick()
                ctx.set(dut.queue_event, 0)
            await ctx.tick().repeat(4)
            assert requests[-1] == vector
        assert requests == [0, 1, 2]
    run(testbench)


def test_no_vector_sends_nothing_but_sets_isr():
    async def testbench(ctx, dut, requests):
        ctx.set(dut.config_vector, c.VIRTIO_MSI_NO_VECTOR)
        ctx.set(dut.queue_vectors[0], c.VIRTIO_MSI_NO_VECTOR)
        ctx.set(dut.queue_vectors[1], 2)
        ctx.set(dut.config_event, 1)
        assert ctx.get(dut.isr_config)
        await ctx.tick()
        ctx.set(dut.config_event, 0)
        await fire(ctx, dut.queue_event, 0b01)
        await fire(ctx, dut.queue_event, 0b10)
        await ctx.tick().repeat(5)
        assert requests == [2]
    run(testbench)


def test_events_coalesce_while_waiting_and_none_is_lost():
    async def testbench(ctx, dut, requests):
        ctx.set(dut.config_vector, 0)
        ctx.set(dut.queue_vectors[0], 1)
        ctx.set(dut.queue_vectors[1], 2)
        for _ in range(50):
            await fire(ctx, dut.queue_event, random.Random(len(requests)).randrange(1, 4))
            await fire(ctx, dut.config_event)
        await ctx.tick().repeat(60)
        delivered = len(requests)
        # Every source that fired was delivered; events of a source that is still
        # waiting merge into one message, so there are fewer messages than events.
        assert set(requests) == {0, 1, 2}
        assert delivered < 100
        # An event after everything drained is not lost.
        await fire(ctx, dut.queue_event, 0b10)
        await ctx.tick().repeat(30)
        assert requests[delivered:] == [2]
    run(testbench, ready_probability=0.3, seed=3)


def test_reset_drops_pending():
    async def testbench(ctx, dut, requests):
        ctx.set(dut.config_vector, 0)
        await fire(ctx, dut.config_event)
        ctx.set(dut.clear, 1)
        await ctx.tick().repeat(5)
        ctx.set(dut.clear, 0)
        await ctx.tick().repeat(5)
        assert requests == []
    run(testbench, ready_probability=0.0)
