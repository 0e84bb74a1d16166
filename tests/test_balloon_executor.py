"""The todevq command executor (C4 granularity, C5, C8) on a real bitmap."""

import random
import struct
from collections import Counter

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring

from balloon_sim import EngineModel, wait_until_clear
from memballoon import constants as c
from memballoon.hdl.balloon.bitmap import READ_LATENCY, WORD_BITS, Bitmap
from memballoon.hdl.balloon.executor import CommandExecutor, OpTag
from sim_util import simulate

PAGES = 2 ** 10
GET, GIVE, EXCHANGE = (c.VIRTIO_MEMBALLOON_GCMD_GET_PAGES, c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES,
                       c.VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES)
MASK64 = 2 ** 64 - 1


def command(code, addresses=()):
    """The device-readable bytes of a todevq command (C5)."""
    return struct.pack(f"<{1 + len(addresses)}Q", code & MASK64,
                       *(address & MASK64 for address in addresses))


class Harness:
    """CommandExecutor + Bitmap, the executor's inputs set by the test, the effects of its
    commands summed."""

    def __init__(self, seed, page_shift=12, base=0x1_0000_0000, idle=0.3, backpressure=0.3,
                 pages=PAGES, grant_limit=512):
        self.rng = random.Random(seed)
        self.pages_tracked = pages
        self.page_shift = page_shift
        self.base = base
        self.executor = CommandExecutor(pages.bit_length() - 1, grant_limit=grant_limit)
        self.bitmap = Bitmap(pages, OpTag)
        self.module = m = Module()
        m.submodules.executor = self.executor
        m.submodules.bitmap = self.bitmap
        wiring.connect(m, self.executor.bitmap_request, self.bitmap.request)
        wiring.connect(m, self.bitmap.response, self.executor.bitmap_response)
        m.d.comb += [self.bitmap.extra_first.eq(self.executor.extra_first),
                     self.bitmap.extra_end.eq(self.executor.extra_end)]
        self.engine = EngineModel(self.executor.command, self.rng, idle, backpressure)
        self.events = Counter()

    def address(self, page):
        return self.base + (page << self.page_shift)

    async def setup(self, ctx, extra=(0, 0), extra_mem=0, budget=c.MGMT_UNLIMITED_BUDGET):
        ctx.set(self.executor.page_shift, self.page_shift)
        ctx.set(self.executor.window_base, self.base)
        ctx.set(self.executor.extra_first, extra[0])
        ctx.set(self.executor.extra_end, extra[1])
        ctx.set(self.executor.extra_mem, extra_mem)
        ctx.set(self.executor.return_budget, budget)
        if extra[1] > extra[0]:
            ctx.set(self.bitmap.fill, 1)
            await ctx.tick()
            ctx.set(self.bitmap.fill, 0)
            await wait_until_clear(ctx, self.bitmap.busy)

    async def run_commands(self, ctx, *commands):
        """Submit ``(readable, writable)`` pairs; the results once all are in."""
        first = len(self.engine.results)
        for readable, writable in commands:
            self.engine.submit(readable, writable)
        await self.engine.wait_results(ctx)
        await ctx.tick().repeat(4)              # the last requests reach the bitmap
        return self.engine.results[first:]

    async def pages(self, ctx):
        """The pages whose bit is set."""
        pages = set()
        for index in range(self.pages_tracked // WORD_BITS):
            ctx.set(self.bitmap.read.valid, 1)
            ctx.set(self.bitmap.read.payload, index)
            await ctx.tick()
            ctx.set(self.bitmap.read.valid, 0)
            await ctx.tick().repeat(READ_LATENCY - 1)
            word = ctx.get(self.bitmap.read_data.payload)
            pages |= {index * WORD_BITS + i for i in range(WORD_BITS) if word >> i & 1}
        return pages

    def run(self, testbench):
        async def count_events(ctx):
            # The core takes a command's effects with its result (C7).
            async for _, _, valid, effects in ctx.tick().sample(self.executor.effects.valid,
                                                                 self.executor.effects.payload):
                ctx.set(self.executor.effects.ready, 1)
                if valid:
                    for name, _ in effects.shape():
                        self.events[name] += getattr(effects, name)

        async def bench(ctx):
            await testbench(ctx, self)
        simulate(self.module, bench, background=self.engine.background(),
                 processes=[count_events])

    def counted(self):
        return {name: count for name, count in self.events.items() if count}


MALFORMED = {
    "no readable bytes": (b"", 0),
    "unknown code": (command(3, [0x1_0000_0000]), 0),
    "huge code": (command(2 ** 63, [0x1_0000_0000]), 0),
    "length not a multiple of 8": (command(GIVE, [0x1_0000_0000]) + b"\0", 0),
    "short code": (b"\1\0\0", 0),
    "GIVE without pages": (command(GIVE), 0),
    "GET without pages": (command(GET), 8),
    "EXCHANGE without pages": (command(EXCHANGE), 0),
    "EXCHANGE odd": (command(EXCHANGE, [0x1_0000_0000] * 3), 0),
    "GET without writable": (command(GET, [0x1_0000_0000]), 0),
    "GET with 16 writable": (command(GET, [0x1_0000_0000]), 16),
    "GET with 7 writable": (command(GET, [0x1_0000_0000]), 7),
    "GIVE with writable": (command(GIVE, [0x1_0000_0000]), 8),
    "EXCHANGE with writable": (command(EXCHANGE, [0x1_0000_0000] * 2), 1),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_commands_change_nothing(name):
    """C5: a malformed command changes no state, completes with used_len 0, is counted."""
    readable, writable = MALFORMED[name]

    async def testbench(ctx, h):
        await h.setup(ctx)
        await h.run_commands(ctx, (command(GIVE, [h.address(0), h.address(5)]), 0))
        results = await h.run_commands(ctx, (readable, writable),
                                       (command(GET, [h.address(5)]), 8))
        assert results[0][0] == 0 and results[0][2] == 0
        assert results[1] == (8, 1, 8)          # the next command runs normally
        assert await h.pages(ctx) == {0}

    h = Harness(len(name))
    h.run(testbench)
    assert h.counted() == {"cmd_give": 1, "cmd_get": 1, "cmd_malformed": 1,
                           "pages_entered": 2, "pages_left": 1, "granted": 1}


def test_give_enters_valid_pages_and_counts_each_violation_by_kind():
    async def testbench(ctx, h):
        await h.setup(ctx)
        results = await h.run_commands(ctx, (command(GIVE, [
            h.address(1), h.address(2),
            h.address(3) + 8,                   # misaligned
            h.base - 4096,                      # below the window
            h.address(PAGES),                   # just past it
            h.address(PAGES - 1),               # the last page
            h.address(2),                       # double give
            h.address(3) + 1 + (PAGES << 12),   # misaligned and outside: misaligned
            h.address(0),
        ]), 0))
        assert results == [(0, results[0][1], 0)]
        assert await h.pages(ctx) == {0, 1, 2, PAGES - 1}

    h = Harness(1)
    h.run(testbench)
    assert h.counted() == {"cmd_give": 1, "pages_entered": 4, "violation_misaligned": 2,
                           "violation_out_of_window": 2, "violation_double_give": 1}


def test_get_grants_a_prefix_and_stops_at_the_first_refusal():
    async def testbench(ctx, h):
        await h.setup(ctx)
        await h.run_commands(ctx, (command(GIVE, [h.address(p) for p in (1, 2, 4, 6, 7)]), 0))
        results = await h.run_commands(
            ctx,
            # 3 is not in the balloon: K = 2, and 4 is not looked at.
            (command(GET, [h.address(p) for p in (1, 2, 3, 4)]), 8),
            # Out of the window: K = 1, counted; the misaligned one after it is not.
            (command(GET, [h.address(4), h.address(6) + (PAGES << 12), h.address(7) + 8]),
             8),
            # The first refusal is a clear bit: the misaligned address after it is not
            # counted.
            (command(GET, [h.address(1), h.address(7) + 8]), 8),
            # A misaligned first refusal is counted.
            (command(GET, [h.address(7), h.address(6), h.address(6) + 4]), 8))
        assert results == [(8, 2, 8), (8, 1, 8), (8, 0, 8), (8, 2, 8)]
        assert await h.pages(ctx) == set()

    h = Harness(2)
    h.run(testbench)
    assert h.counted() == {"cmd_give": 1, "cmd_get": 4, "get_short": 4, "pages_entered": 5,
                           "pages_left": 5, "granted": 5, "violation_out_of_window": 1,
                           "violation_misaligned": 1}


@pytest.mark.parametrize("position", range(5))
def test_get_prefix_stops_in_either_lane(position):
    """Payload word i is lane i % 2 of beat 1 + i // 2: the page not in the balloon is at
    ``position``, so the prefix stops in lane 0 (even) or lane 1 (odd); the pages after
    it stay."""
    pages = [10, 75, 140, 205, 270]         # words 0, 1, 2, 3, 4: lanes on both banks

    async def testbench(ctx, h):
        await h.setup(ctx)
        given = pages[:position] + pages[position + 1:]
        await h.run_commands(ctx, (command(GIVE, [h.address(p) for p in given]), 0))
        results = await h.run_commands(ctx, (command(GET, [h.address(p) for p in pages]), 8))
        assert results == [(8, position, 8)]
        assert await h.pages(ctx) == set(pages[position + 1:])

    h = Harness(20 + position)
    h.run(testbench)
    expected = {"cmd_give": 1, "cmd_get": 1, "get_short": 1, "pages_entered": 4,
                "pages_left": position, "granted": position}
    assert h.counted() == {name: count for name, count in expected.items() if count}


@pytest.mark.parametrize("budget,granted", [(0, 0), (1, 1), (2, 2), (3, 3), (5, 4),
                                            (c.MGMT_UNLIMITED_BUDGET, 4)],
                         ids=["0-lane0", "1-lane1", "2-lane0", "3-lane1", "5-enough",
                              "unlimited"])
def test_get_stops_when_the_return_budget_is_spent(budget, granted):
    """The budget runs out in lane 0 (even budgets) or lane 1 (odd) of a beat."""
    async def testbench(ctx, h):
        await h.setup(ctx, budget=budget)
        pages = [10, 20, 30, 40]
        await h.run_commands(ctx, (command(GIVE, [h.address(p) for p in pages]), 0))
        results = await h.run_commands(ctx, (command(GET, [h.address(p) for p in pages]), 8))
        assert results == [(8, granted, 8)]
        assert await h.pages(ctx) == set(pages[granted:])

    Harness(budget % 1000).run(testbench)


@pytest.mark.parametrize("limit,budget,granted", [
    (3, 5, 3), (4, 7, 4), (4, 3, 3), (5, c.MGMT_UNLIMITED_BUDGET, 5)],
    ids=["limit-lane0", "limit-lane1", "budget-first", "limit-unlimited"])
def test_get_stops_at_the_grant_limit_mid_command(limit, budget, granted):
    """C5's per-command grant limit (here below the device's minimum, to reach it within
    a short GET) and the budget, whichever is smaller, cut the prefix in either lane; the
    next GET has its own limit."""
    pages = [10, 20, 30, 40, 50, 60, 70]

    async def testbench(ctx, h):
        await h.setup(ctx, budget=budget)
        await h.run_commands(ctx, (command(GIVE, [h.address(p) for p in pages]), 0))
        results = await h.run_commands(
            ctx, (command(GET, [h.address(p) for p in pages]), 8),
            (command(GET, [h.address(p) for p in pages[granted:granted + 2]]), 8))
        assert results == [(8, granted, 8), (8, 2, 8)]
        assert await h.pages(ctx) == set(pages[granted + 2:])

    Harness(limit, grant_limit=limit).run(testbench)


def test_page_size_base_and_extra_range_changed_between_commands():
    """The decode's registered window bounds (page size, base, extra range) follow
    settings changed while the executor is idle: each command is decoded with the
    settings in force when it starts, even when its header is taken at once."""
    async def testbench(ctx, h):
        await h.setup(ctx)
        await h.run_commands(ctx, (command(GIVE, [h.address(1), h.address(2)]), 0))
        h.page_shift, h.base = 21, 0x40_0010_0000      # 2M pages, a base rounded down
        ctx.set(h.executor.page_shift, h.page_shift)
        ctx.set(h.executor.window_base, h.base)
        window = h.base >> 21 << 21
        results = await h.run_commands(
            ctx, (command(GIVE, [window + (3 << 21), window + (1 << 21),
                                 window + (5 << 21) + 4096, window - (1 << 21)]), 0))
        assert results == [(0, results[0][1], 0)]
        assert await h.pages(ctx) == {1, 2, 3}
        # Pages 2 and 3 become extra memory (not grantable without EXTRA_MEM).
        ctx.set(h.executor.extra_first, 2)
        ctx.set(h.executor.extra_end, 4)
        results = await h.run_commands(
            ctx, (command(GET, [window + (1 << 21), window + (2 << 21)]), 8))
        assert results == [(8, 1, 8)]
        ctx.set(h.executor.extra_mem, 1)
        results = await h.run_commands(
            ctx, (command(GET, [window + (2 << 21), window + (3 << 21)]), 8))
        assert results == [(8, 2, 8)]
        assert await h.pages(ctx) == set()

    h = Harness(7, idle=0, backpressure=0)
    h.run(testbench)
    assert h.counted() == {"cmd_give": 2, "cmd_get": 2, "get_short": 1, "pages_entered": 3,
                           "pages_left": 3, "granted": 3, "violation_double_give": 1,
                           "violation_misaligned": 1, "violation_out_of_window": 1}


@pytest.mark.parametrize("idle", [0, 0.3])
def test_get_of_pages_just_given(idle):
    """GIVE, GET of the same pages, GIVE again, back to back (one bitmap row and
    neighbouring words of both banks): every GET sees the GIVE before it."""
    pages = [64, 65, 128, 66, 129, 192, 67, 1]

    async def testbench(ctx, h):
        await h.setup(ctx)
        addresses = [h.address(p) for p in pages]
        results = await h.run_commands(ctx, *[
            (command(GIVE, addresses), 0), (command(GET, addresses), 8),
            (command(GIVE, addresses[:3]), 0), (command(GET, addresses[:5]), 8),
            (command(EXCHANGE, addresses[:3] + addresses[3:6]), 0),
            (command(GET, addresses[3:6] + addresses[:1]), 8)])
        assert [r[1] for r in results if r[0] == 8] == [len(pages), 3, 3]
        assert await h.pages(ctx) == set()

    h = Harness(8, idle=idle, backpressure=idle)
    h.run(testbench)
    assert h.counted()["granted"] == len(pages) + 6


@pytest.mark.parametrize("position", ["code", "payload"])
def test_a_data_fault_in_the_next_command_stops_after_the_one_finishing(position):
    """C7: the next command's code word is taken while one finishes; when its data fails
    there (or in its payload), the finishing command still completes, and nothing after
    it does: the executor waits for the core's abort."""
    async def testbench(ctx, h):
        await h.setup(ctx)
        h.engine.submit(command(GIVE, [h.address(3)]), 0)
        h.engine.submit(command(GIVE, [h.address(4), h.address(5)]), 0,
                        error_at=0 if position == "code" else 1)
        h.engine.submit(command(GIVE, [h.address(6)]), 0)
        await h.engine.wait_results(ctx, 1)
        await ctx.tick().repeat(200)
        assert len(h.engine.results) == 1
        assert not ctx.get(h.executor.idle)
        assert await h.pages(ctx) == {3}

    h = Harness(21, idle=0, backpressure=0)
    h.run(testbench)
    assert h.counted() == {"cmd_give": 1, "pages_entered": 1}


def test_commands_of_every_kind_back_to_back():
    """Each command's header and code word are taken while the one before finishes: every
    kind after every kind (malformed and empty ones too), each with its own counts; prints
    the clocks per 1-page command, beats at once and results taken at once."""
    kinds = {
        "GIVE": lambda h, p: (command(GIVE, [h.address(p)]), 0),
        "GET": lambda h, p: (command(GET, [h.address(p - 1)]), 8),
        "EXCHANGE": lambda h, p: (command(EXCHANGE, [h.address(p - 2), h.address(p)]), 0),
        "malformed": lambda h, p: (command(GIVE, [h.address(p)]), 8),
        "empty": lambda h, p: (b"", 0),
    }
    order = [(a, b) for a in kinds for b in kinds]
    figures = {}

    async def testbench(ctx, h):
        await h.setup(ctx)
        await h.run_commands(ctx, *[(command(GIVE, [h.address(p) for p in range(64)]), 0)])
        page = 100
        commands = []
        for a, b in order:
            for name in (a, b):
                commands.append(kinds[name](h, page))
                page += 3
        results = await h.run_commands(ctx, *commands)
        # A GET asks for page p - 1, which nothing gave: none is granted.
        assert results == [(8, 0, 8) if name == "GET" else (0, 0, 0)
                           for pair in order for name in pair]
        for name, code, writable, granted in (("GIVE", GIVE, 0, 0), ("GET", GET, 8, 1)):
            start = ctx.get(cycle)
            results = await h.run_commands(ctx, *[(command(code, [h.address(page)]), writable)
                                                  for page in range(500, 564)])
            figures[name] = (ctx.get(cycle) - start - 4) / 64
            assert results == [(writable, granted, writable)] * 64

    h = Harness(22, idle=0, backpressure=0)
    cycle = Signal(32)
    h.module.d.sync += cycle.eq(cycle + 1)
    h.run(testbench)
    print("clocks per 1-page command:", figures)
    counts = Counter(name for pair in order for name in pair)
    assert h.events["cmd_give"] == 1 + counts["GIVE"] + 64
    assert h.events["cmd_get"] == counts["GET"] + 64
    assert h.events["cmd_exchange"] == counts["EXCHANGE"]
    assert h.events["cmd_malformed"] == counts["malformed"] + counts["empty"]
    assert h.events["pages_entered"] == 64 + counts["GIVE"] + counts["EXCHANGE"] + 64
    assert h.events["granted"] == 64
    assert h.events["violation_not_in_balloon"] == counts["EXCHANGE"]


@pytest.mark.parametrize("extra_mem", [0, 1])
def test_extra_memory_is_granted_only_with_extra_mem(extra_mem):
    """C8: pages of the extra range start host-owned; GET grants them only with EXTRA_MEM."""
    async def testbench(ctx, h):
        await h.setup(ctx, extra=(100, 164), extra_mem=extra_mem)
        assert await h.pages(ctx) == set(range(100, 164))
        results = await h.run_commands(
            ctx,
            (command(GET, [h.address(100), h.address(163)]), 8),
            (command(EXCHANGE, [h.address(101), h.address(5)]), 0),
            (command(GIVE, [h.address(6)]), 0),
            (command(GET, [h.address(6)]), 8))          # outside the range: always
        assert [r[1] for r in results if r[0] == 8] == [2 * extra_mem, 1]
        remaining = set(range(100, 164)) | {5}
        if extra_mem:
            remaining -= {100, 163, 101}
        assert await h.pages(ctx) == remaining

    h = Harness(3 + extra_mem)
    h.run(testbench)
    expected = {"cmd_get": 2, "cmd_exchange": 1, "cmd_give": 1, "pages_entered": 2}
    if extra_mem:
        expected.update(pages_left=4, granted=3)
    else:
        expected.update(pages_left=1, granted=1, get_short=1, violation_not_in_balloon=1)
    assert h.counted() == expected


def test_exchange_takes_the_wanted_pages_out_first_and_ignores_the_budget():
    async def testbench(ctx, h):
        await h.setup(ctx, budget=0)
        await h.run_commands(ctx, (command(GIVE, [h.address(p) for p in (1, 2, 3)]), 0))
        results = await h.run_commands(ctx, (command(EXCHANGE, [
            # wanted: in, not in, in, misaligned, the page the second half gives back
            h.address(1), h.address(9), h.address(2), h.address(4) + 1, h.address(3),
            # entering: new, the same again, outside, new, the page that just left
            h.address(11), h.address(11), h.base - (1 << 12), h.address(12), h.address(3)]),
            0))
        assert results == [(0, results[0][1], 0)]
        assert await h.pages(ctx) == {3, 11, 12}

    h = Harness(4)
    h.run(testbench)
    assert h.counted() == {
        "cmd_give": 1, "cmd_exchange": 1, "pages_entered": 3 + 3, "pages_left": 3,
        "violation_not_in_balloon": 1, "violation_misaligned": 1,
        "violation_out_of_window": 1, "violation_double_give": 1}


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_exchange_halves_meet_between_or_inside_a_beat(n):
    """EXCHANGE of N wanted + N entering: with N odd the LEAVE/ENTER boundary falls
    between lane 0 and lane 1 of one beat. The last wanted page is also the first
    entering one, so it leaves (lane 0) before it enters again (lane 1) when N is odd."""
    wanted = [3 + 70 * i for i in range(n)]
    entering = [wanted[-1]] + [500 + 3 * i for i in range(n - 1)]

    async def testbench(ctx, h):
        await h.setup(ctx)
        await h.run_commands(ctx, (command(GIVE, [h.address(p) for p in wanted]), 0))
        results = await h.run_commands(
            ctx, (command(EXCHANGE, [h.address(p) for p in wanted + entering]), 0))
        assert results == [(0, results[0][1], 0)]
        assert await h.pages(ctx) == set(entering)

    h = Harness(30 + n)
    h.run(testbench)
    assert h.counted() == {"cmd_give": 1, "cmd_exchange": 1, "pages_entered": 2 * n,
                           "pages_left": n}


def classify(address, base, page_shift, pages=PAGES):
    """C5: a page index, or the kind of violation of an invalid address. The window
    starts at the base rounded down to the page size (C8)."""
    if address % (1 << page_shift):
        return "violation_misaligned"
    offset = address - (base >> page_shift << page_shift)
    if offset < 0 or offset >> page_shift >= pages:
        return "violation_out_of_window"
    return offset >> page_shift


@pytest.mark.parametrize("page_shift,base", [
    (12, 0), (21, 0x40_0000_0000), (30, 1 << 40), (34, 1 << 50), (13, 0x1000),
    (21, 0x40_0010_0000),
    (12, 2 ** 64 - 2 ** 22),            # the window ends at 2**64
    (12, 2 ** 64 - 2 ** 21)])           # ... would run past it: addresses do not wrap
def test_granularity_is_the_negotiated_page_size(page_shift, base):
    """C4: page = (address - base) >> page_shift; the window is PAGES such pages (C8)."""
    size = 1 << page_shift
    end = base + PAGES * size
    candidates = [base, base + size, end - size, end, base - size, base + size // 2,
                  end - size + 4096, base + 7 * size, end + size, 0, 4096, size]
    candidates = list(dict.fromkeys(address & MASK64 for address in candidates))
    kinds = [classify(address, base, page_shift) for address in candidates]

    async def testbench(ctx, h):
        await h.setup(ctx)
        await h.run_commands(ctx, (command(GIVE, candidates), 0))
        assert await h.pages(ctx) == {kind for kind in kinds if isinstance(kind, int)}

    h = Harness(page_shift, page_shift=page_shift, base=base)
    h.run(testbench)
    for kind in ("violation_misaligned", "violation_out_of_window"):
        assert h.events[kind] == kinds.count(kind)


@pytest.mark.parametrize("pattern", ["contiguous", "random"])
def test_throughput_of_512_page_commands(pattern):
    """Beats one per clock, results taken at once: pages per clock of four back-to-back
    512-address commands of each kind, from submission to the last result. Contiguous
    pages pair up on one word or on both banks; random ones conflict on a bank in about
    half of the beats (split over two clocks)."""
    figures = {}
    n = 512
    order = list(range(6 * n))
    if pattern == "random":
        order = random.Random(6).sample(range(2 ** 13), 6 * n)

    async def testbench(ctx, h):
        await h.setup(ctx)
        address = [h.address(p) for p in order]
        runs = {
            "GIVE": [(command(GIVE, address[i * n:(i + 1) * n]), 0) for i in range(4)],
            # wanted: half of what GIVE put in; entering: pages never given.
            "EXCHANGE": [(command(EXCHANGE, address[i * n // 2:(i + 1) * n // 2] +
                                  address[4 * n + i * n // 2:4 * n + (i + 1) * n // 2]), 0)
                         for i in range(4)],
            "GET": [(command(GET, address[2 * n + i * n:3 * n + i * n]), 8) for i in range(4)],
        }
        for kind, commands in runs.items():
            start = ctx.get(cycle)
            results = await h.run_commands(ctx, *commands)
            cycles = ctx.get(cycle) - start - 4
            figures[kind] = 4 * n / cycles
            if kind == "GET":
                assert results == [(8, n, 8)] * 4

    h = Harness(5, idle=0, backpressure=0, pages=2 ** 13)
    cycle = Signal(32)
    h.module.d.sync += cycle.eq(cycle + 1)
    h.run(testbench)
    print(f"pages per clock, {pattern} pages:",
          {kind: round(value, 3) for kind, value in figures.items()})
    assert h.counted() == {"cmd_give": 4, "cmd_exchange": 4, "cmd_get": 4,
                           "pages_entered": 4 * n + 2 * n, "pages_left": 2 * n + 4 * n,
                           "granted": 4 * n}
