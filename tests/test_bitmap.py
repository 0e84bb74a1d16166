"""The balloon bitmap (C8, C9): pipelined page operations, clear, fill and reads."""

import gc
import random
import warnings
from collections import deque

import pytest
from amaranth.hdl import Fragment, Module, UnusedElaboratable
from amaranth.hdl._ir import build_netlist

from balloon_sim import simulate, stream_put, wait_until_clear
from memballoon.hdl.balloon.bitmap import WORD_BITS, Bitmap, BitmapAction

PAGES = 2 ** 10
WORDS = PAGES // WORD_BITS


class BitmapModel:
    """The bits, and the request semantics of Bitmap's docstring."""

    def __init__(self, pages=PAGES):
        self.bits = [0] * pages
        self.last_changed = False

    def apply(self, request):
        bit = self.bits[request["page"]]
        takes_effect = request["allowed"] and (not request.get("chained") or self.last_changed)
        changed = bool(takes_effect and bit == (request["action"] == BitmapAction.CLEAR))
        if changed:
            self.bits[request["page"]] ^= 1
        self.last_changed = changed
        return changed

    def word(self, index):
        return sum(b << i for i, b in enumerate(self.bits[index * WORD_BITS:
                                                          (index + 1) * WORD_BITS]))

    def fill(self, first, end):
        for page in range(first, end):
            self.bits[page] = 1


def random_request(rng, tag, hot_words):
    word = rng.choice(hot_words)
    return {
        "page": word * WORD_BITS + rng.randrange(WORD_BITS) if rng.random() < 0.2 else
        word * WORD_BITS + rng.randrange(4),
        "action": rng.choice([BitmapAction.SET, BitmapAction.CLEAR]),
        "allowed": rng.random() < 0.9,
        "chained": rng.random() < 0.3,
        "tag": tag % 256,
    }


async def read_word(ctx, dut, index):
    """One management read; its data comes in the next cycle."""
    ctx.set(dut.read.valid, 1)
    ctx.set(dut.read.payload, index)
    await ctx.tick()
    ctx.set(dut.read.valid, 0)
    assert ctx.get(dut.read_data.valid)
    return ctx.get(dut.read_data.payload)


async def read_all(ctx, dut):
    return [await read_word(ctx, dut, index) for index in range(WORDS)]


async def pulse(ctx, signal):
    ctx.set(signal, 1)
    await ctx.tick()
    ctx.set(signal, 0)


@pytest.mark.parametrize("seed", range(4))
def test_random_requests_and_reads_match_the_model(seed):
    """Requests bunched on a few words (back-to-back read-modify-writes of one word need
    forwarding), seeded idle, with management reads cutting in at random."""
    rng = random.Random(seed)
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()
    hot_words = rng.sample(range(WORDS), 3)
    requests = [random_request(rng, tag, hot_words) for tag in range(1500)]
    in_order = deque(requests)
    responses = []
    reads_checked = []
    done = []

    async def producer(ctx):
        for request in requests:
            await stream_put(ctx, dut.request, request, rng, idle=0.3)
        done.append(1)

    async def reader(ctx):
        while True:
            await ctx.tick().repeat(rng.randrange(1, 20))
            if done:
                return
            ctx.set(dut.read.valid, 1)
            ctx.set(dut.read.payload, rng.choice(hot_words))
            await ctx.tick()
            ctx.set(dut.read.valid, 0)

    async def monitor(ctx):
        read_index = None
        async for _, _, read_valid, index, response_valid, response, data_valid, data in \
                ctx.tick().sample(dut.read.valid, dut.read.payload, dut.response.valid,
                                  dut.response.payload, dut.read_data.valid,
                                  dut.read_data.payload):
            if data_valid:
                assert read_index is not None
                assert data == model.word(read_index), f"seed {seed}: read of {read_index}"
                reads_checked.append(read_index)
            read_index = index if read_valid else None
            if response_valid:
                request = in_order.popleft()
                assert response.tag == request["tag"], f"seed {seed}: order"
                assert response.changed == model.apply(request), \
                    f"seed {seed}: request {request}"
                responses.append(request)

    async def checker(ctx):
        await ctx.tick().until(dut.request.valid == 0)
        while not done or in_order:
            await ctx.tick()
        await ctx.tick().repeat(2)
        for index in range(WORDS):
            assert await read_word(ctx, dut, index) == model.word(index), f"seed {seed}"

    simulate(dut, [producer, checker], background=[reader], processes=[monitor])
    assert len(responses) == len(requests)
    assert len(reads_checked) > 20


def test_one_request_per_clock_on_one_word():
    """Back-to-back SET/CLEAR of the same page each see the previous one (forwarding);
    2000 requests are taken in 2000 consecutive clocks."""
    dut = Bitmap(PAGES, tag_shape=8)
    count = 2000
    changed = []

    async def producer(ctx):
        ctx.set(dut.request.valid, 1)
        cycles = 0
        taken = 0
        while taken < count:
            ctx.set(dut.request.payload, {
                "page": 77 + (taken // 2) % 2, "allowed": 1, "tag": taken % 256,
                "action": BitmapAction.SET if taken % 2 == 0 else BitmapAction.CLEAR})
            await ctx.tick()
            cycles += 1
            if ctx.get(dut.request.ready):
                taken += 1
        ctx.set(dut.request.valid, 0)
        await ctx.tick().repeat(2)
        assert cycles == count

    async def monitor(ctx):
        async for _, _, valid, response in ctx.tick().sample(dut.response.valid,
                                                             dut.response.payload):
            if valid:
                changed.append(response.changed)

    simulate(dut, [producer], processes=[monitor])
    assert changed == [1] * count


def test_chained_requests_stop_after_the_first_refusal():
    dut = Bitmap(PAGES, tag_shape=8)
    changed = []

    async def testbench(ctx):
        for page in (1, 2, 4):
            await stream_put(ctx, dut.request, {"page": page, "action": BitmapAction.SET,
                                                "allowed": 1})
        # A GET of 1, 2, 3, 4: page 3 is not set, so 4 is refused too.
        for i, page in enumerate((1, 2, 3, 4)):
            await stream_put(ctx, dut.request, {"page": page, "action": BitmapAction.CLEAR,
                                                "allowed": 1, "chained": i != 0})
        await ctx.tick().repeat(2)
        assert await read_word(ctx, dut, 0) == 1 << 4

    async def monitor(ctx):
        async for _, _, valid, response in ctx.tick().sample(dut.response.valid,
                                                             dut.response.payload):
            if valid:
                changed.append(response.changed)

    simulate(dut, [testbench], processes=[monitor])
    assert changed == [1, 1, 1, 1, 1, 0, 0]


RANGES = [(0, 0), (5, 6), (60, 70), (64, 128), (0, PAGES), (PAGES - 1, PAGES), (130, 900)]


@pytest.mark.parametrize("first,end", RANGES)
def test_fill_sets_the_range_and_keeps_other_bits(first, end):
    rng = random.Random(first * 7 + end)
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()

    async def testbench(ctx):
        for _ in range(200):
            request = {"page": rng.randrange(PAGES), "action": BitmapAction.SET, "allowed": 1}
            await stream_put(ctx, dut.request, request, rng, idle=0.2)
            model.apply(request)
        ctx.set(dut.extra_first, first)
        ctx.set(dut.extra_end, end)
        # A request offered with the fill pulse waits for the fill to end.
        ctx.set(dut.request.valid, 1)
        ctx.set(dut.request.payload, {"page": 3, "action": BitmapAction.CLEAR, "allowed": 1})
        ctx.set(dut.fill, 1)
        await ctx.tick()
        ctx.set(dut.fill, 0)
        cycles = 1
        while not ctx.get(dut.request.ready):
            assert ctx.get(dut.busy) and cycles < WORDS + 2
            await ctx.tick()
            cycles += 1
        await ctx.tick()
        ctx.set(dut.request.valid, 0)
        words = (end - 1) // WORD_BITS - first // WORD_BITS + 1 if end > first else 0
        assert cycles <= words + 2
        model.fill(first, end)
        model.apply({"page": 3, "action": BitmapAction.CLEAR, "allowed": 1, "chained": 0})
        await ctx.tick().repeat(2)
        assert await read_all(ctx, dut) == [model.word(i) for i in range(WORDS)]

    simulate(dut, [testbench])


@pytest.mark.parametrize("first,end", RANGES)
def test_clear_leaves_only_the_range_and_is_busy_until_done(first, end):
    rng = random.Random(first + end)
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()

    async def testbench(ctx):
        for _ in range(300):
            await stream_put(ctx, dut.request, {"page": rng.randrange(PAGES), "allowed": 1,
                                                "action": BitmapAction.SET}, rng, idle=0.2)
        ctx.set(dut.extra_first, first)
        ctx.set(dut.extra_end, end)
        # In the clear's cycle a request is not taken; busy rises in the next one.
        ctx.set(dut.request.valid, 1)
        ctx.set(dut.request.payload, {"page": 9, "action": BitmapAction.SET, "allowed": 1})
        ctx.set(dut.clear, 1)
        assert not ctx.get(dut.request.ready)
        await ctx.tick()
        ctx.set(dut.clear, 0)
        ctx.set(dut.request.valid, 0)
        busy_cycles = 0
        while ctx.get(dut.busy):
            assert not ctx.get(dut.request.ready) and busy_cycles < WORDS
            await ctx.tick()
            busy_cycles += 1
        assert busy_cycles == WORDS
        model.fill(first, end)
        assert await read_all(ctx, dut) == [model.word(i) for i in range(WORDS)]

    simulate(dut, [testbench])


def test_clear_supersedes_a_fill_and_a_fill_waits_for_a_clear():
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()

    async def testbench(ctx):
        await stream_put(ctx, dut.request, {"page": 1000, "action": BitmapAction.SET,
                                            "allowed": 1})
        ctx.set(dut.extra_first, 0)
        ctx.set(dut.extra_end, PAGES)
        await pulse(ctx, dut.fill)
        await ctx.tick().repeat(3)              # the fill has started over the whole bitmap
        ctx.set(dut.extra_first, 100)
        ctx.set(dut.extra_end, 200)
        await pulse(ctx, dut.clear)             # range latched: 100..199
        await ctx.tick().repeat(5)
        ctx.set(dut.extra_first, 500)
        ctx.set(dut.extra_end, 520)
        await pulse(ctx, dut.fill)              # after the clear: 500..519
        await wait_until_clear(ctx, dut.busy)
        model.fill(100, 200)
        model.fill(500, 520)
        assert await read_all(ctx, dut) == [model.word(i) for i in range(WORDS)]

    simulate(dut, [testbench])


def test_elaborates_at_the_largest_size_and_refuses_bad_sizes():
    m = Module()
    m.submodules.bitmap = bitmap = Bitmap(2 ** 24, tag_shape=2)
    build_netlist(Fragment.get(m, None), ports=[])
    assert len(bitmap.request.payload.page) == 24
    assert len(bitmap.read.payload) == 24 - 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)   # the half-built objects
        for pages in (3 * 2 ** 10, 2 ** 25, 64):
            with pytest.raises(ValueError):
                Bitmap(pages, tag_shape=2)
        gc.collect()
