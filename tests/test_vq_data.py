"""DataFetcher: the readable segments of commands read in pieces and buffered, within its
buffer credits and its beats in flight (C5), and a failed read ending the data (C7)."""

import random

import pytest

from memballoon.hdl.pcie.interface import DMA_READ_BEAT_BYTES
from memballoon.hdl.virtqueue.data import DataFetcher
from memballoon.tb.seed import new_seed
from sim_util import simulate, wait_until


def memory_bytes(address, length):
    """The host memory the reads see: each byte a function of its address."""
    return bytes((at * 7 + (at >> 8) + 3) & 0xFF for at in range(address, address + length))


def beats_of(length):
    return -(-length // DMA_READ_BEAT_BYTES)


def run(segments, seed, *, buffer_depth, max_in_flight, max_read, latency=(0, 0),
        backpressure=0.0, fail_read=None):
    """Feeds ``segments`` ([(address, length, last)]) through a DataFetcher whose reads are
    answered after a seeded ``latency`` range of cycles (read number ``fail_read`` fails);
    checks the credit and in-flight rules every cycle and returns (beats taken as
    (bytes, end, error), reads issued as (address, length, mark), their cycles)."""
    dut = DataFetcher(buffer_depth=buffer_depth, max_in_flight=max_in_flight,
                      max_read=max_read)
    rng = random.Random(seed)
    reads, beats, answered, issued_at = [], [], [], []
    state = {"arrived": 0, "taken": 0, "done": False}

    def requested_beats():
        return sum(beats_of(length) for _, length, _ in reads)

    async def feeder(ctx):
        for address, length, last in segments:
            ctx.set(dut.segments.payload, {"address": address, "length": length, "last": last})
            ctx.set(dut.segments.valid, 1)
            await ctx.tick().until(dut.segments.ready)
            ctx.set(dut.segments.valid, 0)

    async def host(ctx):
        """Takes reads and answers them in order, each after its drawn latency."""
        pending = []                                # [due cycle, read, beat index]
        cycle = 0
        ctx.set(dut.read.ready, 1)
        async for _, _, valid, payload in ctx.tick().sample(dut.read.valid, dut.read.payload):
            cycle += 1
            ctx.set(dut.response.valid, 0)
            if pending and pending[0][0] <= cycle:
                due, (address, length, mark), index = pending[0]
                count = min(DMA_READ_BEAT_BYTES, length - index * DMA_READ_BEAT_BYTES)
                error = fail_read is not None and answered.count(None) == fail_read
                last = error or index == beats_of(length) - 1
                chunk = memory_bytes(address + index * DMA_READ_BEAT_BYTES, count)
                ctx.set(dut.response.payload, {"data": int.from_bytes(chunk, "little"),
                                               "count": count, "last": last,
                                               "error": error, "mark": mark})
                ctx.set(dut.response.valid, 1)
                state["arrived"] += 1
                pending[0][2] += 1
                if last:
                    pending.pop(0)
                    answered.append(None)
            if valid:
                read = (payload.command.address, payload.command.length, payload.mark)
                reads.append(read)
                issued_at.append(cycle)
                pending.append([cycle + rng.randint(*latency), read, 0])

    async def consumer(ctx):
        async for _, _, valid, ready, payload in ctx.tick().sample(
                dut.beats.valid, dut.beats.ready, dut.beats.payload):
            if valid and ready:
                chunk = payload.data.to_bytes(DMA_READ_BEAT_BYTES, "little")[:payload.count]
                beats.append((chunk, payload.end, payload.error))
                state["taken"] += 1
            ctx.set(dut.beats.ready, rng.random() >= backpressure)

    async def rules(ctx):
        """The buffer holds every beat requested and not yet taken; the beats in flight
        stay within ``max_in_flight``."""
        async for _ in ctx.tick():
            outstanding = requested_beats()
            assert outstanding - state["taken"] <= buffer_depth, "buffer credits exceeded"
            assert outstanding - state["arrived"] <= max_in_flight, "too many beats in flight"

    async def testbench(ctx):
        ends = sum(last for _, _, last in segments)
        await wait_until(ctx, lambda: sum(end for _, end, _ in beats) == ends
                         or any(error for _, _, error in beats), "every command's data")
        await ctx.tick().repeat(50)

    simulate(dut, testbench, background=[feeder, host, consumer, rules])
    return beats, reads, issued_at


def random_segments(rng, commands, max_length):
    segments = []
    for _ in range(commands):
        count = rng.randint(1, 4)
        for index in range(count):
            segments.append((rng.randrange(1 << 40), rng.randint(1, max_length),
                             index == count - 1))
    return segments


def check_data(segments, beats, reads, max_read):
    """The beats carry every segment's bytes in order, the command's last beat has
    ``end``; every read but a segment's last is ``max_read`` whole beats."""
    expected = b"".join(memory_bytes(address, length) for address, length, _ in segments)
    assert b"".join(chunk for chunk, _, _ in beats) == expected
    ends = [index for index, (_, end, _) in enumerate(beats) if end]
    assert len(ends) == sum(last for _, _, last in segments)
    assert beats[-1][1]
    at = 0
    for address, length, last in segments:
        while length > max_read * DMA_READ_BEAT_BYTES:
            assert reads[at] == (address, max_read * DMA_READ_BEAT_BYTES, 0)
            address += max_read * DMA_READ_BEAT_BYTES
            length -= max_read * DMA_READ_BEAT_BYTES
            at += 1
        assert reads[at] == (address, length, last)
        at += 1
    assert at == len(reads)


@pytest.mark.parametrize("buffer_depth,max_in_flight,max_read,latency,backpressure", [
    (512, 128, 32, (0, 3), 0.0),
    (64, 40, 8, (20, 60), 0.0),          # in flight is the limit
    (24, 128, 8, (0, 2), 0.8),           # buffer credits are the limit
    (16, 16, 16, (5, 30), 0.5),          # a read may take every credit and all the room
])
def test_segments_read_in_pieces_within_credits(buffer_depth, max_in_flight, max_read,
                                                latency, backpressure):
    seed = new_seed()
    rng = random.Random(seed)
    segments = random_segments(rng, 30, 3 * max_read * DMA_READ_BEAT_BYTES)
    # Lengths at the piece boundaries: one byte short of, at and one over a whole read.
    whole = max_read * DMA_READ_BEAT_BYTES
    segments += [(0x1000, length, True) for length in (whole - 1, whole, whole + 1,
                                                        2 * whole, 2 * whole + 1, 1)]
    beats, reads, _ = run(segments, seed, buffer_depth=buffer_depth,
                       max_in_flight=max_in_flight, max_read=max_read, latency=latency,
                       backpressure=backpressure)
    check_data(segments, beats, reads, max_read)


def test_back_to_back_reads_one_a_clock():
    """With room everywhere a long segment's reads go out on consecutive clocks."""
    segments = [(0, 8 * 4 * DMA_READ_BEAT_BYTES, True)]
    beats, reads, issued_at = run(segments, new_seed(), buffer_depth=512, max_in_flight=128,
                                  max_read=4)
    check_data(segments, beats, reads, 4)
    assert issued_at == list(range(issued_at[0], issued_at[0] + 8))


def test_failed_read_ends_the_data():
    """C7: the failed read's place holds one error beat and nothing follows it."""
    seed = new_seed()
    segments = random_segments(random.Random(seed), 10, 200)
    beats, reads, _ = run(segments, seed, buffer_depth=64, max_in_flight=32, max_read=4,
                       latency=(0, 5), fail_read=3)
    assert beats[-1][2] and not any(error for _, _, error in beats[:-1])
    data = b"".join(chunk for chunk, _, error in beats[:-1])
    before = b"".join(memory_bytes(address, length) for address, length, _ in reads[:3])
    assert data.startswith(before)
