"""The balloon core against a small model of C5 and C8 and against the reference model
(sw/refmodel.py), plus reset (C9) and host side (C10)."""

import random
import struct
from collections import Counter

import pytest
from amaranth.lib import data

from balloon_sim import EngineModel, ParkingEngineModel, command_payloads, wait_until_clear
from memballoon import constants as c
from memballoon.hdl.balloon.bitmap import READ_LATENCY
from memballoon.hdl.balloon.core import BalloonCore
from memballoon.hdl.balloon.interface import BalloonCounters
from memballoon.hdl.virtqueue.split.engine import USED_BATCH
from memballoon.refmodel import MemballoonRef
from memballoon.tb.seed import new_seed
from sim_util import simulate

PAGES = 2 ** 10
GET, GIVE, EXCHANGE = (c.VIRTIO_MEMBALLOON_GCMD_GET_PAGES, c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES,
                       c.VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES)
UNLIMITED = c.MGMT_UNLIMITED_BUDGET
MASK64 = 2 ** 64 - 1
COUNTERS = list(data.Layout.cast(BalloonCounters).members)


def command(code, addresses=()):
    return struct.pack(f"<{1 + len(addresses)}Q", code & MASK64,
                       *(address & MASK64 for address in addresses))


class BalloonModel:
    """C5 and C8 as the contract words them, one command at a time."""

    def __init__(self, page_shift, base, extra_mem, pages=PAGES):
        self.page_shift = page_shift
        self.base = base
        self.extra_mem = extra_mem
        self.pages = pages
        self.owned = set()                  # bit set: the host owns the page
        self.balloon_pages = 0
        self.budget = UNLIMITED
        self.extra = range(0)
        self.counters = Counter()

    def page(self, address):
        """The page of a valid address, or the kind of violation (C5). The window starts
        at the base rounded down to the page size (C8)."""
        if address % (1 << self.page_shift):
            return "violation_misaligned"
        offset = address - (self.base >> self.page_shift << self.page_shift)
        if offset < 0 or offset >> self.page_shift >= self.pages:
            return "violation_out_of_window"
        return offset >> self.page_shift

    def grantable(self, page):
        return page in self.owned and (self.extra_mem or page not in self.extra)

    def commit_extra(self, first, count):
        first = min(first, self.pages)
        self.extra = range(first, min(first + count, self.pages))
        self.owned |= set(self.extra)

    def reset(self):
        """C9: the balloon empties, the extra range is host-owned again."""
        self.owned = set(self.extra)
        self.balloon_pages = 0

    def _enter(self, address):
        page = self.page(address)
        if isinstance(page, str):
            self.counters[page] += 1
        elif page in self.owned:
            self.counters["violation_double_give"] += 1
        else:
            self.owned.add(page)
            self.balloon_pages += 1
            self.counters["pages_entered"] += 1

    def _leave(self, page):
        self.owned.remove(page)
        self.balloon_pages -= 1
        self.counters["pages_left"] += 1

    def execute(self, readable, writable):
        """The result (used_len, K or None) of one todevq command."""
        padded = readable + bytes(-len(readable) % 8)
        values = struct.unpack(f"<{len(padded) // 8}Q", padded)
        code, addresses = (values[0], values[1:]) if values else (None, ())
        n = len(addresses)
        if (not readable or len(readable) % 8 or code not in (GET, GIVE, EXCHANGE) or n == 0
                or (code == EXCHANGE and n % 2)
                or writable != (8 if code == GET else 0)):
            self.counters["cmd_malformed"] += 1
            return 0, None
        if code == GIVE:
            self.counters["cmd_give"] += 1
            for address in addresses:
                self._enter(address)
            return 0, None
        if code == EXCHANGE:
            self.counters["cmd_exchange"] += 1
            for address in addresses[:n // 2]:
                page = self.page(address)
                if isinstance(page, str):
                    self.counters[page] += 1
                elif self.grantable(page):
                    self._leave(page)
                else:
                    self.counters["violation_not_in_balloon"] += 1
            for address in addresses[n // 2:]:
                self._enter(address)
            return 0, None
        self.counters["cmd_get"] += 1
        granted = 0
        for address in addresses:
            page = self.page(address)
            if isinstance(page, str):
                self.counters[page] += 1        # the invalid address that stops the GET
                break
            if not self.grantable(page) or self.budget == 0:
                break
            self._leave(page)
            granted += 1
            if self.budget != UNLIMITED:
                self.budget -= 1
        if granted < n:
            self.counters["get_short"] += 1
        return 8, granted


class ReferenceModel:
    """sw/refmodel.py's :class:`MemballoonRef` with BalloonModel's interface: its todevq
    command execution (C5, C8) and host controls (C10) at the command level, without the
    virtqueues. The driver's negotiation is set as FEATURES_OK leaves it."""

    def __init__(self, page_shift, base, extra_mem, pages=PAGES):
        self.page_shift = page_shift
        self.base = base
        self.extra_mem = extra_mem
        self.pages = pages
        self.ref = MemballoonRef(bitmap_pages=pages, reset_time=0)
        self.ref.set_window_base(base)
        self._negotiate()

    def _negotiate(self):
        self.ref.driver_features = (1 << c.VIRTIO_F_VERSION_1 |
                                    1 << c.feature_of_page_size(1 << self.page_shift) |
                                    int(self.extra_mem) << c.VIRTIO_MEMBALLOON_F_EXTRA_MEM)
        self.ref.status = (c.DeviceStatus.ACKNOWLEDGE | c.DeviceStatus.DRIVER |
                           c.DeviceStatus.FEATURES_OK).value
        assert self.ref.page_shift == self.page_shift

    @property
    def owned(self):
        return self.ref.bitmap

    @property
    def balloon_pages(self):
        return self.ref.balloon_pages

    @property
    def budget(self):
        return self.ref.return_budget

    @budget.setter
    def budget(self, pages):
        self.ref.set_return_budget(pages)

    @property
    def counters(self):
        return {name[len("MGMT_"):].lower(): value for name, value in self.ref.counters.items()}

    def commit_extra(self, first, count):
        self.ref.set_extra_range(first, count)

    def reset(self):
        """C9 by a function-level reset, then the driver negotiates again."""
        self.ref.flr()
        self._negotiate()

    def execute(self, readable, writable):
        """The result (used_len, K or None) of one todevq command."""
        used_len, written = self.ref._execute(readable, writable)
        return used_len, int.from_bytes(written, "little") if used_len == 8 else None


class CoreBench:
    def __init__(self, seed, page_shift=12, base=0x2_0000_0000, extra_mem=1, pages=PAGES,
                 idle=0.3, backpressure=0.3, model_class=BalloonModel, **core_options):
        self.rng = random.Random(seed)
        self.dut = BalloonCore(pages, **core_options)
        self.pages = pages
        self.model = model_class(page_shift, base, extra_mem, pages)
        self.todevq = EngineModel(self.dut.todevq, self.rng, idle, backpressure)
        self.fromdevq = ParkingEngineModel(self.dut.fromdevq, self.rng, idle, backpressure)
        self.published = 0
        self.publishing = True              # the engine publishes what it is given

    async def start(self, ctx):
        """Settings as the device has them when the driver runs; the power-on clear."""
        host = self.dut.host
        ctx.set(self.dut.page_shift, self.model.page_shift)
        ctx.set(self.dut.extra_mem, self.model.extra_mem)
        ctx.set(host.window_base, self.model.base)
        await self.reset(ctx)

    async def reset(self, ctx):
        """C9: a reset pulse; busy rises in the next cycle and stays up until the clear is
        done, pages / 128 cycles (a 64-bit word of each bank a clock), and
        ``READ_LATENCY + 1`` more while the last words reach the committed copy."""
        ctx.set(self.dut.reset, 1)
        await ctx.tick()
        ctx.set(self.dut.reset, 0)
        clear_cycles = self.pages // 128 + READ_LATENCY + 1
        cycles = 0
        while ctx.get(self.dut.busy):
            assert ctx.get(self.dut.host.busy) and cycles < clear_cycles
            await ctx.tick()
            cycles += 1
        assert cycles == clear_cycles
        self.model.reset()

    async def write_budget(self, ctx, budget):
        await self._pulse(ctx, self.dut.host.return_budget_write, budget)
        self.model.budget = budget

    async def commit_extra(self, ctx, first, count):
        await self._pulse(ctx, self.dut.host.extra_range_write,
                          {"first": first, "count": count})
        await wait_until_clear(ctx, self.dut.busy)
        self.model.commit_extra(first, count)

    async def _pulse(self, ctx, stream, payload):
        ctx.set(stream.valid, 1)
        ctx.set(stream.payload, payload)
        await ctx.tick()
        ctx.set(stream.valid, 0)

    async def read_word(self, ctx, index):
        host = self.dut.host
        ctx.set(host.bitmap_read.valid, 1)
        ctx.set(host.bitmap_read.payload, index)
        await ctx.tick().until(host.bitmap_read.ready)
        ctx.set(host.bitmap_read.valid, 0)
        while not ctx.get(host.bitmap_data.valid):
            await ctx.tick()
        return ctx.get(host.bitmap_data.payload)

    async def owned_pages(self, ctx):
        pages = set()
        for index in range(self.pages // 32):
            word = await self.read_word(ctx, index)
            pages |= {32 * index + i for i in range(32) if word >> i & 1}
        return pages

    async def run_batch(self, ctx, commands):
        """Execute commands on both sides; check the results and the host's view."""
        expected = [self.model.execute(*command_) for command_ in commands]
        first = len(self.todevq.results)
        for command_ in commands:
            self.todevq.submit(*command_)
        await self.todevq.wait_results(ctx)
        await self.wait_committed(ctx)
        for (readable, _), (used_len, granted), result in zip(
                commands, expected, self.todevq.results[first:]):
            assert result[0] == used_len, f"{readable.hex()}"
            if granted is not None:
                assert result[1:] == (granted, 8), f"{readable.hex()}"
            else:
                assert result[2] == 0
        self.check_state(ctx)

    async def abort(self, ctx):
        """A todevq ring fault (C7): what is unpublished is dropped."""
        self.published = len(self.todevq.results)
        await self._pulse_signal(ctx, self.dut.abort)
        await wait_until_clear(ctx, self.dut.busy, timeout=4 * self.pages)

    async def _pulse_signal(self, ctx, signal):
        ctx.set(signal, 1)
        await ctx.tick()
        ctx.set(signal, 0)
        await ctx.tick()

    def check_state(self, ctx):
        host = self.dut.host
        assert ctx.get(host.balloon_pages) == self.model.balloon_pages
        assert ctx.get(host.return_budget) == self.model.budget
        counters = ctx.get(host.counters)
        assert {name: getattr(counters, name) for name in COUNTERS} == \
            {name: self.model.counters[name] for name in COUNTERS}

    def run(self, testbench):
        async def bench(ctx):
            await testbench(ctx, self)
        simulate(self.dut, bench, background=self.todevq.background() +
                 self.fromdevq.background() + [self.publisher()])

    def publisher(self):
        """The todevq engine's used-ring publication: results are committed (C7) in
        batches of 1..8, some cycles after they were taken."""
        async def publish(ctx):
            while True:
                ctx.set(self.dut.commit, 0)
                await ctx.tick()
                unpublished = len(self.todevq.results) - self.published
                if self.publishing and unpublished and self.rng.random() < 0.3:
                    batch = min(unpublished, self.rng.randrange(1, 9))
                    ctx.set(self.dut.commit, batch)
                    self.published += batch
                    await ctx.tick()
        return publish

    async def wait_committed(self, ctx):
        """Every result published, and its effects applied (one a clock)."""
        while self.published < len(self.todevq.results):
            await ctx.tick()
        await ctx.tick().repeat(2 * USED_BATCH)


class Workload:
    """Random commands over a few hot pages, with invalid addresses of every kind."""

    SIZES = [1, 1, 2, 3, 5, 8, 17]

    MALFORMED = [
        lambda w: (b"", 0),
        lambda w: (command(w.rng.choice([3, 4, 0x8000, 2 ** 64 - 1]), w.addresses(2)), 0),
        lambda w: (command(GIVE, w.addresses(2)) + bytes(w.rng.randrange(1, 8)), 0),
        lambda w: (command(w.rng.choice([GIVE, EXCHANGE])), 0),
        lambda w: (command(GET), 8),
        lambda w: (command(EXCHANGE, w.addresses(3)), 0),
        lambda w: (command(GET, w.addresses(2)), w.rng.choice([0, 4, 16])),
        lambda w: (command(GIVE, w.addresses(2)), 8),
        lambda w: (command(EXCHANGE, w.addresses(2)), 8),
    ]

    def __init__(self, rng, model, extra_pages):
        self.rng = rng
        self.model = model
        self.hot = rng.sample(range(model.pages), 40) + list(extra_pages)

    def address(self, page=None):
        model, rng = self.model, self.rng
        size = 1 << model.page_shift
        start = model.base >> model.page_shift << model.page_shift
        page = rng.choice(self.hot) if page is None else page
        roll = rng.random()
        if roll < 0.06:
            return start + (page << model.page_shift) + rng.randrange(1, size)
        if roll < 0.09:
            return start - rng.randrange(1, 4) * size
        if roll < 0.12:
            return start + (model.pages + rng.randrange(3)) * size
        return start + (page << model.page_shift)

    def addresses(self, n, owned_first=False):
        owned = sorted(self.model.owned & set(self.hot))
        return [self.address(self.rng.choice(owned) if owned_first and owned and
                             self.rng.random() < 0.8 else None) for _ in range(n)]

    def command(self):
        rng = self.rng
        n = rng.choice(self.SIZES)
        kind = rng.choices(["give", "get", "exchange", "malformed"], [4, 3, 2, 1])[0]
        if kind == "give":
            return command(GIVE, self.addresses(n)), 0
        if kind == "get":
            return command(GET, self.addresses(n, owned_first=True)), 8
        if kind == "exchange":
            return command(EXCHANGE, self.addresses(n, owned_first=True) +
                           self.addresses(n)), 0
        return rng.choice(self.MALFORMED)(self)


def random_bench(seed, rng, model_class=BalloonModel, random_streams=False):
    """A CoreBench with a random page size and window base, an extra range six times in
    ten and, with ``random_streams``, random beat idle and result backpressure."""
    page_shift = rng.choice([12, 21, 30])
    base = rng.randrange(1 << 14) << 34 | rng.choice([0, rng.randrange(1 << 34)])
    extra_mem = rng.random() < 0.6
    streams = dict(idle=rng.choice([0, 0.2, 0.6]),
                   backpressure=rng.choice([0, 0.3, 0.7])) if random_streams else {}
    return CoreBench(seed, page_shift, base, extra_mem=extra_mem, model_class=model_class,
                     **streams)


async def random_batch(ctx, bench, workload, rng):
    """One batch of 1..8 commands from ``workload``, then at random a new budget, a new
    extra range or a reset; the results and state must match the model."""
    await bench.run_batch(ctx, [workload.command() for _ in range(rng.randrange(1, 9))])
    action = rng.random()
    if action < 0.2:
        await bench.write_budget(ctx, rng.choice([0, 1, 2, 7, 100, UNLIMITED]))
    elif action < 0.25:
        await bench.commit_extra(ctx, rng.randrange(PAGES + 10), rng.randrange(50))
    elif action < 0.3:
        await bench.reset(ctx)
    bench.check_state(ctx)


@pytest.mark.parametrize("seed", range(6))
def test_random_commands_match_the_model(seed):
    """Seeded mixes of GIVE/GET/EXCHANGE/malformed with invalid addresses, budgets, extra
    ranges and resets, with idle and backpressure on every stream; after each batch the
    results, balloon_pages, the budget and every counter match the model, and at the end
    the whole bitmap does."""
    rng = random.Random(seed)
    bench = random_bench(seed, rng)
    extra_first = rng.randrange(PAGES)
    workload = Workload(rng, bench.model, range(extra_first, extra_first + 6))

    async def testbench(ctx, bench):
        await bench.start(ctx)
        await bench.commit_extra(ctx, extra_first, rng.choice([4, 40, PAGES]))
        for _ in range(30):
            await random_batch(ctx, bench, workload, rng)
        assert await bench.owned_pages(ctx) == bench.model.owned, f"seed {seed}"

    bench.run(testbench)
    counters = bench.model.counters
    assert counters["cmd_get"] and counters["cmd_exchange"] and counters["cmd_malformed"]
    assert counters["violation_double_give"] and counters["violation_misaligned"]
    assert counters["violation_out_of_window"] and counters["pages_left"]


class LaneWorkload(Workload):
    """Longer commands, of odd and even lengths; half of the address lists are runs of
    consecutive pages (lanes on one word or on both banks), the others bunched on hot
    pages (lanes on one page, or on one bank: split beats)."""

    SIZES = [1, 2, 3, 4, 7, 16, 33, 64]

    def addresses(self, n, owned_first=False):
        if self.rng.random() < 0.5:
            return super().addresses(n, owned_first)
        owned = sorted(self.model.owned)
        start = (self.rng.choice(owned) if owned_first and owned else
                 self.rng.randrange(self.model.pages))
        return [self.address((start + i) % self.model.pages) for i in range(n)]


@pytest.mark.parametrize("index", range(4))
def test_random_commands_match_the_reference_model(index):
    """Seeded streams against sw/refmodel.py: after each batch the results (GET counts),
    balloon_pages, the budget and every counter match MemballoonRef's, and the whole bitmap
    does every few batches, with random beat idle and result backpressure."""
    seed = new_seed()
    print("seed", seed)
    rng = random.Random(seed)
    bench = random_bench(seed, rng, ReferenceModel, random_streams=True)
    extra_first = rng.randrange(PAGES)
    workload = LaneWorkload(rng, bench.model, range(extra_first, extra_first + 6))

    async def testbench(ctx, bench):
        await bench.start(ctx)
        await bench.commit_extra(ctx, extra_first, rng.choice([4, 40, PAGES]))
        for batch in range(24):
            await random_batch(ctx, bench, workload, rng)
            if batch % 8 == 7:
                assert await bench.owned_pages(ctx) == bench.model.owned, f"seed {seed}"

    bench.run(testbench)
    counters = bench.model.counters
    assert counters["cmd_get"] and counters["cmd_exchange"] and counters["pages_left"]
    assert counters["pages_entered"] > 100


def test_reset_empties_the_balloon_and_keeps_host_state():
    """C9: bitmap cleared but the extra range refilled, balloon_pages 0; counters, budget
    and the range survive."""
    async def testbench(ctx, bench):
        host = bench.dut.host
        await bench.start(ctx)
        await bench.commit_extra(ctx, 500, 30)
        model = bench.model
        address = [model.base + (page << 12) for page in range(PAGES)]
        await bench.write_budget(ctx, 10)
        await bench.run_batch(ctx, [(command(GIVE, address[:20]), 0),
                                    (command(GET, address[500:503] + address[:2]), 8)])
        assert ctx.get(host.balloon_pages) == 20 - 5
        counters = ctx.get(host.counters)
        await bench.reset(ctx)
        bench.check_state(ctx)
        assert ctx.get(host.balloon_pages) == 0
        assert ctx.get(host.counters) == counters
        assert ctx.get(host.return_budget) == 5
        assert await bench.owned_pages(ctx) == set(range(500, 530))

    CoreBench(7).run(testbench)


def test_extra_range_is_clipped_to_the_window_and_filled_without_counting():
    """C8: each committed range, clipped to the window, becomes host-owned; the bits of
    earlier ranges stay; balloon_pages does not move."""
    async def testbench(ctx, bench):
        host = bench.dut.host
        await bench.start(ctx)
        for first, count, added in [(PAGES - 10, 100, range(PAGES - 10, PAGES)),
                                    (PAGES + 5, 3, range(0)),
                                    (64, 64, range(64, 128)),
                                    (3, 2, range(3, 5))]:
            before = await bench.owned_pages(ctx)
            await bench.commit_extra(ctx, first, count)
            assert await bench.owned_pages(ctx) == before | set(added)
            bench.check_state(ctx)
        await bench.commit_extra(ctx, 200, 2 ** 32 - 1)
        assert await bench.owned_pages(ctx) == set(range(3, 5)) | set(range(64, 128)) | \
            set(range(200, PAGES))
        assert ctx.get(host.balloon_pages) == 0

    CoreBench(8).run(testbench)


def test_budget_is_spent_by_grants_and_all_ones_is_unlimited():
    async def testbench(ctx, bench):
        host = bench.dut.host
        await bench.start(ctx)
        address = [bench.model.base + (page << 12) for page in range(PAGES)]
        await bench.run_batch(ctx, [(command(GIVE, address[:40]), 0)])
        await bench.write_budget(ctx, 3)
        await bench.run_batch(ctx, [(command(GET, address[:5]), 8),
                                    (command(GET, address[5:6]), 8),
                                    (command(EXCHANGE, address[6:8] + address[100:102]), 0)])
        assert ctx.get(host.return_budget) == 0
        await bench.write_budget(ctx, UNLIMITED)
        await bench.run_batch(ctx, [(command(GET, address[8:30]), 8)])
        assert ctx.get(host.return_budget) == UNLIMITED
        assert [r[1] for r in bench.todevq.results if r[0] == 8] == [3, 0, 22]

    CoreBench(9).run(testbench)


def test_a_budget_written_during_a_get_applies_to_the_next_and_never_wraps():
    """The GET in progress keeps the budget it started with (its pages are a prefix);
    its grants, once committed (C7), still spend the new budget, which stops at 0 instead
    of wrapping to all-ones (unlimited)."""
    async def testbench(ctx, bench):
        host = bench.dut.host
        await bench.start(ctx)
        address = [bench.model.base + (page << 12) for page in range(PAGES)]
        await bench.run_batch(ctx, [(command(GIVE, address[:40]), 0)])
        await bench.write_budget(ctx, 100)
        bench.todevq.submit(command(GET, address[:30]), 8)
        await ctx.tick().until(bench.dut.todevq.words.valid & bench.dut.todevq.words.ready)
        await bench._pulse(ctx, host.return_budget_write, 2)
        await bench.todevq.wait_results(ctx)
        await bench.wait_committed(ctx)
        assert bench.todevq.results[-1] == (8, 30, 8)
        assert ctx.get(host.return_budget) == 0
        bench.todevq.submit(command(GIVE, address[:3]), 0)
        bench.todevq.submit(command(GET, address[:3]), 8)
        await bench.todevq.wait_results(ctx)
        assert bench.todevq.results[-1] == (8, 0, 8)

    CoreBench(13, idle=0.8).run(testbench)


def test_bitmap_reads_are_32_bit_words_and_zero_past_the_end():
    async def testbench(ctx, bench):
        await bench.start(ctx)
        address = [bench.model.base + (page << 12) for page in range(PAGES)]
        pages = [0, 31, 32, 63, 64, 100, PAGES - 1]
        await bench.run_batch(ctx, [(command(GIVE, [address[p] for p in pages]), 0)])
        words = [await bench.read_word(ctx, index) for index in (0, 1, 2, 3, PAGES // 32 - 1,
                                                                 PAGES // 32, 2 ** 32 - 1)]
        assert words == [1 | 1 << 31, 1 | 1 << 31, 1, 1 << 4, 1 << 31, 0, 0]

    CoreBench(10).run(testbench)


def test_min_balloon_reaches_fromdevq_and_a_reset_drops_it():
    """C6 through the core; C9: the pending minimum does not survive a reset."""
    async def testbench(ctx, bench):
        host = bench.dut.host
        await bench.start(ctx)
        for value in (1 << 30, 2 << 30):
            ctx.set(host.min_balloon.valid, 1)
            ctx.set(host.min_balloon.payload, value)
            await ctx.tick()
            ctx.set(host.min_balloon.valid, 0)
        bench.fromdevq.submit(b"", 16)
        await bench.fromdevq.wait_results(ctx)
        assert bench.fromdevq.results == [(16, c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON |
                                           (2 << 30) << 64, 16)]
        ctx.set(host.min_balloon.valid, 1)
        ctx.set(host.min_balloon.payload, 3 << 30)
        await ctx.tick()
        ctx.set(host.min_balloon.valid, 0)
        await bench.reset(ctx)
        bench.fromdevq.submit(b"", 16)
        await ctx.tick().repeat(100)
        assert len(bench.fromdevq.results) == 1
        counters = ctx.get(host.counters)
        assert (counters.min_sent, counters.min_dropped) == (1, 1)

    CoreBench(11).run(testbench)


def test_the_largest_bitmap_tracks_its_last_page():
    """2**24 pages (C8's largest build): the last page of the window enters and reads back.
    The power-on clear is not waited for: 2**18 cycles."""
    pages = 2 ** 24

    async def testbench(ctx, bench):
        host = bench.dut.host
        ctx.set(bench.dut.page_shift, 12)
        ctx.set(host.window_base, bench.model.base)
        assert ctx.get(host.bitmap_pages) == pages
        await bench.run_batch(ctx, [(command(GIVE, [bench.model.base + (pages - 1 << 12)]), 0)])
        assert await bench.read_word(ctx, pages // 32 - 1) == 1 << 31

    CoreBench(12, pages=pages).run(testbench)


def snapshot(model):
    return (set(model.owned), model.balloon_pages, model.budget, dict(model.counters))


async def check_snapshot(ctx, bench, state, context):
    owned, balloon_pages, budget, counters = state
    host = bench.dut.host
    assert ctx.get(host.balloon_pages) == balloon_pages, context
    assert ctx.get(host.return_budget) == budget, context
    got = ctx.get(host.counters)
    assert {name: getattr(got, name) for name in COUNTERS} == \
        {name: counters.get(name, 0) for name in COUNTERS}, context
    assert await bench.owned_pages(ctx) == owned, context


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("how", ["unpublished", "data fault"])
def test_an_abort_undoes_every_uncommitted_command(seed, how):
    """C7: commands whose used elements were not published change nothing the host can
    see (counters, balloon_pages, budget); an abort then restores the bitmap exactly,
    also when the last command's data failed half-way (its error beat). Long random
    commands overflow the journal on some seeds: the committed copy stays exact."""
    rng = random.Random(seed)
    bench = random_bench(seed, rng, random_streams=True)
    workload = LaneWorkload(rng, bench.model, range(0))
    workload.SIZES = [1, 3, 64, 300] + ([1500] if seed % 2 else [])

    async def testbench(ctx, bench):
        await bench.start(ctx)
        await bench.write_budget(ctx, rng.choice([40, 500, UNLIMITED]))
        for _ in range(4):
            await bench.run_batch(ctx, [workload.command() for _ in range(rng.randrange(1, 6))])
        agreed = snapshot(bench.model)
        bench.publishing = False
        uncommitted = [workload.command() for _ in range(rng.randrange(1, 6))]
        for readable, writable in uncommitted:
            bench.todevq.submit(readable, writable)
        if how == "data fault":
            readable, writable = workload.command()
            beats = len(command_payloads(readable))
            bench.todevq.submit(readable, writable, error_at=rng.randrange(beats))
        await bench.todevq.wait_results(ctx, len(bench.todevq.results) + len(uncommitted))
        await ctx.tick().repeat(50)
        await check_snapshot(ctx, bench, agreed, "executed, not published")
        await bench.abort(ctx)
        await check_snapshot(ctx, bench, agreed, "after the abort")

    bench.run(testbench)


def test_long_commands_overflow_the_journal_and_stay_exact():
    """A command writing more rows of a bank than the journal holds: its commit copies the
    whole bitmap; later commands wait for it; everything matches the model, and an abort
    after more commands restores the committed state."""
    rng = random.Random(21)
    bench = CoreBench(21, journal_depth=16)
    workload = LaneWorkload(rng, bench.model, range(0))
    workload.SIZES = [40, 200]

    async def testbench(ctx, bench):
        await bench.start(ctx)
        for _ in range(6):
            await bench.run_batch(ctx, [workload.command() for _ in range(rng.randrange(1, 5))])
            assert await bench.owned_pages(ctx) == bench.model.owned
        agreed = snapshot(bench.model)
        bench.publishing = False
        for _ in range(3):
            bench.todevq.submit(*workload.command())
        await bench.todevq.wait_results(ctx, len(bench.todevq.results) + 3)
        await bench.abort(ctx)
        await check_snapshot(ctx, bench, agreed, "after the abort")

    bench.run(testbench)


def test_an_extra_range_waits_for_the_commands_in_flight():
    """C8 with C7: the range is set once no command is uncommitted, so the fill reaches
    both copies; a command queued behind it runs after it."""
    async def testbench(ctx, bench):
        await bench.start(ctx)
        address = [bench.model.base + (page << 12) for page in range(PAGES)]
        bench.publishing = False
        bench.todevq.submit(command(GIVE, address[10:20]), 0)
        await bench.todevq.wait_results(ctx)
        await bench._pulse(ctx, bench.dut.host.extra_range_write, {"first": 100, "count": 8})
        await ctx.tick().repeat(100)
        assert ctx.get(bench.dut.host.busy), "the fill waits for the GIVE's commit"
        bench.publishing = True
        await wait_until_clear(ctx, bench.dut.busy)
        bench.model.execute(command(GIVE, address[10:20]), 0)
        bench.model.commit_extra(100, 8)
        await bench.run_batch(ctx, [(command(GET, address[100:103]), 8)])
        assert await bench.owned_pages(ctx) == bench.model.owned
        await bench.abort(ctx)                  # nothing uncommitted: nothing changes
        assert await bench.owned_pages(ctx) == bench.model.owned

    CoreBench(22).run(testbench)
