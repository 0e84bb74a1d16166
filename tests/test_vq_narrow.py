"""ResponseNarrower: 16-byte read beats cut into 8-byte ones for the chain walker."""

import random

from memballoon.hdl.pcie.interface import DMA_READ_BEAT_BYTES
from memballoon.hdl.virtqueue.narrow import NARROW_BEAT_BYTES, ResponseNarrower
from memballoon.tb.seed import new_seed
from sim_util import simulate


def random_reads(rng, count):
    """[(bytes, mark, failed)]: reads of any length; a failed one ends with an error beat
    after some of its whole beats."""
    reads = []
    for _ in range(count):
        length = rng.choice([1, 8, 9, 16, 17, 32, 64, rng.randint(1, 100)])
        reads.append((bytes(rng.getrandbits(8) for _ in range(length)), rng.randrange(2),
                      rng.random() < 0.15))
    return reads


def wide_beats(read):
    """The ``ReadResponse`` beats of a read: (data bytes, count, last, error)."""
    payload, _, failed = read
    step = DMA_READ_BEAT_BYTES
    if failed:
        whole = len(payload) // step
        return [(payload[step * i:step * (i + 1)], step, False, False) for i in range(whole)] \
            + [(b"", None, True, True)]
    return [(payload[i:i + step], min(step, len(payload) - i), i + step >= len(payload), False)
            for i in range(0, len(payload), step)]


def narrow_beats(read):
    """What the narrower owes for a read: (data bytes, last, error)."""
    payload, _, failed = read
    step = NARROW_BEAT_BYTES
    length = len(payload) // DMA_READ_BEAT_BYTES * DMA_READ_BEAT_BYTES if failed else len(payload)
    beats = [(payload[i:i + step], i + step >= length and not failed, False)
             for i in range(0, length, step)]
    return beats + [(None, True, True)] if failed else beats


def run_narrower(dut, reads, seed, *, idle, backpressure, wait_per_read=False):
    """Wide beats in with idle cycles, narrow beats out with backpressure, checked. With
    ``wait_per_read`` a read's beats come only once the previous read is out, as the
    chain walker asks; returns the cycles in which ``wide.ready`` was low under a beat."""
    producer_rng, consumer_rng = random.Random(seed + 1), random.Random(seed + 2)
    stalls = []
    done_reads = []

    async def producer(ctx):
        for number, read in enumerate(reads):
            while wait_per_read and len(done_reads) < number:
                await ctx.tick()
            for chunk, count, last, error in wide_beats(read):
                if error:
                    data, count = producer_rng.getrandbits(128), producer_rng.randrange(32)
                else:
                    garbage = producer_rng.getrandbits(128) & ~((1 << 8 * len(chunk)) - 1)
                    data = int.from_bytes(chunk, "little") | garbage
                ctx.set(dut.wide.payload.data, data)
                ctx.set(dut.wide.payload.count, count)
                ctx.set(dut.wide.payload.last, last)
                ctx.set(dut.wide.payload.error, error)
                ctx.set(dut.wide.payload.mark, read[1])
                ctx.set(dut.wide.valid, 1)
                _, _, ready = await ctx.tick().sample(dut.wide.ready)
                while not ready:
                    stalls.append(number)
                    _, _, ready = await ctx.tick().sample(dut.wide.ready)
                ctx.set(dut.wide.valid, 0)
                if producer_rng.random() < idle:
                    await ctx.tick().repeat(producer_rng.randint(1, 3))

    async def consumer(ctx):
        for number, read in enumerate(reads):
            for index, (chunk, last, error) in enumerate(narrow_beats(read)):
                while consumer_rng.random() < backpressure:
                    await ctx.tick()
                ctx.set(dut.narrow.ready, 1)
                beat = dut.narrow.payload
                while True:
                    _, _, valid, data, count, b_last, b_error, mark = await ctx.tick().sample(
                        dut.narrow.valid, beat.data, beat.count, beat.last, beat.error,
                        beat.mark)
                    if valid:
                        break
                ctx.set(dut.narrow.ready, 0)
                where = f"read {number} beat {index}"
                assert (b_last, b_error, mark) == (last, error, read[1]), where
                if not error:
                    assert count == len(chunk), f"{where}: count {count}"
                    assert data >> 8 * NARROW_BEAT_BYTES == 0, f"{where}: bits above a beat"
                    data &= (1 << 8 * count) - 1     # what is above count may be anything
                    assert data == int.from_bytes(chunk, "little"), f"{where}: {data:#x}"
            done_reads.append(number)
        await ctx.tick().repeat(10)
        assert not ctx.get(dut.narrow.valid), "a beat too many"

    simulate(dut, producer, consumer)
    return stalls


def test_random_reads_with_backpressure():
    seed = new_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    run_narrower(ResponseNarrower(depth=4), random_reads(rng, 300), seed,
                 idle=0.3, backpressure=0.4)


def test_reads_of_depth_beats_never_stall():
    """A consumer that takes a beat a clock and asks for a read only once the previous
    one is out (the chain walker): reads of up to ``depth`` wide beats go in back to back."""
    seed = new_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    reads = [(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))), 0, False)
             for _ in range(100)]
    stalls = run_narrower(ResponseNarrower(depth=4), reads, seed, idle=0.0,
                          backpressure=0.0, wait_per_read=True)
    assert stalls == []
