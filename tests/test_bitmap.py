"""The balloon bitmap (C8, C9): two-lane pipelined page operations on two banks, clear,
fill and reads."""

import gc
import random
import warnings
from collections import deque

import pytest
from amaranth.hdl import Fragment, Module, UnusedElaboratable
from amaranth.hdl._ir import build_netlist

from balloon_sim import wait_until_clear
from memballoon.hdl.balloon.bitmap import READ_LATENCY, WORD_BITS, Bitmap, BitmapAction
from memballoon.tb.seed import new_seed
from sim_util import simulate, stream_put

PAGES = 2 ** 10
WORDS = PAGES // WORD_BITS


def beat(*operations):
    """A request beat: the operations in lanes 0, 1, ..., each enabled."""
    return {"lanes": [dict(operation, enable=1) for operation in operations]}


def op(page, action, allowed=1, chained=0, tag=0):
    return {"page": page, "action": action, "allowed": allowed, "chained": chained, "tag": tag}


SET, CLEAR = BitmapAction.SET, BitmapAction.CLEAR


class BitmapModel:
    """The bits, and the operation semantics of Bitmap's docstring, one after the other."""

    def __init__(self, pages=PAGES):
        self.bits = [0] * pages
        self.last_changed = False

    def apply(self, operation):
        bit = self.bits[operation["page"]]
        takes_effect = operation["allowed"] and (not operation.get("chained") or
                                                 self.last_changed)
        changed = bool(takes_effect and bit == (operation["action"] == CLEAR))
        if changed:
            self.bits[operation["page"]] ^= 1
        self.last_changed = changed
        return changed

    def word(self, index):
        return sum(b << i for i, b in enumerate(self.bits[index * WORD_BITS:
                                                          (index + 1) * WORD_BITS]))

    def fill(self, first, end):
        for page in range(first, end):
            self.bits[page] = 1


def random_operation(rng, tag, hot_words):
    word = rng.choice(hot_words)
    return op(word * WORD_BITS + rng.randrange(WORD_BITS) if rng.random() < 0.2 else
              word * WORD_BITS + rng.randrange(4),
              rng.choice([SET, CLEAR]), allowed=rng.random() < 0.9,
              chained=rng.random() < 0.3, tag=tag % 256)


def random_beat(rng, tag, hot_words):
    """Two lanes, one of them possibly disabled (its contents still random)."""
    lanes = [random_operation(rng, 2 * tag + lane, hot_words) for lane in range(2)]
    roll = rng.random()
    for lane, operation in enumerate(lanes):
        operation["enable"] = int(not (roll < 0.1 and lane == 0 or
                                       0.1 <= roll < 0.2 and lane == 1 or roll < 0.03))
    return {"lanes": lanes}


async def read_word(ctx, dut, index):
    """One management read; its data comes ``READ_LATENCY`` cycles later."""
    ctx.set(dut.read.valid, 1)
    ctx.set(dut.read.payload, index)
    await ctx.tick()
    ctx.set(dut.read.valid, 0)
    await ctx.tick().repeat(READ_LATENCY - 1)
    assert ctx.get(dut.read_data.valid)
    return ctx.get(dut.read_data.payload)


async def read_all(ctx, dut):
    return [await read_word(ctx, dut, index) for index in range(WORDS)]


async def pulse(ctx, signal):
    ctx.set(signal, 1)
    await ctx.tick()
    ctx.set(signal, 0)


def response_monitor(dut, sink):
    """A process collecting ``(tag, changed)`` of every answered lane, in order."""
    async def process(ctx):
        async for _, _, valid, response in ctx.tick().sample(dut.response.valid,
                                                             dut.response.payload):
            if valid:
                sink.extend((lane.tag, lane.changed) for lane in response.lanes
                            if lane.enable)
    return process


async def issue_beats(ctx, dut, beats):
    """Offer the beats back to back; the clocks it took."""
    cycles = 0
    ctx.set(dut.request.valid, 1)
    for request in beats:
        ctx.set(dut.request.payload, request)
        while True:
            _, _, ready = await ctx.tick().sample(dut.request.ready)
            cycles += 1
            if ready:
                break
    ctx.set(dut.request.valid, 0)
    await ctx.tick().repeat(2)
    return cycles


@pytest.mark.parametrize("index", range(4))
def test_random_beats_and_reads_match_the_model(index):
    """Beats of two lanes bunched on a few words of both banks (same word, same page,
    same bank and different words, different banks; back-to-back read-modify-writes of
    one word need forwarding), seeded idle, with management reads cutting in at random."""
    seed = new_seed()
    print("seed", seed)
    rng = random.Random(seed)
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()
    hot_words = rng.sample(range(WORDS), 4)
    beats = [random_beat(rng, tag, hot_words) for tag in range(1000)]
    in_order = deque(operation for request in beats for operation in request["lanes"]
                     if operation["enable"])
    answered = []
    reads_checked = []
    done = []

    async def producer(ctx):
        for request in beats:
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
        read_indices = deque([None] * READ_LATENCY)   # of the reads on their way
        async for _, _, read_valid, index_, response_valid, response, data_valid, data in \
                ctx.tick().sample(dut.read.valid, dut.read.payload, dut.response.valid,
                                  dut.response.payload, dut.read_data.valid,
                                  dut.read_data.payload):
            read_index = read_indices.popleft()
            if data_valid:
                assert read_index is not None
                assert data == model.word(read_index), f"seed {seed}: read of {read_index}"
                reads_checked.append(read_index)
            read_indices.append(index_ if read_valid else None)
            if not response_valid:
                continue
            for lane in response.lanes:
                if lane.enable:
                    operation = in_order.popleft()
                    assert lane.tag == operation["tag"], f"seed {seed}: order"
                    assert lane.changed == model.apply(operation), \
                        f"seed {seed}: operation {operation}"
                    answered.append(operation)

    async def checker(ctx):
        await ctx.tick().until(dut.request.valid == 0)
        while not done or in_order:
            await ctx.tick()
        await ctx.tick().repeat(2)
        for word in range(WORDS):
            assert await read_word(ctx, dut, word) == model.word(word), f"seed {seed}"

    simulate(dut, producer, checker, background=[reader], processes=[monitor])
    assert len(answered) == sum(len([o for o in b["lanes"] if o["enable"]]) for b in beats)
    assert len(reads_checked) > 20


def test_two_operations_per_clock_on_one_word():
    """Back-to-back SET/CLEAR of two pages of one word, both lanes each clock, each see
    the previous one (forwarding and lane 0 before lane 1): 2000 operations are taken in
    1000 consecutive clocks."""
    dut = Bitmap(PAGES, tag_shape=8)
    count = 1000
    answered = []

    async def producer(ctx):
        beats = [beat(op(77, SET if i % 2 == 0 else CLEAR, tag=i % 256),
                      op(78, SET if i % 2 == 0 else CLEAR, tag=i % 256)) for i in range(count)]
        assert await issue_beats(ctx, dut, beats) == count

    simulate(dut, producer, processes=[response_monitor(dut, answered)])
    assert [changed for _, changed in answered] == [1] * 2 * count


def test_back_to_back_words_on_one_row():
    """Beats every clock on the words of one row of both banks (words 2r, 2r + 1) and on
    another row of the same bank, in every order, with a read of the row between: each
    operation sees the ones before it, whether the last clock wrote the row, left it
    unchanged or read it (the forwarding compares rows a clock early)."""
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()
    answered = []
    row_words = [6, 7, 8]                   # words 6 and 8: bank 0, rows 3 and 4
    sequence = [6, 7, 6, 6, 8, 6, 7, 7, 8, 8, 6]
    requests = []
    for i, word in enumerate(sequence * 4):
        page = word * WORD_BITS + i % 5
        action = SET if (i // len(sequence)) % 2 == 0 else CLEAR
        partner = row_words[(i + 1) % 3] * WORD_BITS + i % 3
        requests.append(beat(op(page, action, allowed=i % 7 != 3, tag=i),
                             op(partner, SET if i % 2 else CLEAR, tag=i)))

    async def testbench(ctx):
        for index, request in enumerate(requests):
            await issue_beats(ctx, dut, [request])      # then two idle clocks
            if index % 3 == 0:
                assert await read_word(ctx, dut, 6) == model_words[index][6]
        assert await issue_beats(ctx, dut, requests) >= len(requests)   # back to back
        assert await read_all(ctx, dut) == [model.word(i) for i in range(WORDS)]

    expected, model_words = [], []
    for request in requests:
        expected += [model.apply(operation) for operation in request["lanes"]]
        model_words.append([model.word(i) for i in range(WORDS)])
    for request in requests:
        expected += [model.apply(operation) for operation in request["lanes"]]
    simulate(dut, testbench, processes=[response_monitor(dut, answered)])
    assert [changed for _, changed in answered] == expected
    assert any(expected) and not all(expected)


# (lane 0, lane 1, clocks): both lanes in one clock unless they are on different words of
# one bank. Words 1 and 3 share bank 1; words 1 and 2 are in different banks.
LANE_PAIRS = {
    "same word": (op(64 + 5, SET), op(64 + 9, SET), 1),
    "same page": (op(64 + 5, SET), op(64 + 5, SET), 1),
    "different banks": (op(64 + 5, SET), op(128 + 5, SET), 1),
    "same bank, different words": (op(64 + 5, SET), op(192 + 5, SET), 2),
}


@pytest.mark.parametrize("name", LANE_PAIRS)
def test_lane_pairs(name):
    """Each pair as one beat, cleared in reverse lane order, then set three times: the
    second SET of the same page in one beat is refused (it sees the first)."""
    lane_0, lane_1, clocks = LANE_PAIRS[name]
    dut = Bitmap(PAGES, tag_shape=8)
    answered = []
    model = BitmapModel()
    clear_0, clear_1 = dict(lane_0, action=CLEAR), dict(lane_1, action=CLEAR)

    async def testbench(ctx):
        assert await issue_beats(ctx, dut, [beat(lane_0, lane_1)]) == clocks
        assert await issue_beats(ctx, dut, [beat(clear_1, clear_0)]) == clocks
        assert await issue_beats(ctx, dut, [beat(lane_0, lane_1)] * 3) == 3 * clocks
        assert await read_all(ctx, dut) == [model.word(i) for i in range(WORDS)]

    expected = [model.apply(operation) for operation in
                [lane_0, lane_1, clear_1, clear_0] + [lane_0, lane_1] * 3]
    simulate(dut, testbench, processes=[response_monitor(dut, answered)])
    assert [changed for _, changed in answered] == expected
    same_page = lane_0["page"] == lane_1["page"]
    assert expected[:6] == [1, not same_page, 1, not same_page, 1, not same_page]


def test_chained_operations_stop_after_the_first_refusal_in_either_lane():
    """C5's GET prefix over lanes and beats: refusals in lane 0, in lane 1, and in the
    first half of a split beat."""
    dut = Bitmap(PAGES, tag_shape=8)
    answered = []
    model = BitmapModel()

    def get(*pages):
        operations = [op(page, CLEAR, chained=i != 0) for i, page in enumerate(pages)]
        return [beat(*operations[i:i + 2]) for i in range(0, len(operations), 2)]

    requests = [
        beat(*[op(page, SET) for page in (1, 2)]), beat(*[op(page, SET) for page in (4, 5)]),
        beat(*[op(page, SET) for page in (70, 200)]), beat(op(6, SET)),
        *get(1, 2, 3, 4),           # lane 0 of beat 2 refused: 4 is too
        *get(5, 9, 6),              # lane 1 of beat 1 refused: 6 (lane 0 of beat 2) too
        *get(70, 200),              # the same bank (words 1, 3): split beat, both granted
        beat(op(70, SET)),
        *get(200, 70),              # split beat: its first half refused, so is lane 1
    ]
    operations = [operation for request in requests for operation in request["lanes"]]

    async def testbench(ctx):
        await issue_beats(ctx, dut, requests)
        assert await read_all(ctx, dut) == [model.word(i) for i in range(WORDS)]

    expected = [model.apply(operation) for operation in operations]
    simulate(dut, testbench, processes=[response_monitor(dut, answered)])
    assert [changed for _, changed in answered] == expected
    assert expected[7:] == [1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0]
    assert model.bits[4] and model.bits[6] and model.bits[70]


RANGES = [(0, 0), (5, 6), (60, 70), (64, 128), (0, PAGES), (PAGES - 1, PAGES), (130, 900)]


@pytest.mark.parametrize("first,end", RANGES)
def test_fill_sets_the_range_and_keeps_other_bits(first, end):
    rng = random.Random(first * 7 + end)
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()

    async def testbench(ctx):
        for _ in range(200):
            operations = [op(rng.randrange(PAGES), SET) for _ in range(2)]
            await stream_put(ctx, dut.request, beat(*operations), rng, idle=0.2)
            for operation in operations:
                model.apply(operation)
        ctx.set(dut.extra_first, first)
        ctx.set(dut.extra_end, end)
        # A request offered with the fill pulse waits for the fill to end.
        ctx.set(dut.request.valid, 1)
        ctx.set(dut.request.payload, beat(op(3, CLEAR)))
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
        model.apply(op(3, CLEAR))
        await ctx.tick().repeat(2)
        assert await read_all(ctx, dut) == [model.word(i) for i in range(WORDS)]

    simulate(dut, testbench)


@pytest.mark.parametrize("first,end", RANGES)
def test_clear_leaves_only_the_range_and_is_busy_until_done(first, end):
    rng = random.Random(first + end)
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()

    async def testbench(ctx):
        for _ in range(300):
            await stream_put(ctx, dut.request, beat(op(rng.randrange(PAGES), SET),
                                                    op(rng.randrange(PAGES), SET)),
                             rng, idle=0.2)
        ctx.set(dut.extra_first, first)
        ctx.set(dut.extra_end, end)
        # In the clear's cycle a request is not taken; busy rises in the next one.
        ctx.set(dut.request.valid, 1)
        ctx.set(dut.request.payload, beat(op(9, SET)))
        ctx.set(dut.clear, 1)
        assert not ctx.get(dut.request.ready)
        await ctx.tick()
        ctx.set(dut.clear, 0)
        ctx.set(dut.request.valid, 0)
        # A word of each bank a clock, once the beat taken last has left the pipeline.
        clear_cycles = WORDS // 2 + READ_LATENCY - 1
        busy_cycles = 0
        while ctx.get(dut.busy):
            assert not ctx.get(dut.request.ready) and busy_cycles < clear_cycles
            await ctx.tick()
            busy_cycles += 1
        assert busy_cycles == clear_cycles
        model.fill(first, end)
        assert await read_all(ctx, dut) == [model.word(i) for i in range(WORDS)]

    simulate(dut, testbench)


def test_clear_supersedes_a_fill_and_a_fill_waits_for_a_clear():
    dut = Bitmap(PAGES, tag_shape=8)
    model = BitmapModel()

    async def testbench(ctx):
        await stream_put(ctx, dut.request, beat(op(1000, SET)))
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

    simulate(dut, testbench)


def test_elaborates_at_the_largest_size_and_refuses_bad_sizes():
    m = Module()
    m.submodules.bitmap = bitmap = Bitmap(2 ** 24, tag_shape=2)
    build_netlist(Fragment.get(m, None), ports=[])
    assert len(bitmap.request.payload.lanes[1].page) == 24
    assert len(bitmap.read.payload) == 24 - 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)   # the half-built objects
        for pages in (3 * 2 ** 10, 2 ** 25, 128):
            with pytest.raises(ValueError):
                Bitmap(pages, tag_shape=2)
        gc.collect()


@pytest.mark.parametrize("gap", range(1, READ_LATENCY + 1))
def test_a_read_on_its_way_sees_a_scan_write_of_its_row(gap):
    """A read's word is its row as it leaves the pipeline: a scan write of the row taken
    ``gap`` clocks after the read (its RAM access already made) is in the read's data if
    it comes before the data does; a later read sees it from the RAM. Restoring the
    committed copy (C7) writes rows this way while reads go on."""
    dut = Bitmap(PAGES, tag_shape=8)
    old, new = 0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210
    word = 6                            # row 3 of bank 0

    def offer_scan_write(ctx, data):
        ctx.set(dut.scan.valid, 1)
        ctx.set(dut.scan.payload, {"row": word // 2, "write": 1, "data": [data, 0]})

    async def testbench(ctx):
        ctx.set(dut.hold, 1)
        offer_scan_write(ctx, old)
        await ctx.tick()
        ctx.set(dut.scan.valid, 0)
        ctx.set(dut.read.valid, 1)
        ctx.set(dut.read.payload, word)
        for clock in range(1, READ_LATENCY + 1):
            await ctx.tick()
            ctx.set(dut.read.valid, 0)
            ctx.set(dut.scan.valid, 0)
            if clock == gap:
                assert ctx.get(dut.scan.ready)
                offer_scan_write(ctx, new)
        assert ctx.get(dut.read_data.valid)
        assert ctx.get(dut.read_data.payload) == (new if gap < READ_LATENCY else old)
        await ctx.tick()
        ctx.set(dut.scan.valid, 0)
        assert await read_word(ctx, dut, word) == new

    simulate(dut, testbench)


def test_written_mirrors_every_write_and_scans_take_whole_rows():
    """For the committed copy (C7): ``written`` reports each bank's page writes (journaled)
    and fill writes (direct) a clock late, so a mirror built from it equals the RAMs;
    under ``hold`` no page request is taken, scan reads return whole rows and scan writes
    replace them without being reported."""
    seed = new_seed()
    print("seed", seed)
    rng = random.Random(seed)
    dut = Bitmap(PAGES, tag_shape=8)
    rows = WORDS // 2
    mirror = {}                         # (bank, row) -> word, from ``written``
    kinds = set()
    beats = [random_beat(rng, tag, rng.sample(range(WORDS), 4)) for tag in range(300)]

    async def watch(ctx):
        async for _, _, written in ctx.tick().sample(dut.written):
            for bank in range(2):
                if written[bank].valid:
                    mirror[bank, written[bank].row] = written[bank].data
                    kinds.add(bool(written[bank].journal))

    async def testbench(ctx):
        ctx.set(dut.extra_first, 5)
        ctx.set(dut.extra_end, 300)
        await pulse(ctx, dut.fill)
        await wait_until_clear(ctx, dut.busy)
        for request in beats:
            await stream_put(ctx, dut.request, request, rng, idle=0.2)
        await ctx.tick().repeat(3)
        words = await read_all(ctx, dut)
        assert {(word % 2, word // 2): value for word, value in enumerate(words)
                if (word % 2, word // 2) in mirror} == mirror
        assert kinds == {True, False}
        # Held: a request waits; whole rows are read and written.
        ctx.set(dut.hold, 1)
        ctx.set(dut.request.valid, 1)
        ctx.set(dut.request.payload, beat(op(3, SET)))
        await ctx.tick()
        assert not ctx.get(dut.request.ready)
        ctx.set(dut.request.valid, 0)
        for row in range(rows):
            ctx.set(dut.scan.valid, 1)
            ctx.set(dut.scan.payload, {"row": row, "write": 0})
            await ctx.tick().until(dut.scan.ready)
            ctx.set(dut.scan.valid, 0)
            await ctx.tick().repeat(READ_LATENCY - 1)
            assert ctx.get(dut.scan_data.valid)
            got = ctx.get(dut.scan_data.payload)
            assert [got[0], got[1]] == words[2 * row:2 * row + 2]
        mirror.clear()
        new = [rng.getrandbits(WORD_BITS) for _ in range(WORDS)]
        for row in range(rows):
            ctx.set(dut.scan.valid, 1)
            ctx.set(dut.scan.payload, {"row": row, "write": 1, "data": new[2 * row:2 * row + 2]})
            await ctx.tick().until(dut.scan.ready)
        ctx.set(dut.scan.valid, 0)
        await ctx.tick()
        assert not mirror, "scan writes are not reported"
        ctx.set(dut.hold, 0)
        assert await read_all(ctx, dut) == new

    simulate(dut, testbench, processes=[watch])
