"""The committed copy of the bitmap (C7): journaled writes reach it at commit, an abort
writes it back, an overflowing command stays exact, clears and fills reach both copies."""

import random

import pytest
from amaranth.hdl import Module, ResetInserter, Signal
from amaranth.lib import wiring

from memballoon.hdl.balloon.bitmap import READ_LATENCY, WORD_BITS, Bitmap, BitmapAction
from memballoon.hdl.balloon.committed import CommittedBitmap
from memballoon.tb.seed import new_seed
from sim_util import simulate, stream_put, wait_until

PAGES = 2 ** 10
WORDS = PAGES // WORD_BITS


class Pair:
    """A Bitmap and its CommittedBitmap wired as the balloon core wires them."""

    def __init__(self, journal_depth):
        self.bitmap = Bitmap(PAGES, tag_shape=8)
        self.reset = Signal()
        self.committed = CommittedBitmap(PAGES, journal_depth=journal_depth)
        self.module = m = Module()
        m.submodules.bitmap = self.bitmap
        m.submodules.committed = ResetInserter(self.reset)(self.committed)
        wiring.connect(m, self.bitmap.scan, self.committed.scan)
        wiring.connect(m, self.committed.scan_data, self.bitmap.scan_data)
        m.d.comb += [self.committed.written.eq(self.bitmap.written),
                     self.bitmap.hold.eq(self.committed.hold)]


def words_of(pages):
    return [sum(1 << (p % WORD_BITS) for p in pages if p // WORD_BITS == w)
            for w in range(WORDS)]


async def read_committed(ctx, committed):
    words = []
    for index in range(WORDS):
        ctx.set(committed.read.valid, 1)
        ctx.set(committed.read.payload, index)
        await ctx.tick().until(committed.read.ready)
        ctx.set(committed.read.valid, 0)
        words.append(ctx.get(committed.read_data.payload))
    return words


async def pulse(ctx, signal):
    ctx.set(signal, 1)
    await ctx.tick()
    ctx.set(signal, 0)


@pytest.mark.parametrize("journal_depth", [512, 4])
def test_commits_and_aborts_match_the_model(journal_depth):
    """Random commands of SET/CLEAR operations, each ended by a boundary; a random number
    of them committed, then the host's view equals the committed commands' state; an
    abort makes the working bitmap equal it again. With a journal of 4 entries most
    commands overflow, hold the next one and are committed by copying the whole bitmap."""
    seed = new_seed()
    print("seed", seed)
    rng = random.Random(seed)
    pair = Pair(journal_depth)
    bitmap, committed = pair.bitmap, pair.committed

    async def testbench(ctx):
        await wait_until(ctx, lambda: not ctx.get(bitmap.busy), "power-on")
        agreed = set()
        overflows = []

        async def commit(count):
            for _ in range(count):
                await wait_until(ctx, lambda: ctx.get(committed.commit_ready), "commit")
                await pulse(ctx, committed.commit)

        for _ in range(6):
            working = set(agreed)
            states = []                 # each uncommitted command's state after it
            for _ in range(rng.randint(1, 6)):
                await ctx.tick()
                if ctx.get(committed.hold):
                    overflows.append(1)
                    # An overflowed command holds the next one until it commits, as the
                    # engine's publication eventually makes it.
                    await commit(len(states))
                    agreed, states = states[-1], []
                for _ in range(rng.randint(1, 40)):
                    page = rng.randrange(PAGES) if rng.random() < 0.5 else rng.randrange(64)
                    action = rng.choice([BitmapAction.SET, BitmapAction.CLEAR])
                    await stream_put(ctx, bitmap.request, {"lanes": [
                        {"enable": 1, "page": page, "action": action, "allowed": 1}]},
                        rng, idle=0.3)
                    (working.add if action == BitmapAction.SET else working.discard)(page)
                await ctx.tick().repeat(READ_LATENCY + 1)   # the last write is journaled
                await wait_until(ctx, lambda: ctx.get(committed.boundary_ready), "room")
                await pulse(ctx, committed.boundary)
                states.append(set(working))
            done = rng.randint(0, len(states))
            await commit(done)
            if done:
                agreed = states[done - 1]
            assert await read_committed(ctx, committed) == words_of(agreed), f"seed {seed}"
            await pulse(ctx, committed.abort)
            await wait_until(ctx, lambda: not ctx.get(committed.busy), "abort")
            assert await read_committed(ctx, committed) == words_of(agreed), f"seed {seed}"
            # The working bitmap is the committed one again.
            for word, value in enumerate(words_of(agreed)):
                ctx.set(bitmap.read.valid, 1)
                ctx.set(bitmap.read.payload, word)
                await ctx.tick()
                ctx.set(bitmap.read.valid, 0)
                await ctx.tick().repeat(READ_LATENCY - 1)
                assert ctx.get(bitmap.read_data.payload) == value, f"seed {seed}: word {word}"
        assert bool(overflows) == (journal_depth < 16), "the journal overflowed as sized"

    simulate(pair.module, testbench)


def test_fills_and_clears_reach_both_copies():
    """C8/C9: a fill and a clear are host actions, committed at once."""
    pair = Pair(512)
    bitmap, committed = pair.bitmap, pair.committed

    async def testbench(ctx):
        await wait_until(ctx, lambda: not ctx.get(bitmap.busy), "power-on")
        ctx.set(bitmap.extra_first, 100)
        ctx.set(bitmap.extra_end, 300)
        await pulse(ctx, bitmap.fill)
        await wait_until(ctx, lambda: not ctx.get(bitmap.busy), "fill")
        await ctx.tick().repeat(2)
        assert await read_committed(ctx, committed) == words_of(range(100, 300))
        await stream_put(ctx, bitmap.request, {"lanes": [
            {"enable": 1, "page": 5, "action": BitmapAction.SET, "allowed": 1}]})
        ctx.set(bitmap.extra_first, 10)
        ctx.set(bitmap.extra_end, 20)
        ctx.set(bitmap.clear, 1)
        ctx.set(pair.reset, 1)
        await ctx.tick()
        ctx.set(bitmap.clear, 0)
        await ctx.tick()
        ctx.set(pair.reset, 0)
        await wait_until(ctx, lambda: not ctx.get(bitmap.busy), "clear")
        await ctx.tick().repeat(2)
        assert await read_committed(ctx, committed) == words_of(range(10, 20))

    simulate(pair.module, testbench)
