"""Realigner: byte runs of any length joined into le64 command words, two a beat, the
command code alone (C5, interface.CommandWords)."""

import itertools
import random

from memballoon.hdl.pcie.interface import DMA_READ_BEAT_BYTES
from memballoon.hdl.virtqueue.realign import Realigner
from memballoon.tb.command_words import command_beats
from memballoon.tb.seed import new_seed
from sim_util import simulate


def data_beats(command, cuts):
    """The command's bytes cut into buffers at ``cuts``, each read as DMA beats
    (``DMA_READ_BEAT_BYTES`` but for the buffer's last): [(bytes, end)]."""
    beats = []
    for start, stop in zip([0, *cuts], [*cuts, len(command)]):
        for offset in range(start, stop, DMA_READ_BEAT_BYTES):
            beats.append(command[offset:min(offset + DMA_READ_BEAT_BYTES, stop)])
    return [(chunk, index == len(beats) - 1) for index, chunk in enumerate(beats)]


def random_cuts(rng, length):
    return sorted(rng.sample(range(1, length), rng.randint(0, min(6, length - 1))))


def run(commands_and_cuts, seed, *, idle=0.0, backpressure=0.0):
    """Feeds the commands through a Realigner (garbage above each beat's ``count``),
    checks every beat of words against ``command_beats`` and returns the cycles at which
    beats were taken: [[cycle, ...] per command]."""
    dut = Realigner()
    producer_rng, consumer_rng = random.Random(seed + 1), random.Random(seed + 2)
    taken = []

    async def producer(ctx):
        for command, cuts in commands_and_cuts:
            for chunk, end in data_beats(command, cuts):
                garbage = (producer_rng.getrandbits(8 * DMA_READ_BEAT_BYTES)
                           & ~((1 << 8 * len(chunk)) - 1))
                ctx.set(dut.beats.payload.data, int.from_bytes(chunk, "little") | garbage)
                ctx.set(dut.beats.payload.count, len(chunk))
                ctx.set(dut.beats.payload.end, end)
                ctx.set(dut.beats.valid, 1)
                await ctx.tick().until(dut.beats.ready)
                ctx.set(dut.beats.valid, 0)
                if producer_rng.random() < idle:
                    await ctx.tick().repeat(producer_rng.randint(1, 3))

    async def consumer(ctx):
        cycle = 0
        for number, (command, _) in enumerate(commands_and_cuts):
            taken.append([])
            for index, (words, last) in enumerate(command_beats(command)):
                while consumer_rng.random() < backpressure:
                    await ctx.tick()
                    cycle += 1
                ctx.set(dut.words.ready, 1)
                while True:
                    _, _, valid, data, count, beat_last = await ctx.tick().sample(
                        dut.words.valid, dut.words.payload.data, dut.words.payload.count,
                        dut.words.payload.last)
                    cycle += 1
                    if valid:
                        break
                ctx.set(dut.words.ready, 0)
                where = f"command {number} ({len(command)} bytes) beat {index}"
                assert count == len(words), f"{where}: count {count} != {len(words)}"
                got = [int(data[lane]) for lane in range(count)]
                assert got == words, \
                    f"{where}: {[hex(w) for w in got]} != {[hex(w) for w in words]}"
                assert beat_last == last, f"{where}: last {beat_last}"
                taken[-1].append(cycle)
        await ctx.tick().repeat(10)
        assert not ctx.get(dut.words.valid), "a beat of words too many"

    simulate(dut, producer, consumer)
    return taken


def test_random_splits_with_backpressure():
    seed = new_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    commands = [bytes(rng.getrandbits(8) for _ in range(
                    rng.choice([1, 3, 8, 9, 16, 17, 24, 25, rng.randint(1, 90),
                                rng.randint(90, 400)])))
                for _ in range(400)]
    work = [(command, random_cuts(rng, len(command))) for command in commands]
    # A command code split 3 + 5 over two buffers.
    work.insert(0, (bytes(range(1, 9)), [3]))
    run(work, seed, idle=0.3, backpressure=0.3)


def test_every_byte_boundary():
    """A command cut at every byte, and at every pair of bytes; commands of every length
    up to four beats of words, whole."""
    seed = new_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    long = bytes(rng.getrandbits(8) for _ in range(72))
    short = bytes(rng.getrandbits(8) for _ in range(40))
    work = [(long, [cut]) for cut in range(1, len(long))]
    work += [(short, list(pair)) for pair in itertools.combinations(range(1, len(short)), 2)]
    work += [(bytes(rng.getrandbits(8) for _ in range(length)), [])
             for length in range(1, 8 * 7 + 1)]
    run(work, seed, idle=0.1, backpressure=0.1)


def test_two_words_per_clock():
    """Full data beats after a first buffer of any length (so at every residue): words per
    clock over long commands, printed (the target is 2, less the command code's beat and
    the end beat's extra clock)."""
    seed = new_seed()
    rng = random.Random(seed)
    work = []
    for residue in range(DMA_READ_BEAT_BYTES):
        command = bytes(rng.getrandbits(8) for _ in range(4096 + residue))
        work.append((command, [residue] if residue else []))
    taken = run(work, seed)
    figures = {residue: round(len(command) / 8 / (cycles[-1] - cycles[0] + 1), 3)
               for residue, ((command, _), cycles) in enumerate(zip(work, taken))}
    print("words per clock by first-buffer length", figures)
    spans = taken[-1][-1] - taken[0][0] + 1
    print(f"back to back: {sum(len(c) for c, _ in work) / 8 / spans:.3f} words per clock")
