"""DescriptorPrefetcher: the head descriptors of available chains read ahead of the walk,
several heads a read, many reads in flight."""

import random

import pytest

from memballoon import constants as c
from memballoon.hdl.pcie.interface import DMA_READ_BEAT_BYTES
from memballoon.hdl.virtqueue.split.chain import PREFETCH_WINDOW
from memballoon.hdl.virtqueue.split.prefetch import MAX_SPAN, PREFETCH_DEPTH, DescriptorPrefetcher
from memballoon.tb.seed import new_seed
from sim_util import simulate, stream_consumer, stream_put, wait_until

TABLE = 0x10000


class ReadModel:
    """The ReadPort as the prefetcher sees it: takes a read when offered (with seeded
    stalls), answers each after ``latency`` cycles, in order, 16 bytes a beat; a read
    touching a ``failing`` descriptor index ends with one error beat instead."""

    def __init__(self, dut, table, rng, latency, failing=()):
        self.dut, self.table, self.rng, self.latency = dut, table, rng, latency
        self.failing = set(failing)
        self.reads = []             # (cycle, first descriptor, descriptors)
        self.outstanding = 0
        self.most_outstanding = 0
        self.cycle = 0
        self.queue = []             # (ready cycle, beats)

    def beats(self, first, count):
        if self.failing & set(range(first, first + count)):
            return [dict(data=0, count=0, last=1, error=1)]
        return [dict(data=self.table[first + i], count=DMA_READ_BEAT_BYTES,
                     last=int(i == count - 1), error=0) for i in range(count)]

    async def serve(self, ctx):
        dut = self.dut
        while True:
            stall = self.rng.random() < 0.2
            ctx.set(dut.read.ready, not stall)
            ctx.set(dut.response.valid, 0)
            beat = None
            if self.queue and self.queue[0][0] <= self.cycle:
                beat = self.queue[0][1][0]
                ctx.set(dut.response.valid, 1)
                ctx.set(dut.response.payload, beat)
            _, _, read_valid, command, response_ready = await ctx.tick().sample(
                dut.read.valid, dut.read.payload.command, dut.response.ready)
            self.cycle += 1
            if beat is not None and response_ready:
                self.queue[0][1].pop(0)
                if not self.queue[0][1]:
                    self.queue.pop(0)
                    self.outstanding -= 1
            if read_valid and not stall:
                offset = command.address - TABLE
                assert offset % c.VRING_DESC_SIZE == 0 and command.length % c.VRING_DESC_SIZE == 0
                first, count = offset // c.VRING_DESC_SIZE, command.length // c.VRING_DESC_SIZE
                assert 1 <= count <= MAX_SPAN
                self.reads.append((self.cycle, first, count))
                self.queue.append((self.cycle + self.latency, self.beats(first, count)))
                self.outstanding += 1
                self.most_outstanding = max(self.most_outstanding, self.outstanding)


def run(heads, size, *, latency=125, failing=(), head_idle=0.0, backpressure=0.0, seed=None):
    """Feed ``heads`` (head, parked); return the walks, the read model and the dut."""
    seed = new_seed() if seed is None else seed
    print(f"seed {seed}")
    rng = random.Random(seed)
    table = [rng.getrandbits(8 * c.VRING_DESC_SIZE) for _ in range(size)]
    dut = DescriptorPrefetcher()
    reads = ReadModel(dut, table, random.Random(rng.random()), latency, failing)
    walks = []

    async def produce(ctx):
        source = random.Random(rng.random())
        await ctx.tick()                    # the queue is configured before it runs
        for head, parked in heads:
            await stream_put(ctx, dut.heads, {"head": head, "parked": parked}, source, head_idle)

    async def testbench(ctx):
        ctx.set(dut.config.size, size)
        ctx.set(dut.config.desc, TABLE)
        await wait_until(ctx, lambda: len(walks) == len(heads), "every walk",
                         cycles=20 * latency * len(heads) + 1000)
        await ctx.tick().repeat(20)
        assert ctx.get(dut.idle)

    def take(payload):
        window = [payload.window[i].as_value().value for i in range(PREFETCH_WINDOW)]
        walks.append((payload.walk.head, payload.walk.parked, payload.filled, window))

    consumer = stream_consumer(dut.walks, take, random.Random(rng.random()), backpressure)
    simulate(dut, testbench, background=[produce, reads.serve, consumer])
    return walks, reads, table


def check_windows(walks, heads, table, size, failing=()):
    """Every head once, in order, with its own descriptors (or none after a failed read)."""
    assert [(head, parked) for head, parked, _, _ in walks] == list(heads)
    for head, _, filled, window in walks:
        if filled == 0:
            continue
        assert filled == (1 if head == size - 1 else PREFETCH_WINDOW)
        assert window[:filled] == table[head:head + filled]


@pytest.mark.parametrize("backpressure", [0.0, 0.7])
def test_one_descriptor_chains_share_reads(backpressure):
    """Heads 0, 1, 2, ... as a fresh ring hands out 1-descriptor chains: a read covers up
    to MAX_SPAN - 1 heads, and with a 125-cycle host many reads are out at once."""
    size = 256
    heads = [(h, 0) for h in range(size)]
    walks, reads, table = run(heads, size, backpressure=backpressure)
    check_windows(walks, heads, table, size)
    assert len(reads.reads) <= -(-size // (MAX_SPAN - 1)) + 1, reads.reads
    if not backpressure:
        assert reads.most_outstanding >= 4, reads.most_outstanding


@pytest.mark.parametrize("backpressure", [0.0, 0.7])
def test_heads_going_down_share_reads(backpressure):
    """Heads 255, 254, ... as Linux's free list hands them out once buffers came back (last
    freed first): a read covers the run from its last head up, the table's last head
    (whose window is one descriptor) leads one, and the walks still come in ring order."""
    size = 256
    heads = [(h, 0) for h in reversed(range(size))]
    walks, reads, table = run(heads, size, backpressure=backpressure)
    check_windows(walks, heads, table, size)
    assert len(reads.reads) <= -(-size // (MAX_SPAN - 1)) + 1, reads.reads
    assert reads.reads[0][1:] == (size - MAX_SPAN, MAX_SPAN), reads.reads[0]


def test_runs_turning():
    """Runs up, then down, then up again, with gaps (2-descriptor chains): each head's own
    window, whichever way its run went."""
    size = 64
    heads = [(h, 0) for h in (0, 2, 4, 40, 38, 36, 35, 10, 11, 13, 63, 62, 60, 20, 19, 21)]
    walks, reads, table = run(heads, size)
    check_windows(walks, heads, table, size)
    assert len(reads.reads) == 6, reads.reads


def test_two_descriptor_chains_and_the_table_end():
    """Heads 0, 2, 4, ... (2-descriptor chains): each window holds the head's descriptor
    and the next; the last head of the table gets its own one-descriptor read."""
    size = 16
    heads = [(h, 0) for h in range(0, size, 2)] + [(size - 1, 1), (3, 0)]
    walks, reads, table = run(heads, size)
    check_windows(walks, heads, table, size)
    assert (any(first == size - 1 and count == 1 for _, first, count in reads.reads))


def test_random_heads():
    """Heads in any order (parked ones among them), idle and backpressure: every head once,
    in order, with its descriptors; never more than PREFETCH_DEPTH held."""
    seed = new_seed()
    rng = random.Random(seed)
    size = rng.choice([1, 2, 8, 64, 256])
    heads = [(rng.randrange(size), rng.randrange(2)) for _ in range(300)]
    walks, reads, table = run(heads, size, latency=rng.randrange(1, 200), head_idle=0.3,
                              backpressure=0.5, seed=seed)
    check_windows(walks, heads, table, size)
    assert reads.most_outstanding <= PREFETCH_DEPTH


def test_a_failed_read_hands_its_heads_over_unread():
    """A read that fails (C7) is not a fault here: its heads go to the walker with nothing
    read, which reads them itself; heads of other reads keep their windows."""
    size = 64
    heads = [(h, 0) for h in range(size)]
    walks, reads, table = run(heads, size, failing={20})
    check_windows(walks, heads, table, size)
    unread = [head for head, _, filled, _ in walks if filled == 0]
    covering = [(first, count) for _, first, count in reads.reads if first <= 20 < first + count]
    assert unread and all(any(f <= h < f + n for f, n in covering) for h in unread), unread
    assert 19 in unread or 20 in unread
