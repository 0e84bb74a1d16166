"""Realigner: byte runs of any length joined into le64 command words (C5)."""

import os
import random

from amaranth.sim import Simulator

from memballoon.hdl.virtio.vq_realign import Realigner
from memballoon.tb.seed import new_seed


def beats_of(rng, command):
    """The command's bytes cut into buffers at random bytes, each read as DMA beats
    (8 bytes but for the buffer's last): [(bytes, end)]."""
    cuts = sorted(rng.sample(range(1, len(command)), rng.randint(0, min(6, len(command) - 1))))
    beats = []
    for start, stop in zip([0, *cuts], [*cuts, len(command)]):
        for offset in range(start, stop, 8):
            beats.append(command[offset:min(offset + 8, stop)])
    return [(chunk, index == len(beats) - 1) for index, chunk in enumerate(beats)]


def test_random_splits_with_backpressure():
    seed = new_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    commands = [bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 3, 8, 9, 16, rng.randint(1, 90)])))
                for _ in range(400)]
    # A command code split 3 + 5 over two buffers.
    commands.insert(0, bytes(range(1, 9)))
    dut = Realigner()
    producer_rng, consumer_rng = random.Random(seed + 1), random.Random(seed + 2)

    async def producer(ctx):
        beats = [(commands[0][:3], False), (commands[0][3:], True)]
        beats += [beat for command in commands[1:] for beat in beats_of(producer_rng, command)]
        for chunk, end in beats:
            # Garbage above ``count``: the realigner must mask it.
            garbage = producer_rng.getrandbits(64) & ~((1 << 8 * len(chunk)) - 1)
            ctx.set(dut.beats.payload.data, int.from_bytes(chunk, "little") | garbage)
            ctx.set(dut.beats.payload.count, len(chunk))
            ctx.set(dut.beats.payload.end, end)
            ctx.set(dut.beats.valid, 1)
            await ctx.tick().until(dut.beats.ready)
            ctx.set(dut.beats.valid, 0)
            if producer_rng.random() < 0.3:
                await ctx.tick().repeat(producer_rng.randint(1, 3))

    async def consumer(ctx):
        for command in commands:
            for offset in range(0, len(command), 8):
                expected = int.from_bytes(command[offset:offset + 8], "little")
                while consumer_rng.random() < 0.3:
                    await ctx.tick()
                ctx.set(dut.words.ready, 1)
                _, _, valid, data, last = await ctx.tick().sample(
                    dut.words.valid, dut.words.payload.data, dut.words.payload.last)
                while not valid:
                    _, _, valid, data, last = await ctx.tick().sample(
                        dut.words.valid, dut.words.payload.data, dut.words.payload.last)
                ctx.set(dut.words.ready, 0)
                assert data == expected, f"{data:#018x} != {expected:#018x}"
                assert last == (offset + 8 >= len(command))
        await ctx.tick().repeat(10)
        assert not ctx.get(dut.words.valid)

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    if os.environ.get("WAVES") == "1":
        with sim.write_vcd("test_vq_realign.vcd"):
            sim.run()
    else:
        sim.run()


def test_one_word_per_clock():
    """Full beats at any residue keep one word per clock; a command end that leaves two
    words costs one extra clock."""
    dut = Realigner()
    taken = []

    async def producer(ctx):
        # 3 bytes, then full beats: the residue stays at 3 bytes.
        beats = [(bytes(3), False)] + [(bytes(8), False)] * 20 + [(bytes(8), True)]
        for chunk, end in beats:
            ctx.set(dut.beats.payload.data, 0)
            ctx.set(dut.beats.payload.count, len(chunk))
            ctx.set(dut.beats.payload.end, end)
            ctx.set(dut.beats.valid, 1)
            await ctx.tick().until(dut.beats.ready)
        ctx.set(dut.beats.valid, 0)

    async def consumer(ctx):
        ctx.set(dut.words.ready, 1)
        cycle = 0
        while len(taken) < 22:
            _, _, valid, last = await ctx.tick().sample(dut.words.valid, dut.words.payload.last)
            cycle += 1
            if valid:
                taken.append((cycle, last))
        cycles = [cycle for cycle, _ in taken]
        assert cycles[-1] - cycles[0] == 21, cycles
        assert [last for _, last in taken] == [0] * 21 + [1]

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
