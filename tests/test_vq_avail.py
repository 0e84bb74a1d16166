"""AvailFetcher alone, against a driver model and a host answering its reads after a
server's latency: ``avail->idx`` and the ring entries of its cache line in one read, the
others after it; heads in ring order, each once (C7, C11; virtio 1.2 2.7.6, 2.7.10)."""

import gc
import random
import struct
import warnings
from collections import deque
from dataclasses import dataclass

import pytest
from amaranth.hdl import UnusedElaboratable

from memballoon import constants as c
from memballoon.hdl.pcie.interface import DMA_READ_BEAT_BYTES
from memballoon.hdl.virtqueue.split.avail import CACHE_LINE_BYTES, AvailFetcher
from memballoon.tb.seed import new_seed
from sim_util import simulate, stream_consumer, wait_until

#: A server's read round trip in 250 MHz cycles (about 500 ns).
HOST_LATENCY = 125
#: Clocks from a kick to its first head on top of the one round trip (kick to read,
#: response to head): what the fetcher adds to a command's latency.
FETCHER_CYCLES = 12
#: Clocks a test waits for the fetcher and the host to fall quiet, at most.
QUIET_LIMIT = 20_000
MEMORY_BYTES = 1 << 16
#: Where the rings lie: the driver area at an offset (mod CACHE_LINE_BYTES) from this.
DRIVER_BASE = 0x1000
DEVICE_AREA = 0x8000
ENTRY_BYTES = 2
#: Entries of a line after ``avail->idx`` when the driver area is line-aligned.
ALIGNED_LINE_ENTRIES = (CACHE_LINE_BYTES - c.VRING_AVAIL_RING) // ENTRY_BYTES
INDEX_MASK = 0xFFFF


def vring_need_event(event, new, old):
    """virtio 1.2 2.7.10 (``linux/virtio_ring.h``)."""
    return (new - event - 1) & INDEX_MASK < (new - old) & INDEX_MASK


@dataclass
class Read:
    cycle: int                  # accepted
    address: int
    length: int
    answer: int                 # cycle its beats may start
    samples: dict               # cache line -> cycle it is copied
    data: bytearray


class Host:
    """Memory behind the fetcher's ``read``/``response`` and ``write`` handshakes.

    Each cache line a read touches is copied at its own random cycle before the answer
    (a root complex fetches a request's lines in any order); the beats are byte-packed
    from the read's address, at most one a clock, in read order. ``fail`` (tests may set
    it) maps a read to the offset of its first failing byte, or None: its whole beats
    before that byte come, then an error beat. A write lands after ``write_latency``
    cycles; ``write_idle`` is high while none is outstanding. Stream payloads are checked
    to hold while not taken."""

    def __init__(self, dut, memory, rng, *, latency=(HOST_LATENCY, HOST_LATENCY),
                 write_latency=(10, 60), stall=0.2, idle=0.2):
        self.dut = dut
        self.memory = memory
        self.rng = rng
        self.latency = latency
        self.write_latency = write_latency
        self.stall = stall
        self.idle = idle
        self.fail = lambda read: None
        self.reads = []
        self.writes = []            # (cycle landed, address, bytes)
        self.cycle = 0
        self._in_flight = deque()   # Reads not answered yet
        self._beats = deque()       # (first cycle, data, count, last, error)
        self._landing = deque()     # (cycle, address, bytes)

    @property
    def outstanding(self):
        return bool(self._in_flight or self._beats or self._landing)

    def _accept(self, address, length):
        answer = self.cycle + self.rng.randint(*self.latency)
        if self._in_flight:
            answer = max(answer, self._in_flight[-1].answer)
        lines = range(address // CACHE_LINE_BYTES, (address + length - 1) // CACHE_LINE_BYTES + 1)
        read = Read(self.cycle, address, length, answer,
                    {line: self.rng.randint(self.cycle, answer) for line in lines},
                    bytearray(length))
        self.reads.append(read)
        self._in_flight.append(read)

    def _sample_lines(self):
        for read in self._in_flight:
            for line, cycle in read.samples.items():
                if cycle == self.cycle:
                    start = max(read.address, line * CACHE_LINE_BYTES)
                    end = min(read.address + read.length, (line + 1) * CACHE_LINE_BYTES)
                    read.data[start - read.address:end - read.address] = self.memory[start:end]
        while self._in_flight and self._in_flight[0].answer <= self.cycle:
            read = self._in_flight.popleft()
            step = DMA_READ_BEAT_BYTES
            failing = self.fail(read)
            if failing is None:
                beats = [(read.data[i:i + step], min(step, read.length - i),
                          i + step >= read.length, False) for i in range(0, read.length, step)]
            else:
                beats = [(read.data[step * i:step * (i + 1)], step, False, False)
                         for i in range(failing // step)] + [(b"", 0, True, True)]
            for chunk, count, last, error in beats:
                data = (int.from_bytes(chunk, "little") if not error
                        else self.rng.getrandbits(8 * step))
                self._beats.append((read.answer, data, count, last, error))

    async def serve(self, ctx):
        dut = self.dut
        rq, rs, wr = dut.read, dut.response, dut.write
        held = {}
        async for sample in ctx.tick().sample(
                rq.valid, rq.ready, rq.payload.command.address, rq.payload.command.length,
                rs.valid, rs.ready, wr.valid, wr.ready, wr.payload.address,
                wr.payload.length, wr.payload.data):
            (_, _, rq_valid, rq_ready, address, length, rs_valid, rs_ready,
             wr_valid, wr_ready, w_address, w_length, w_data) = sample
            self.cycle += 1
            for name, valid, ready, payload in (
                    ("read", rq_valid, rq_ready, (address, length)),
                    ("write", wr_valid, wr_ready, (w_address, w_length, w_data))):
                if name in held and valid:
                    assert held.pop(name) == payload, f"{name} payload changed while not taken"
                held.pop(name, None)
                if valid and not ready:
                    held[name] = payload
            if rq_valid and rq_ready:
                self._accept(address, length)
            if rs_valid and rs_ready:
                self._beats.popleft()
            if wr_valid and wr_ready:
                data = w_data.to_bytes(DMA_READ_BEAT_BYTES, "little")[:w_length]
                self._landing.append((self.cycle + self.rng.randint(*self.write_latency),
                                      w_address, data))
            while self._landing and self._landing[0][0] <= self.cycle:
                landed = self._landing.popleft()
                self.memory[landed[1]:landed[1] + len(landed[2])] = landed[2]
                self.writes.append(landed)
            self._sample_lines()

            ctx.set(rq.ready, self.rng.random() >= self.stall)
            ctx.set(wr.ready, self.rng.random() >= self.stall)
            ctx.set(dut.write_idle, not self._landing)
            offer = bool(self._beats) and self._beats[0][0] <= self.cycle and (
                (rs_valid and not rs_ready) or self.rng.random() >= self.idle)
            ctx.set(rs.valid, offer)
            if offer:
                _, data, count, last, error = self._beats[0]
                ctx.set(rs.payload.data, data)
                ctx.set(rs.payload.count, count)
                ctx.set(rs.payload.last, last)
                ctx.set(rs.payload.error, error)


class Driver:
    """The driver's side of the available ring: entries first, then ``avail->idx``
    (after a write barrier), entries ahead of the index scribbled before they are
    written for real; a ring slot is reused only once the fetcher has handed out the
    head that was in it."""

    def __init__(self, memory, rng, *, size, offset, start):
        self.memory = memory
        self.rng = rng
        self.size = size
        self.address = DRIVER_BASE + offset
        self.start = start
        self.idx = start            # avail->idx as published
        self.written = start        # entries written for real up to here
        self.kicked_idx = start     # avail->idx at the last kick decision
        self.heads = {}             # ring index -> head written there for real
        self.consumed = []          # heads out of the fetcher, in order
        self.serial = 0
        struct.pack_into("<HH", memory, self.address, 0, start)
        struct.pack_into("<H", memory, self.avail_event_address, start)

    @property
    def avail_event_address(self):
        return DEVICE_AREA + c.VRING_USED_RING + c.VRING_USED_ELEM_SIZE * self.size

    def entry_address(self, index):
        return self.address + c.VRING_AVAIL_RING + ENTRY_BYTES * (index % self.size)

    def room(self, index):
        """Ring index ``index`` may be written: its slot's previous head is out."""
        return (index - self.start) < len(self.consumed) + self.size

    def scribble(self, count):
        """Junk in up to ``count`` slots past the written entries (never to be taken)."""
        for index in range(self.written, self.written + count):
            if self.room(index):
                struct.pack_into("<H", self.memory, self.entry_address(index),
                                 self.rng.getrandbits(16))

    def write_entries(self, count):
        for _ in range(count):
            if not self.room(self.written):
                return
            # Heads are distinct over any 2**16 in a row, so a repeat or a junk value shows.
            head = self.serial * 40503 & INDEX_MASK
            self.serial += 1
            struct.pack_into("<H", self.memory, self.entry_address(self.written), head)
            self.heads[self.written] = head
            self.written += 1

    def publish(self, count):
        self.idx = min(self.idx + count, self.written)
        struct.pack_into("<H", self.memory, self.address + c.VRING_AVAIL_IDX,
                         self.idx & INDEX_MASK)

    def kick_prepare(self, event_idx):
        """``virtqueue_kick_prepare``: with EVENT_IDX, whether ``avail_event`` was passed."""
        old, self.kicked_idx = self.kicked_idx, self.idx
        if not event_idx:
            return True
        event, = struct.unpack_from("<H", self.memory, self.avail_event_address)
        return vring_need_event(event, self.idx & INDEX_MASK, old & INDEX_MASK)

    def expected(self):
        return [self.heads[index] for index in range(self.start, self.idx)]


class Bench:
    """A fetcher, its host and driver; heads consumed with seeded backpressure."""

    def __init__(self, seed, *, size, offset=0, start=0, event_idx=False, max_heads=None,
                 latency=(HOST_LATENCY, HOST_LATENCY), backpressure=0.1):
        print(f"seed {seed}: size {size}, driver at line offset {offset}, start {start}, "
              f"event_idx {event_idx}, max_heads {max_heads}, latency {latency}")
        self.rng = random.Random(seed)
        self.dut = AvailFetcher() if max_heads is None else AvailFetcher(max_heads=max_heads)
        self.memory = bytearray(MEMORY_BYTES)
        self.event_idx = event_idx
        self.host = Host(self.dut, self.memory, random.Random(seed + 1), latency=latency)
        self.driver = Driver(self.memory, self.rng, size=size, offset=offset, start=start)
        self.backpressure = backpressure
        self.consumer_rng = random.Random(seed + 2)
        self.faults = []            # (cycle, kind)
        self.kicks = []             # cycles

    @property
    def index_address(self):
        return self.driver.address + c.VRING_AVAIL_IDX

    async def configure(self, ctx):
        dut, driver = self.dut, self.driver
        ctx.set(dut.last_avail, driver.start)
        ctx.set(dut.config.size, driver.size)
        ctx.set(dut.config.enable, 1)
        ctx.set(dut.config.driver, driver.address)
        ctx.set(dut.config.device, DEVICE_AREA)
        ctx.set(dut.event_idx, self.event_idx)

    async def kick(self, ctx):
        self.kicks.append(self.host.cycle)
        ctx.set(self.dut.kick, 1)
        await ctx.tick()
        ctx.set(self.dut.kick, 0)

    async def monitor(self, ctx):
        async for _, _, fault, kind in ctx.tick().sample(self.dut.fault, self.dut.fault_kind):
            if fault:
                self.faults.append((self.host.cycle, c.RingFault(kind)))

    async def quiet(self, ctx, cycles=2 * HOST_LATENCY, limit=QUIET_LIMIT):
        """Waits until nothing has been outstanding or asked for ``cycles`` clocks."""
        still = 0
        for _ in range(limit):
            busy = (self.host.outstanding or ctx.get(self.dut.read.valid) or
                    ctx.get(self.dut.write.valid))
            still = 0 if busy else still + 1
            if still == cycles:
                return
            await ctx.tick()
        raise AssertionError(f"still busy after {limit} cycles (beats not taken?)")

    def run(self, testbench):
        consume = stream_consumer(self.dut.heads, self.driver.consumed.append,
                                  self.consumer_rng, self.backpressure)
        simulate(self.dut, testbench, background=[consume],
                 processes=[self.host.serve, self.monitor])

    def check_reads(self):
        """Index reads from ``avail->idx`` never leave its cache line; ring reads stay in
        the ring."""
        driver = self.driver
        ring = driver.address + c.VRING_AVAIL_RING
        for read in self.host.reads:
            end = read.address + read.length
            if read.address == self.index_address:
                assert read.length % ENTRY_BYTES == 0, read
                assert (end - 1) // CACHE_LINE_BYTES == read.address // CACHE_LINE_BYTES, \
                    f"index read crosses its line: {read}"
                assert end <= ring + ENTRY_BYTES * driver.size, f"past the ring: {read}"
            else:
                assert ring <= read.address and end <= ring + ENTRY_BYTES * driver.size, read
                assert read.address % ENTRY_BYTES == 0 and read.length % ENTRY_BYTES == 0, read

    def check_heads(self, ctx):
        driver = self.driver
        assert driver.consumed == driver.expected(), \
            f"{len(driver.consumed)} heads out, {driver.idx - driver.start} published"
        assert ctx.get(self.dut.last_avail) == driver.idx & INDEX_MASK
        assert not ctx.get(self.dut.heads_queued)
        assert not self.faults


def line_entries(offset, size):
    """Ring entries in ``avail->idx``'s cache line, for a driver area at ``offset``."""
    idx_offset = (offset + c.VRING_AVAIL_IDX) % CACHE_LINE_BYTES
    return min(size, (CACHE_LINE_BYTES - ENTRY_BYTES - idx_offset) // ENTRY_BYTES)


async def run_pass(bench, ctx, count):
    """Publishes ``count`` entries, kicks, waits for them and for quiet: the reads and the
    kick's latency to its first head."""
    driver = bench.driver
    before = len(bench.host.reads)
    driver.write_entries(count)
    driver.scribble(bench.rng.randint(0, 4))
    driver.publish(count)
    await bench.kick(ctx)
    kicked = bench.host.cycle
    await wait_until(ctx, lambda: ctx.get(bench.dut.heads.valid), "no head")
    latency = bench.host.cycle - kicked
    await wait_until(ctx, lambda: len(driver.consumed) == driver.idx - driver.start,
                     "heads missing")
    await bench.quiet(ctx)
    return bench.host.reads[before:], latency


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("offset", [0, 30, 56])
def test_one_read_per_pass_in_the_index_line(offset, event_idx):
    """Entries in ``avail->idx``'s line come with the index: one read per pass, to the
    line's end (with EVENT_IDX a second one after the ``avail_event`` write, also
    carrying the line), and the first head a round trip after the kick."""
    size = 64
    bench = Bench(new_seed(), size=size, offset=offset, event_idx=event_idx)
    in_line = line_entries(offset, size)
    latencies = []

    async def testbench(ctx):
        await bench.configure(ctx)
        driver = bench.driver
        while driver.idx - driver.start < in_line:
            count = bench.rng.randint(1, min(3, in_line - (driver.idx - driver.start)))
            reads, latency = await run_pass(bench, ctx, count)
            latencies.append(latency)
            assert [read.address for read in reads] == \
                [bench.index_address] * (2 if event_idx else 1), reads
            line_end = (bench.index_address // CACHE_LINE_BYTES + 1) * CACHE_LINE_BYTES
            assert reads[0].address + reads[0].length == line_end, reads
            if event_idx and driver.idx - driver.start < in_line:
                assert reads[1].address + reads[1].length == line_end, reads
            assert len(bench.host.writes) == (len(latencies) if event_idx else 0)
        bench.check_reads()
        bench.check_heads(ctx)

    bench.run(testbench)
    print(f"kick to first head: {latencies} cycles")
    assert max(latencies) <= HOST_LATENCY + FETCHER_CYCLES


def test_head_queue_of_at_least_three():
    """A head queue of two would drop a head pushed right after the first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)   # the half-built one
        with pytest.raises(ValueError):
            AvailFetcher(max_heads=2)
        gc.collect()


def test_index_read_within_the_head_queue_room():
    """The index read takes no more entries than the head queue has room for; the rest
    follow in ring reads once the heads are taken."""
    room = 4
    bench = Bench(new_seed(), size=64, max_heads=room, backpressure=lambda: stalled)
    stalled = True
    published = 10

    async def testbench(ctx):
        nonlocal stalled
        await bench.configure(ctx)
        driver = bench.driver
        driver.write_entries(published)
        driver.publish(published)
        await bench.kick(ctx)
        await bench.quiet(ctx)
        assert [(read.address, read.length) for read in bench.host.reads] == \
            [(bench.index_address, ENTRY_BYTES * (1 + room))]
        stalled = False
        await wait_until(ctx, lambda: len(driver.consumed) == published, "heads missing")
        await bench.quiet(ctx)
        bench.check_reads()
        bench.check_heads(ctx)

    bench.run(testbench)


@pytest.mark.parametrize("offset, start", [(0, ALIGNED_LINE_ENTRIES), (0, 40),
                                           (60, 0), (60, 20), (24, 30)])
def test_two_reads_outside_the_index_line(offset, start):
    """The next entry outside ``avail->idx``'s line (past it, or idx in the line's last
    two bytes): the index alone, then the entries."""
    size = 64
    bench = Bench(new_seed(), size=size, offset=offset, start=start)
    assert start >= line_entries(offset, size)

    async def testbench(ctx):
        await bench.configure(ctx)
        driver = bench.driver
        for _ in range(6):
            position = driver.idx % size
            count = bench.rng.randint(1, 4)
            if position + count > size:
                break
            reads, _ = await run_pass(bench, ctx, count)
            ring = driver.entry_address(position)
            assert [(read.address, read.length) for read in reads] == \
                [(bench.index_address, ENTRY_BYTES), (ring, ENTRY_BYTES * count)], reads
        bench.check_reads()
        bench.check_heads(ctx)

    bench.run(testbench)


async def random_driver(bench, ctx, total):
    """A driver publishing ``total`` entries or more at random: entries written in bursts,
    junk past them, the index moved over some of them, kicks as ``virtqueue_kick_prepare``
    says (without EVENT_IDX: mostly), spurious kicks."""
    driver, rng = bench.driver, bench.rng
    await bench.kick(ctx)                   # the queue starts
    while driver.idx - driver.start < total:
        action = rng.random()
        if action < 0.35:
            driver.write_entries(rng.choice([1, 1, 2, 3, 8, rng.randint(1, driver.size)]))
            if rng.random() < 0.5:
                driver.scribble(rng.randint(1, 8))
        elif action < 0.7 and driver.written > driver.idx:
            driver.publish(rng.randint(1, driver.written - driver.idx))
            if driver.kick_prepare(bench.event_idx) and (bench.event_idx or rng.random() < 0.8):
                await bench.kick(ctx)
        elif action < 0.75:
            await bench.kick(ctx)
        else:
            await ctx.tick().repeat(rng.choice([1, 5, 40, HOST_LATENCY, 3 * HOST_LATENCY]))
    if not bench.event_idx:
        await bench.kick(ctx)
    await wait_until(ctx, lambda: len(driver.consumed) == driver.idx - driver.start,
                     f"heads missing ({len(driver.consumed)} of {driver.idx - driver.start})")
    await bench.quiet(ctx)


#: Driver areas of the random test, mod CACHE_LINE_BYTES: idx at a line's start, at its
#: last two bytes (never with entries), at its middle; None draws one.
RANDOM_OFFSETS = [62, 60, 30, 0, None, None, None, None]


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("case", range(len(RANDOM_OFFSETS)))
def test_random_driver(case, event_idx):
    """Random sizes (1..256), alignments, start indices near the 16-bit wrap, latencies,
    head queue sizes and backpressure: every published head once, in ring order, none
    past ``avail->idx``, and no read of idx's line leaves it."""
    seed = new_seed()
    rng = random.Random(seed)
    size = 1 << rng.randint(0, 8)
    offset = RANDOM_OFFSETS[case]
    if offset is None:
        offset = ENTRY_BYTES * rng.randrange(CACHE_LINE_BYTES // ENTRY_BYTES)
    start = rng.choice([0, INDEX_MASK + 1 - rng.randint(1, 3 * size)])
    bench = Bench(seed, size=size, offset=offset, start=start, event_idx=event_idx,
                  max_heads=rng.choice([None, rng.randint(3, 8)]),
                  latency=rng.choice([(1, 4), (1, 60), (HOST_LATENCY, HOST_LATENCY),
                                      (60, 2 * HOST_LATENCY)]),
                  backpressure=rng.choice([0.0, 0.3, 0.9, 0.99]))

    async def testbench(ctx):
        await bench.configure(ctx)
        await random_driver(bench, ctx, rng.randint(2 * size, 3 * size + 64))
        bench.check_reads()
        bench.check_heads(ctx)

    bench.run(testbench)


def runaway_index(bench, ahead):
    """Entries written for the whole ring, and ``avail->idx`` set ``ahead`` of the
    fetcher's next index."""
    driver = bench.driver
    driver.write_entries(driver.size)
    next_index = driver.start + len(driver.consumed)
    struct.pack_into("<H", bench.memory, bench.index_address,
                     (next_index + ahead) & INDEX_MASK)


@pytest.mark.parametrize("offset, size", [(0, 16), (30, 16), (0, 64)])
@pytest.mark.parametrize("ahead", ["size", "size+1", "backwards"])
def test_avail_ahead_on_the_index_read(ahead, offset, size):
    """C7: an index more than the queue size ahead, read with ring entries of its line,
    queues none of them and faults AVAIL_AHEAD once, dropping the rest of the read; one
    exactly the queue size ahead is fine."""
    bench = Bench(new_seed(), size=size, offset=offset, start=INDEX_MASK - 2)
    steps = {"size": size, "size+1": size + 1, "backwards": INDEX_MASK}[ahead]

    async def testbench(ctx):
        await bench.configure(ctx)
        driver = bench.driver
        await run_pass(bench, ctx, 3)
        before = len(bench.host.reads)
        runaway_index(bench, steps)
        await bench.kick(ctx)
        if steps <= size:
            driver.idx = driver.start + len(driver.consumed) + steps
            await wait_until(ctx, lambda: len(driver.consumed) == driver.idx - driver.start,
                             "heads missing")
            await bench.quiet(ctx)
            bench.check_heads(ctx)
            return
        await wait_until(ctx, lambda: bench.faults, "no fault")
        await bench.quiet(ctx)
        assert [kind for _, kind in bench.faults] == [c.RingFault.AVAIL_AHEAD]
        faulting, = bench.host.reads[before:]
        assert faulting.address == bench.index_address and faulting.length > ENTRY_BYTES
        assert len(driver.consumed) == 3 and not ctx.get(bench.dut.heads_queued)
        assert not bench.host.outstanding, "beats of the read left"
        bench.check_reads()

    bench.run(testbench)


@pytest.mark.parametrize("failing", [0, DMA_READ_BEAT_BYTES])
def test_failed_index_read(failing):
    """C7: an index read with ring entries that fails at byte ``failing``: the entries of
    its whole beats before that (as many as the index covers) are queued, then DMA_READ;
    nothing is read after it."""
    size = 64
    bench = Bench(new_seed(), size=size)
    published = 20

    async def testbench(ctx):
        await bench.configure(ctx)
        driver = bench.driver
        bench.host.fail = lambda read: failing if read.address == bench.index_address else None
        driver.write_entries(published)
        driver.publish(published)
        await bench.kick(ctx)
        await wait_until(ctx, lambda: bench.faults, "no fault")
        await bench.quiet(ctx)
        assert [kind for _, kind in bench.faults] == [c.RingFault.DMA_READ]
        read, = bench.host.reads
        assert read.length > ENTRY_BYTES
        returned = (failing - c.VRING_AVAIL_IDX) // ENTRY_BYTES if failing else 0
        assert driver.consumed == driver.expected()[:returned]

    bench.run(testbench)
