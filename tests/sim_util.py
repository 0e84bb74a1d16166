"""Amaranth-simulator helpers shared by the unit tests: one way to run a simulation (VCD
only on request), stream producers and consumers with seeded idle and backpressure, and a
bounded wait.

Every helper draws from the caller's ``random.Random`` exactly as the tests' own copies
did, so a seed gives the same run wherever the helper is used.
"""

import os

from amaranth.sim import Simulator


def simulate(dut, *testbenches, background=(), processes=()):
    """Run ``dut`` with a 250 MHz clock until ``testbenches`` return; ``background``
    testbenches and ``processes`` run alongside. Everything is added in the order given
    (the order decides who draws from a shared generator first). ``WAVES=1`` writes
    ``<test id>.vcd``."""
    sim = Simulator(dut)
    sim.add_clock(4e-9)
    for testbench in testbenches:
        sim.add_testbench(testbench)
    for testbench in background:
        sim.add_testbench(testbench, background=True)
    for process in processes:
        sim.add_process(process)
    run_with_waves(sim)


def run_with_waves(sim):
    """``sim.run()``, writing ``<test id>.vcd`` when ``WAVES=1``: for tests that add their
    testbenches to ``sim`` in an order ``simulate`` cannot express."""
    if os.environ.get("WAVES") == "1":
        name = os.environ["PYTEST_CURRENT_TEST"].split(" ")[0].split("::")[-1]
        with sim.write_vcd(f"{name.translate(str.maketrans('[]/', '___'))}.vcd"):
            sim.run()
    else:
        sim.run()


async def stream_put(ctx, stream, payload, rng=None, idle=0.0):
    """Offer one payload after seeded idle cycles; return once it was taken."""
    while rng is not None and rng.random() < idle:
        await ctx.tick()
    ctx.set(stream.valid, 1)
    ctx.set(stream.payload, payload)
    await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


def stream_consumer(stream, on_payload, rng, backpressure):
    """A testbench handing every payload taken to ``on_payload``, with seeded backpressure
    (a probability, or a function returning one each cycle); it checks the stream rule
    that a payload stays valid and unchanged until taken."""
    async def consume(ctx):
        stalled = None
        async for _, _, valid, ready, payload in ctx.tick().sample(
                stream.valid, stream.ready, stream.payload):
            if stalled is not None:
                assert valid and payload == stalled, "payload changed or withdrawn"
            if valid and ready:
                on_payload(payload)
            stalled = payload if valid and not ready else None
            chance = backpressure() if callable(backpressure) else backpressure
            ctx.set(stream.ready, rng.random() >= chance)
    return consume


async def wait_until(ctx, condition, what, cycles=100_000):
    """Tick until ``condition()`` holds and return the cycles waited; fail naming ``what``
    instead of hanging after ``cycles``."""
    for cycle in range(cycles):
        if condition():
            return cycle
        await ctx.tick()
    raise AssertionError(f"{what} after {cycles} cycles")
