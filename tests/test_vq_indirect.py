"""TablePrefetcher: the first read of each indirect table made ahead of the walk and
answered to the walker from its buffer; every other walker read forwarded."""

import random

import pytest

from memballoon import constants as c
from memballoon.hdl.pcie.interface import DMA_READ_BEAT_BYTES
from memballoon.hdl.virtqueue.split.indirect import TABLE_BUFFER_BEATS, TablePrefetcher
from memballoon.tb.seed import new_seed
from sim_util import simulate, stream_put, wait_until

WINDOW = 8
DEPTH = 32
SIZE = 64
TABLES = 0x100000


class Memory:
    """Reads answered after a seeded latency, in order, 16 bytes a beat; a read touching a
    ``failing`` address ends with one error beat after the beats before it."""

    def __init__(self, rng, latency, failing=()):
        self.rng, self.latency, self.failing = rng, latency, set(failing)
        self.reads = []

    def word(self, address):
        return (address * 0x9E3779B97F4A7C15 + 12345) % (1 << 128)

    def beats(self, address, length):
        out = []
        for offset in range(0, length, DMA_READ_BEAT_BYTES):
            if address + offset in self.failing:
                return out + [dict(data=0, count=0, last=1, error=1, mark=0)]
            out.append(dict(data=self.word(address + offset), count=DMA_READ_BEAT_BYTES,
                            last=int(offset + DMA_READ_BEAT_BYTES >= length), error=0, mark=0))
        return out

    async def serve(self, ctx, read, response, stall=0.2):
        """A ReadPort client's port: takes ``read`` with seeded stalls, answers on
        ``response`` (whose ready it must honour)."""
        queue, cycle = [], 0
        while True:
            taking = self.rng.random() >= stall
            ctx.set(read.ready, taking)
            beat = queue[0][1][0] if queue and queue[0][0] <= cycle else None
            ctx.set(response.valid, beat is not None)
            if beat is not None:
                ctx.set(response.payload, beat)
            _, _, valid, command, ready = await ctx.tick().sample(
                read.valid, read.payload.command, response.ready)
            cycle += 1
            if beat is not None and ready:
                queue[0][1].pop(0)
                if not queue[0][1]:
                    queue.pop(0)
            if valid and taking:
                self.reads.append((command.address, command.length))
                latency = max(2, self.rng.randrange(*self.latency))
                due = max([cycle + latency] + [q[0] for q in queue])
                queue.append((due, self.beats(command.address, command.length)))


def descriptor(address, length, flags):
    return {"address": address, "length": length, "flags": flags, "next": 0}


def table_walk(rng, head, entries=None, flags=c.VRING_DESC_F_INDIRECT):
    entries = rng.randrange(1, 12) if entries is None else entries
    return {"head": head, "address": TABLES + head * 0x1000, "length": 16 * entries,
            "flags": flags}


def prefetchable(walk, indirect=True):
    return (indirect and walk["flags"] & c.VRING_DESC_F_INDIRECT and walk["length"] and
            walk["length"] % 16 == 0 and walk["head"] < SIZE and walk.get("filled", 2))


def run(walks, *, indirect=True, skip=(), failing=(), latency=(2, 150), seed=None):
    """Walks through the prefetcher and a walker model that reads each table's first
    window (and, for a table longer than the window, its next one) unless the walk is in
    ``skip`` (indices into ``walks``); returns the walks out, the walker's answers, the
    reads of both ports."""
    seed = new_seed() if seed is None else seed
    print(f"seed {seed}")
    rng = random.Random(seed)
    dut = TablePrefetcher(table_window=WINDOW, depth=DEPTH)
    ahead = Memory(random.Random(rng.random()), latency, failing)
    forwarded = Memory(random.Random(rng.random()), latency, failing)
    out, answers, finished = [], [], []

    async def produce(ctx):
        source = random.Random(rng.random())
        for walk in walks:
            payload = {"walk": {"head": walk["head"], "parked": 0},
                       "window": [descriptor(walk["address"], walk["length"], walk["flags"]),
                                  descriptor(0, 0, 0)],
                       "filled": walk.get("filled", 2)}
            await stream_put(ctx, dut.walks_in, payload, source, 0.3)

    async def walker(ctx):
        walker_rng = random.Random(rng.random())
        for _ in walks:
            # Handshakes by the values at the clock edge (the ports' ready comes from the
            # memory models' processes).
            ctx.set(dut.walks_out.ready, 1)
            while True:
                _, _, valid, head = await ctx.tick().sample(
                    dut.walks_out.valid, dut.walks_out.payload.walk.head)
                if valid:
                    break
            ctx.set(dut.walks_out.ready, 0)
            index = len(out)
            walk = walks[index]
            out.append(head)
            entries = walk["length"] // 16
            reads = []
            if prefetchable(walk, indirect) and index not in skip:
                reads.append((walk["address"], 16 * min(entries, WINDOW)))
                if entries > WINDOW:
                    reads.append((walk["address"] + 16 * WINDOW,
                                  16 * min(entries - WINDOW, WINDOW)))
            else:
                reads.append((0x2000 + 16 * head, 32))       # a descriptor-table read
            for address, length in reads:
                ctx.set(dut.walker_read.valid, 1)
                ctx.set(dut.walker_read.payload, {"command": {"address": address,
                                                              "length": length}})
                while not (await ctx.tick().sample(dut.walker_read.ready))[2]:
                    pass
                ctx.set(dut.walker_read.valid, 0)
                beats = []
                while not beats or not beats[-1]["last"]:
                    ready = walker_rng.random() < 0.6
                    ctx.set(dut.walker_response.ready, ready)
                    _, _, valid, payload = await ctx.tick().sample(
                        dut.walker_response.valid, dut.walker_response.payload)
                    if valid and ready:
                        beats.append({"data": payload.data, "count": payload.count,
                                      "last": payload.last, "error": payload.error,
                                      "mark": payload.mark})
                ctx.set(dut.walker_response.ready, 0)
                answers.append((head, address, length, beats))
                if beats[-1]["error"]:
                    break
        finished.append(True)

    async def testbench(ctx):
        ctx.set(dut.indirect, indirect)
        ctx.set(dut.size, SIZE)
        await wait_until(ctx, lambda: finished, "every walk", cycles=400 * len(walks) + 2000)
        await ctx.tick().repeat(10)
        assert ctx.get(dut.idle)

    async def serve_ahead(ctx):
        await ahead.serve(ctx, dut.read, dut.response)

    async def serve_forwarded(ctx):
        await forwarded.serve(ctx, dut.forward_read, dut.forward_response)

    simulate(dut, testbench, walker, background=[produce, serve_ahead, serve_forwarded])
    return out, answers, ahead, forwarded


def check(walks, out, answers, ahead, forwarded, indirect=True, skip=()):
    assert out == [w["head"] for w in walks]
    model = Memory(None, None, ahead.failing)
    for head, address, length, beats in answers:
        assert beats == model.beats(address, length), (head, address, length)
    wanted = [(w["address"], 16 * min(w["length"] // 16, WINDOW))
              for w in walks if prefetchable(w, indirect)]
    assert ahead.reads == wanted
    # Only the reads not made ahead reach the ReadPort from the walker.
    firsts = {(w["address"], 16 * min(w["length"] // 16, WINDOW))
              for i, w in enumerate(walks) if prefetchable(w, indirect) and i not in skip}
    assert not firsts & set(forwarded.reads)


@pytest.mark.parametrize("latency", [(2, 4), (100, 150)])
def test_tables_read_ahead_and_answered(latency):
    """Chains behind indirect descriptors, tables shorter and longer than the window:
    each table's first read is made once, ahead, and answered from the buffer."""
    rng = random.Random(new_seed())
    walks = [table_walk(rng, head) for head in range(SIZE)]
    out, answers, ahead, forwarded = run(walks, latency=latency)
    check(walks, out, answers, ahead, forwarded)
    assert len(forwarded.reads) == sum(w["length"] > 16 * WINDOW for w in walks)


def test_direct_and_malformed_heads_pass_through():
    """Direct heads, INDIRECT without the feature, bad table lengths, heads past the queue
    and heads not read ahead (``filled`` 0) are never read ahead; their walker reads are
    forwarded, and the chains stay in order with the others."""
    rng = random.Random(new_seed())
    walks = []
    for head in range(60):
        walk = table_walk(rng, head)
        kind = head % 6
        if kind == 1:
            walk["flags"] = c.VRING_DESC_F_NEXT
        elif kind == 2:
            walk["length"] = 24
        elif kind == 3:
            walk["length"] = 0
        elif kind == 4:
            walk["filled"] = 0
        walks.append(walk)
    walks.append(table_walk(rng, SIZE + 3))
    out, answers, ahead, forwarded = run(walks)
    check(walks, out, answers, ahead, forwarded)
    out, answers, ahead, forwarded = run(walks[:20], indirect=False)
    check(walks[:20], out, answers, ahead, forwarded, indirect=False)
    assert not ahead.reads


def test_tables_the_walker_does_not_read_are_dropped():
    """A chain that faults before its table (the walker never asks) leaves its table in
    the buffer: it is dropped when the next walk goes on, and the buffer's room comes
    back (three times the tables the buffer holds go through)."""
    rng = random.Random(new_seed())
    count = 3 * TABLE_BUFFER_BEATS // WINDOW
    walks = [table_walk(rng, i % SIZE, entries=WINDOW) for i in range(count)]
    for i, walk in enumerate(walks):
        walk["address"] = TABLES + i * 0x1000
    skip = {i for i in range(count) if rng.random() < 0.3}
    out, answers, ahead, forwarded = run(walks, skip=skip)
    check(walks, out, answers, ahead, forwarded, skip=skip)


def test_a_failed_table_read_reaches_the_walker():
    """A table read ahead that fails (C7) is answered as the DMA engine answered it: the
    beats before the failure, then the error beat; the walks after it are unaffected."""
    rng = random.Random(new_seed())
    walks = [table_walk(rng, head, entries=4) for head in range(16)]
    failing = {walks[5]["address"] + 32}
    out, answers, ahead, forwarded = run(walks, failing=failing)
    check(walks, out, answers, ahead, forwarded)
    failed = [beats for head, _, _, beats in answers if head == 5]
    assert failed and failed[0][-1]["error"] and len(failed[0]) == 3
