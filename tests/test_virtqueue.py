"""VirtqueueEngine: split rings (virtio 1.2 2.7) against a Python driver, a function model
and the DMA memory model (C5, C7, C9, C11, C12)."""

import random
import struct
from collections import deque
from dataclasses import dataclass, field

import pytest

from memballoon import constants as c
from memballoon.hdl.pcie.interface import DMA_READ_BEAT_BYTES
from memballoon.hdl.virtqueue.split.engine import READABLE_QUEUE_DEPTH, VirtqueueEngine
from memballoon.params import DeviceParams
from memballoon.tb.command_words import command_beats
from memballoon.tb.dma_memory_sim import DmaMemory
from memballoon.tb.seed import new_seed
from sim_util import simulate, wait_until

MEMORY_SIZE = 1 << 20
RESULT_BYTES = 16
#: The cycle counts of these tests (held results, waits, limits) were chosen for a memory
#: answering reads within this many cycles; :meth:`Bench.cycles` stretches them for the
#: slower memory a bench has (DmaMemory's default: a server's latency).
CALIBRATED_LATENCY = 16


def vring_need_event(event, new, old):
    """virtio 1.2 2.7.10 (``linux/virtio_ring.h``)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


async def idle(ctx, cycles):
    if cycles:
        await ctx.tick().repeat(cycles)


def split(rng, total, pieces):
    """``total`` cut at ``pieces - 1`` random byte boundaries (pieces may be empty)."""
    cuts = sorted(rng.randint(0, total) for _ in range(pieces - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


@dataclass
class Chain:
    """What the driver put behind one head."""
    head: int
    readable: bytes
    writable: list                  # [(address, length)], in chain order
    sentinel: bytes                 # what the writable bytes held before
    descriptors: list               # ring descriptor indices it uses


@dataclass
class Result:
    head: int
    used_len: int
    write_count: int
    write_data: bytes


class Driver:
    """A split-ring driver (names as ``drivers/virtio/virtio_ring.c``) over a bytearray;
    with ``in_order`` it checks that buffers come back in ring order."""

    def __init__(self, memory, rng, size, *, event_idx=False, indirect=False, start=0,
                 base=0x1000, scatter=True, in_order=True):
        self.memory = memory
        self.in_order = in_order
        self.rng = rng
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_free = base
        self.read_ranges = []       # (start, end): what the device may read (C12)
        self.write_ranges = []      # what it may write
        self.desc = self.alloc(16 * size, 16, self.read_ranges)
        self.avail = self.alloc(6 + 2 * size, 2, self.read_ranges)
        self.used = self.alloc(6 + 8 * size, 4)
        self.write_ranges.append((self.used + 2, self.used + 6 + 8 * size))
        # Descriptors handed out from the end: in order as from a fresh Linux ring, or
        # scattered as after much reuse; indirect tables in order, or chained at random.
        self.scatter = scatter
        self.free = list(reversed(range(size)))
        if scatter:
            rng.shuffle(self.free)
        self.avail_idx = start      # the driver's avail->idx
        self.kicked_idx = start     # avail->idx at the last kick decision
        self.last_used = start      # the next used element to read
        self.in_flight = deque()    # Chains published and not used yet, in ring order
        self.published = []         # every Chain published, in ring order
        struct.pack_into("<HH", memory, self.avail, 0, start)
        struct.pack_into("<HH", memory, self.used, 0, start)
        self.set_used_event(start)

    def alloc(self, length, align=1, ranges=None):
        address = -(-self.next_free // align) * align + (self.rng.randrange(8) if align == 1 else 0)
        self.next_free = address + max(length, 1)
        assert self.next_free <= len(self.memory), "test memory exhausted"
        if ranges is not None:
            ranges.append((address, address + length))
        return address

    def write_desc(self, table, index, address, length, flags, next_index=0):
        struct.pack_into("<QIHH", self.memory, table + 16 * index, address, length, flags,
                         next_index)

    def buffers(self, readable, readable_lengths, writable_lengths):
        """Place the bytes at random addresses: [(address, length, flags)]."""
        pieces = []
        offset = 0
        for length in readable_lengths:
            address = self.alloc(length, 1, self.read_ranges)
            self.memory[address:address + length] = readable[offset:offset + length]
            pieces.append((address, length, 0))
            offset += length
        for length in writable_lengths:
            pieces.append((self.alloc(length, 1, self.write_ranges), length,
                           c.VRING_DESC_F_WRITE))
        return pieces

    def virtqueue_add(self, readable, writable, *, max_pieces=4, use_indirect=None,
                      direct=None, readable_pieces=None, readable_lengths=None, lengths=None):
        """Queue one buffer, its bytes split at random (into ``readable_pieces`` buffers
        if given, or as ``readable_lengths`` says, or as ``lengths``: (readable lengths,
        writable lengths), then with as many descriptors as given); None when the ring has
        no room."""
        if readable_lengths is not None:
            readable_pieces = len(readable_lengths)
        if lengths:
            readable_count, writable_count = map(len, lengths)
        else:
            readable_count = readable_pieces or (
                self.rng.randint(1, max_pieces) if readable or not writable else 0)
            writable_count = self.rng.randint(1, max_pieces) if writable else 0
        count = readable_count + writable_count
        if use_indirect is None:
            use_indirect = self.indirect and count > 1 and self.rng.random() < 0.5
        # A direct chain has no more descriptors than the queue size; an indirect table
        # may have more (virtio 1.2 2.7.5, as Linux does).
        while not use_indirect and readable_count + writable_count > self.size:
            if readable_count + writable_count == 2:
                return None
            if readable_count > writable_count:
                readable_count -= 1
            else:
                writable_count -= 1
        count = readable_count + writable_count
        if direct is None:
            direct = min(self.rng.randint(0, count - 1), self.size - 1) if use_indirect else count
        if lengths:
            readable_lengths, writable_lengths = lengths
            assert count == len(readable_lengths) + len(writable_lengths), \
                "a direct chain of more descriptors than the queue size"
            assert (sum(readable_lengths), sum(writable_lengths)) == (len(readable), writable)
        else:
            if readable_lengths is None:
                readable_lengths = (split(self.rng, len(readable), readable_count)
                                    if readable_count else [])
            writable_lengths = split(self.rng, writable, writable_count) if writable_count else []
        needed = direct + (1 if use_indirect else 0)
        if needed > len(self.free):
            return None
        pieces = self.buffers(readable, readable_lengths, writable_lengths)
        indices = [self.free.pop() for _ in range(needed)]
        for position, index in enumerate(indices):
            if position < direct:
                address, length, flags = pieces[position]
                more = position + 1 < needed
                self.write_desc(self.desc, index, address, length,
                                flags | (c.VRING_DESC_F_NEXT if more else 0),
                                indices[position + 1] if more else 0)
        if use_indirect:
            table_pieces = pieces[direct:]
            count = len(table_pieces)
            table = self.alloc(16 * count, 16, self.read_ranges)
            # Entry 0 first, the others chained in a random order.
            order = [0] + (self.rng.sample(range(1, count), count - 1) if self.scatter
                           else list(range(1, count)))
            for position, entry in enumerate(order):
                address, length, flags = table_pieces[position]
                more = position + 1 < count
                self.write_desc(table, entry, address, length,
                                flags | (c.VRING_DESC_F_NEXT if more else 0),
                                order[position + 1] if more else 0)
            self.write_desc(self.desc, indices[-1], table, 16 * count, c.VRING_DESC_F_INDIRECT)
        writable_pieces = [(a, n) for a, n, f in pieces if f & c.VRING_DESC_F_WRITE]
        sentinel = bytes(self.rng.getrandbits(8) for _ in range(writable))
        offset = 0
        for address, length in writable_pieces:
            self.memory[address:address + length] = sentinel[offset:offset + length]
            offset += length
        chain = Chain(indices[0], bytes(readable), writable_pieces, sentinel, indices)
        self.publish(chain)
        return chain

    def publish(self, chain):
        """Ring entry, then index (the device must see the entry once it sees the index)."""
        struct.pack_into("<H", self.memory, self.avail + 4 + 2 * (self.avail_idx % self.size),
                         chain.head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.memory, self.avail + 2, self.avail_idx)
        self.in_flight.append(chain)
        self.published.append(chain)

    def virtqueue_kick_prepare(self):
        old, new = self.kicked_idx, self.avail_idx
        self.kicked_idx = new
        if self.event_idx:
            avail_event, = struct.unpack_from("<H", self.memory, self.used + 4 + 8 * self.size)
            return vring_need_event(avail_event, new, old)
        flags, = struct.unpack_from("<H", self.memory, self.used)
        return not flags & c.VRING_USED_F_NO_NOTIFY

    def set_used_event(self, value):
        struct.pack_into("<H", self.memory, self.avail + 4 + 2 * self.size, value & 0xFFFF)

    def set_avail_flags(self, flags):
        struct.pack_into("<H", self.memory, self.avail, flags)

    def virtqueue_get_buf(self):
        """The next used element as (Chain, used_len), or None."""
        used_idx, = struct.unpack_from("<H", self.memory, self.used + 2)
        if used_idx == self.last_used:
            return None
        head, used_len = struct.unpack_from(
            "<II", self.memory, self.used + 4 + 8 * (self.last_used % self.size))
        self.last_used = (self.last_used + 1) & 0xFFFF
        position = next((i for i, chain in enumerate(self.in_flight) if chain.head == head),
                        None)
        assert position is not None, f"used id {head}: no such buffer in flight"
        assert position == 0 or not self.in_order, \
            f"used id {head}, expected head {self.in_flight[0].head}"
        chain = self.in_flight[position]
        del self.in_flight[position]
        self.free.extend(reversed(chain.descriptors))
        return chain, used_len

    def writable_bytes(self, chain):
        return b"".join(bytes(self.memory[a:a + n]) for a, n in chain.writable)


class FunctionModel:
    """The device function on the command port: checks each header and its words against
    the driver's chains (in ring order) and answers random results, in order, after random
    delays; the results of the heads in ``hold`` wait ``hold_cycles``. With ``overlap``
    it takes the next headers while results are still due (up to ``overlap`` of them)."""

    def __init__(self, dut, driver, rng, *, ready=0.7, delay=(0, 6), hold_cycles=0,
                 write_counts=(0, RESULT_BYTES), overlap=0):
        self.dut = dut
        self.driver = driver
        self.rng = rng
        self.ready = ready
        self.delay = delay
        self.hold = set()
        self.hold_cycles = hold_cycles
        self.write_counts = write_counts
        self.overlap = overlap
        self.results = deque()      # Results given, not yet seen in the used ring
        self.commands = 0
        self.word_cycles = []       # [(first beat cycle, last beat cycle)] per command
        self.cycle = 0
        self.faulted = None         # the chain whose data failed (C7)

    def _result(self, chain):
        writable = sum(n for _, n in chain.writable)
        low, high = self.write_counts
        count = self.rng.randint(low, max(low, min(high, writable + 2)))
        return Result(chain.head, self.rng.getrandbits(32), count,
                      bytes(self.rng.getrandbits(8) for _ in range(RESULT_BYTES)))

    async def run(self, ctx):
        command = self.dut.command
        header, words, result = command.header, command.words, command.result
        state, chain, beats, position = "header", None, [], 0
        due = deque()               # [Result, cycles to wait], in command order
        seen = 0                    # chains of driver.published already taken
        async for sample in ctx.tick().sample(
                header.valid, header.ready, header.payload.head, header.payload.readable,
                header.payload.writable, words.valid, words.ready, words.payload.data,
                words.payload.count, words.payload.last, words.payload.error, result.valid,
                result.ready, self.dut.reset):
            (_, _, h_valid, h_ready, head, readable, writable, w_valid, w_ready, lanes,
             count, last, error, r_valid, r_ready, reset) = sample
            self.cycle += 1
            if reset:
                state, seen = "header", 0
                due.clear()
                ctx.set(result.valid, 0)
                ctx.set(header.ready, 0)
                ctx.set(words.ready, 0)
                continue
            if r_valid and r_ready:
                self.results.append(due.popleft()[0])
                self.commands += 1
            if state == "header" and h_valid and h_ready:
                chain = self.driver.published[seen]
                seen += 1
                assert head == chain.head, f"header head {head}, expected {chain.head}"
                assert readable == len(chain.readable)
                assert writable == sum(n for _, n in chain.writable)
                wait = self.hold_cycles if head in self.hold else self.rng.randint(*self.delay)
                due.append([self._result(chain), wait])
                beats, position = command_beats(chain.readable), 0
                state = "words" if readable else "header"
            elif state == "words" and w_valid and w_ready and error:
                # C7: the rest of the command could not be read: it is never completed.
                assert last, "an error beat is its command's last"
                due.pop()
                self.faulted = chain
                state = "faulted"
            elif state == "words" and w_valid and w_ready:
                # interface.CommandWords: the code word alone, then two words a beat.
                expected, expected_last = beats[position]
                where = f"head {chain.head} beat {position}"
                assert count == len(expected), f"{where}: count {count} != {len(expected)}"
                got = [int(lanes[lane]) for lane in range(count)]
                assert got == expected, \
                    f"{where}: {[hex(w) for w in got]} != {[hex(w) for w in expected]}"
                assert bool(last) == expected_last, f"{where}: words.last misplaced"
                if position == 0:
                    self.word_cycles.append([self.cycle, self.cycle])
                self.word_cycles[-1][1] = self.cycle
                position += 1
                if last:
                    state = "header"
            # The result of a command follows its last word.
            may_take = state == "header" and len(due) <= self.overlap
            ctx.set(header.ready, may_take and self.rng.random() < self.ready)
            ctx.set(words.ready, state == "words" and self.rng.random() < self.ready)
            answerable = due and (state == "header" or len(due) > 1)
            offer = bool(answerable) and (r_valid and not r_ready or due[0][1] == 0)
            if answerable and due[0][1]:
                due[0][1] -= 1
            ctx.set(result.valid, offer)
            if offer:
                answer = due[0][0]
                ctx.set(result.payload.used_len, answer.used_len)
                ctx.set(result.payload.write_count, answer.write_count)
                ctx.set(result.payload.write_data, int.from_bytes(answer.write_data, "little"))

    def on_used(self, chain, used_len):
        """Checks a used element and the bytes the device wrote against the result."""
        answer = self.results.popleft()
        assert answer.head == chain.head
        assert used_len == answer.used_len, f"used.len {used_len} != {answer.used_len}"
        count = min(answer.write_count, len(chain.sentinel))
        expected = answer.write_data[:count] + chain.sentinel[count:]
        assert self.driver.writable_bytes(chain) == expected, f"head {chain.head}: writable bytes"


class ParkingFunctionModel:
    """The function on a parking engine's command port (fromdevq, C6): it parks fresh
    commands (with chance ``park``, or exactly the heads in ``park_heads`` when that is
    set) by a result with random bytes and ``park`` set, which must write nothing; it
    completes the others, and every unparked one, with a random result; it asks for
    parked commands back with chance ``unpark`` a cycle. Fresh headers must come in ring
    order, unparked ones in park order with ``parked`` set, each with its chain's totals
    and words; used elements must come in the order of the completing results."""

    def __init__(self, dut, driver, rng, *, ready=0.7, park=0.5, unpark=0.05):
        self.dut = dut
        self.driver = driver
        self.rng = rng
        self.ready = ready
        self.park = park
        self.park_heads = None
        self.unpark = unpark
        self.parked = deque()       # Chains parked, oldest first
        self.asked = deque()        # Chains asked back, header not seen yet
        self.headers = []           # (head, parked) of every header taken
        self.results = deque()      # completing Results, not yet seen in the used ring
        self.commands = 0           # completing results taken
        self.used = []              # heads, in used-ring order

    def _result(self, chain, park):
        writable = sum(n for _, n in chain.writable)
        count = self.rng.randint(0, min(RESULT_BYTES, writable + 2))
        return Result(chain.head, self.rng.getrandbits(32), count,
                      bytes(self.rng.getrandbits(8) for _ in range(RESULT_BYTES))), park

    async def run(self, ctx):
        command = self.dut.command
        header, words, result, unpark = (command.header, command.words, command.result,
                                         command.unpark)
        state, chain, answer, beats, position, seen = "header", None, None, [], 0, 0
        async for sample in ctx.tick().sample(
                header.valid, header.ready, header.payload.head, header.payload.readable,
                header.payload.writable, header.payload.parked, words.valid, words.ready,
                words.payload.data, words.payload.count, words.payload.last, result.valid,
                result.ready, unpark.valid, unpark.ready):
            (_, _, h_valid, h_ready, head, readable, writable, parked, w_valid, w_ready,
             lanes, count, last, r_valid, r_ready, u_valid, u_ready) = sample
            if u_valid and u_ready:
                self.asked.append(self.parked.popleft())
            if r_valid and r_ready:
                if answer[1]:
                    self.parked.append(chain)
                else:
                    self.results.append(answer[0])
                    self.commands += 1
                state = "header"
            if state == "header" and h_valid and h_ready:
                self.headers.append((head, parked))
                if parked:
                    chain = self.asked.popleft()
                else:
                    chain = self.driver.published[seen]
                    seen += 1
                assert head == chain.head, f"header head {head}, expected {chain.head}"
                assert readable == len(chain.readable)
                assert writable == sum(n for _, n in chain.writable)
                if parked:
                    park = False
                elif self.park_heads is not None:
                    park = head in self.park_heads
                else:
                    park = self.rng.random() < self.park
                answer = self._result(chain, park)
                beats, position = command_beats(chain.readable), 0
                state = "words" if readable else "result"
            elif state == "words" and w_valid and w_ready:
                expected, expected_last = beats[position]
                got = [int(lanes[lane]) for lane in range(count)]
                assert got == expected and bool(last) == expected_last, \
                    f"head {chain.head} beat {position}"
                position += 1
                if last:
                    state = "result"
            ctx.set(header.ready, state == "header" and self.rng.random() < self.ready)
            ctx.set(words.ready, state == "words" and self.rng.random() < self.ready)
            offer = state == "result" and (r_valid and not r_ready or
                                           self.rng.random() < self.ready)
            ctx.set(result.valid, offer)
            if offer:
                ctx.set(result.payload.used_len, answer[0].used_len)
                ctx.set(result.payload.write_count, answer[0].write_count)
                ctx.set(result.payload.write_data,
                        int.from_bytes(answer[0].write_data, "little"))
                ctx.set(result.payload.park, int(answer[1]))
            # An offer stays until taken; each asks back one of those parked.
            ctx.set(unpark.valid, u_valid and not u_ready or
                    bool(self.parked) and self.rng.random() < self.unpark)

    def on_used(self, chain, used_len):
        """A used element comes in the order of the completing results; the writable bytes
        hold that result's, and nothing of a park result's."""
        self.used.append(chain.head)
        answer = self.results.popleft()
        assert answer.head == chain.head, f"used id {chain.head}, expected {answer.head}"
        assert used_len == answer.used_len, f"used.len {used_len} != {answer.used_len}"
        count = min(answer.write_count, len(chain.sentinel))
        expected = answer.write_data[:count] + chain.sentinel[count:]
        assert self.driver.writable_bytes(chain) == expected, f"head {chain.head}: writable bytes"


@dataclass
class Bench:
    """A VirtqueueEngine with its DMA memory, a driver, a function model and monitors.
    ``function_options["hold_cycles"]`` and the limits of :meth:`drain` and
    :meth:`wait_fault` count in :meth:`cycles`."""
    seed: int
    size: int = 16
    event_idx: bool = False
    indirect: bool = False
    start: int = 0
    max_queue_size: int = 64
    scatter: bool = True
    parking: bool = False
    dma_options: dict = field(default_factory=dict)
    function_options: dict = field(default_factory=dict)

    def __post_init__(self):
        print(f"seed {self.seed}")
        self.rng = random.Random(self.seed)
        self.dut = VirtqueueEngine(DeviceParams(max_queue_size=self.max_queue_size),
                                   parking=self.parking)
        self.memory = bytearray(MEMORY_SIZE)
        # One generator per process: the simulator runs them in any order.
        self.dma = DmaMemory(self.dut.dma, self.memory, random.Random(self.seed + 1),
                             **self.dma_options)
        self.stretch = -(-self.dma.read_latency[1] // CALIBRATED_LATENCY)
        self.driver = self.new_driver()
        function = ParkingFunctionModel if self.parking else FunctionModel
        options = dict(self.function_options)
        if "hold_cycles" in options:
            options["hold_cycles"] = self.cycles(options["hold_cycles"])
        self.function = function(self.dut, self.driver, random.Random(self.seed + 2),
                                 **options)
        self.interrupts = []        # cycles
        self.faults = []            # (cycle, kind)
        self.committed = 0          # commands reported committed (C7)
        self.cycle = 0

    def cycles(self, calibrated):
        """``calibrated`` cycles (for a memory answering within ``CALIBRATED_LATENCY``)
        on this bench's memory."""
        return calibrated * self.stretch

    def new_driver(self, base=0x1000):
        return Driver(self.memory, self.rng, self.size, event_idx=self.event_idx,
                      indirect=self.indirect, start=self.start, base=base,
                      scatter=self.scatter, in_order=not self.parking)

    async def monitor(self, ctx):
        dut = self.dut
        async for _, _, interrupt, fault, kind, committed in ctx.tick().sample(
                dut.interrupt, dut.fault, dut.fault_kind, dut.committed):
            self.cycle += 1
            self.committed += committed
            if interrupt:
                self.interrupts.append(self.cycle)
            if fault:
                self.faults.append((self.cycle, c.RingFault(kind)))

    async def configure(self, ctx, run=True):
        dut, driver = self.dut, self.driver
        ctx.set(dut.config.size, self.size)
        ctx.set(dut.config.enable, 1)
        ctx.set(dut.config.desc, driver.desc)
        ctx.set(dut.config.driver, driver.avail)
        ctx.set(dut.config.device, driver.used)
        ctx.set(dut.event_idx, self.event_idx)
        ctx.set(dut.indirect, self.indirect)
        ctx.set(dut.run, run)

    async def notify(self, ctx):
        ctx.set(self.dut.notify, 1)
        await ctx.tick()
        ctx.set(self.dut.notify, 0)

    async def kick(self, ctx):
        if self.driver.virtqueue_kick_prepare():
            await self.notify(ctx)

    def collect(self):
        while (used := self.driver.virtqueue_get_buf()) is not None:
            self.function.on_used(*used)

    async def drain(self, ctx, limit=20000, quiet=60):
        """Waits until every published buffer is used and the engine has had no DMA
        outstanding for ``quiet`` cycles (its last interrupt decision is in)."""
        still = 0
        for _ in range(self.cycles(limit)):
            self.collect()
            busy = ctx.get(self.dut.busy) or self.dma.outstanding
            still = 0 if self.driver.in_flight or busy else still + 1
            if still == quiet:
                return
            await ctx.tick()
        raise AssertionError(f"{len(self.driver.in_flight)} buffers still not used")

    async def wait_fault(self, ctx, limit=5000):
        for _ in range(self.cycles(limit)):
            if self.faults:
                return self.faults[0]
            await ctx.tick()
        raise AssertionError("no fault")

    def run(self, testbench):
        simulate(self.dut, testbench,
                 processes=[self.dma.serve, self.function.run, self.monitor])

    # --- checks on the DMA log ------------------------------------------------------------

    def check_dma_discipline(self):
        """C12: reads only of rings, tables and readable buffers; writes only of the used
        ring and writable buffers."""
        driver = self.driver
        for read in self.dma.reads:
            assert any(s <= read.address and read.address + read.length <= e
                       for s, e in driver.read_ranges), f"read outside: {read}"
        for write in self.dma.writes:
            assert any(s <= write.address and write.address + write.length <= e
                       for s, e in driver.write_ranges), f"write outside: {write}"

    def check_interrupts(self):
        """C11, virtio 1.2 2.7.10: each suppression read checks the publications of
        used->idx since the previous check, [old, new) (Linux's ``vhost_notify``), and
        comes after the last of them was written. Which publications a read covers is the
        device's choice (those handed to the hard IP before it, which the DMA log does not
        show): the interrupts raised after each read, before the next, must be what the
        rule says for some split of the publications into consecutive ranges, one per
        read, that ends with the last publication."""
        driver = self.driver
        publications = [w for w in self.dma.writes
                        if w.address == driver.used + c.VRING_USED_IDX and w.length == 2]
        indices = [self.start] + [struct.unpack("<H", w.data)[0] for w in publications]
        if self.event_idx:
            address = driver.avail + c.VRING_AVAIL_RING + 2 * driver.size
        else:
            address = driver.avail + c.VRING_AVAIL_FLAGS
        checks = [r for r in self.dma.reads if r.address == address and r.length == 2]
        ends = [read.cycle for read in checks[1:]] + [float("inf")]
        first = checks[0].cycle if checks else float("inf")
        assert all(cycle > first for cycle in self.interrupts), "an interrupt before any check"
        ends_of_ranges = {0}            # i: the last range may end at indices[i]
        for read, end in zip(checks, ends):
            raised = [cycle for cycle in self.interrupts if read.cycle < cycle < end]
            assert len(raised) <= 1, f"interrupts {raised} for the check at {read.cycle}"
            value, = struct.unpack("<H", read.data)
            handed = sum(w.done_cycle is not None and w.done_cycle < read.cycle
                         for w in publications)
            ends_of_ranges = {new for old in ends_of_ranges for new in range(old + 1, handed + 1)
                              if self.needed(value, indices[new], indices[old]) == bool(raised)}
            assert ends_of_ranges, \
                f"the check read at {read.cycle} (value {value:#x}, interrupt {raised}): " \
                f"no range of publications explains it"
        assert len(publications) in ends_of_ranges, "publications never checked"

    def needed(self, value, new, old):
        """Whether [old, new) needs an interrupt, ``value`` being what the check read."""
        if self.event_idx:
            return vring_need_event(value, new, old)
        return not value & c.VRING_AVAIL_F_NO_INTERRUPT


# --- random streams ---------------------------------------------------------------------

def random_command(rng, longest=80):
    """Readable bytes (a le64 code and payload, or any length) and a writable size."""
    readable = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 8, 16, rng.randint(1, longest)])))
    writable = rng.choice([0, 0, 8, 16, rng.randint(1, 40)])
    if not readable and not writable:
        writable = 1
    return readable, writable


async def stream_commands(bench, ctx, count, *, max_pieces=4, longest=80, suppression=True):
    """Queues ``count`` random commands in random bursts, kicking as a driver would, while
    collecting used buffers and moving the suppression fields about."""
    driver, rng = bench.driver, bench.rng
    queued = 0
    deadline = bench.cycle + bench.cycles(500) * count
    while queued < count:
        assert bench.cycle < deadline, f"stuck after {queued} commands"
        for _ in range(rng.randint(1, 4)):
            if queued == count:
                break
            readable, writable = random_command(rng, longest)
            if driver.virtqueue_add(readable, writable, max_pieces=max_pieces) is None:
                break
            queued += 1
        await bench.kick(ctx)
        await idle(ctx, rng.randint(0, 60))
        bench.collect()
        if suppression and rng.random() < 0.3:
            if bench.event_idx:
                driver.set_used_event(driver.last_used + rng.randint(0, 6))
            else:
                driver.set_avail_flags(rng.choice([0, c.VRING_AVAIL_F_NO_INTERRUPT]))
    await bench.drain(ctx)


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_random_streams(event_idx, indirect):
    """Random chains (readable and writable bytes split at any byte), random queue sizes,
    latencies, backpressure and result delays; used ring, written bytes and interrupts
    checked against the driver's model."""
    seed = new_seed()
    rng = random.Random(seed)
    bench = Bench(seed, size=rng.choice([1, 2, 4, 8, 16, 32]), event_idx=event_idx,
                  indirect=indirect,
                  dma_options={"read_latency": (1, rng.choice([4, 16, 40])),
                               "stall": rng.choice([0, 0.2, 0.4]),
                               "idle": rng.choice([0, 0.2, 0.4])},
                  function_options={"ready": rng.choice([0.5, 0.8, 1.0]),
                                    "overlap": rng.choice([0, 0, 1, 3])})

    async def testbench(ctx):
        await bench.configure(ctx)
        await stream_commands(bench, ctx, 40)
        assert bench.function.commands == 40
        bench.check_dma_discipline()
        bench.check_interrupts()
        assert not bench.faults

    bench.run(testbench)


@pytest.mark.parametrize("use_indirect", [False, True])
def test_every_byte_boundary(use_indirect):
    """C5: a 56-byte command (code word, then three beats of two words) cut into two
    buffers at every byte (an empty buffer at either end) and into three around a 9-byte
    one at every byte, direct or in an indirect table: the function gets the same words."""
    seed = new_seed()
    bench = Bench(seed, size=16, indirect=use_indirect)
    layouts = [[cut, 56 - cut] for cut in range(57)]
    layouts += [[cut, 9, 47 - cut] for cut in range(48)]

    async def testbench(ctx):
        await bench.configure(ctx)
        # Four at a time: at most four descriptors each, in a ring of 16.
        for first in range(0, len(layouts), 4):
            for lengths in layouts[first:first + 4]:
                readable = bytes(bench.rng.getrandbits(8) for _ in range(56))
                assert bench.driver.virtqueue_add(
                    readable, bench.rng.choice([0, 8]), readable_lengths=lengths,
                    max_pieces=1, use_indirect=use_indirect, direct=0 if use_indirect else None)
            await bench.kick(ctx)
            await bench.drain(ctx)
        assert bench.function.commands == len(layouts) and not bench.faults

    bench.run(testbench)


@pytest.mark.parametrize("event_idx", [False, True])
def test_index_wrap(event_idx):
    """Ring indices counting through 65535 -> 0 (avail, used, ring position, used_event)."""
    seed = new_seed()
    rng = random.Random(seed)
    bench = Bench(seed, size=rng.choice([4, 8]), event_idx=event_idx, indirect=True,
                  start=0x10000 - rng.randint(1, 12), function_options={"overlap": 2})

    async def testbench(ctx):
        ctx.set(bench.dut.avail_fetcher.last_avail, bench.start)
        ctx.set(bench.dut.used_writer.used_idx, bench.start)
        await bench.configure(ctx)
        await stream_commands(bench, ctx, 40)
        assert bench.driver.last_used == (bench.start + 40) & 0xFFFF
        bench.check_interrupts()
        assert not bench.faults

    bench.run(testbench)


def test_spurious_and_early_notifications():
    """Doorbells with nothing new, and buffers queued before the queue runs: nothing is
    read while ``run`` is low (C12), everything once it rises, and no extra buffers."""
    bench = Bench(new_seed(), size=8)

    async def testbench(ctx):
        await bench.configure(ctx, run=False)
        for _ in range(3):
            assert bench.driver.virtqueue_add(*random_command(bench.rng), max_pieces=1)
        for _ in range(5):
            await bench.notify(ctx)
            await ctx.tick().repeat(30)
        assert not bench.dma.reads and not bench.dma.writes
        ctx.set(bench.dut.run, 1)
        await bench.drain(ctx)
        for _ in range(5):
            await bench.notify(ctx)
            await idle(ctx, bench.rng.randint(0, 30))
        await bench.drain(ctx)
        assert bench.function.commands == 3
        bench.check_dma_discipline()

    bench.run(testbench)


#: The engine's data buffer: 512 beats.
DATA_BUFFER_BYTES = 512 * DMA_READ_BEAT_BYTES
#: Readable bytes of a 64-buffer chain that fill the data buffer and the readable queue
#: (32 segments) before the chain's walk ends: it is walked twice.
SECOND_WALK_BYTES = 64 * 400


async def wait_second_walk(bench, ctx):
    for _ in range(20000):
        if ctx.get(bench.dut.chain_walker.header_sent):
            return
        await ctx.tick()
    raise AssertionError("no second walk")


@pytest.mark.parametrize("use_indirect", [False, True])
def test_chain_longer_than_readable_queue(use_indirect):
    """A chain of more buffers than the readable queue holds, with more bytes than the
    data buffer: the walker finishes counting, the header goes out, and a second walk
    describes the rest while the function takes the words."""
    bench = Bench(new_seed(), size=64, max_queue_size=64, indirect=use_indirect)

    async def testbench(ctx):
        await bench.configure(ctx)
        readable = bytes(bench.rng.getrandbits(8) for _ in range(SECOND_WALK_BYTES))
        assert bench.driver.virtqueue_add(readable, 8, readable_pieces=64,
                                          use_indirect=use_indirect,
                                          direct=0 if use_indirect else None)
        await bench.kick(ctx)
        await wait_second_walk(bench, ctx)
        await bench.drain(ctx)
        assert bench.function.commands == 1 and not bench.faults

    bench.run(testbench)


def test_chain_longer_than_readable_queue_seed_474688817(monkeypatch):
    """The layout seed 474688817 draws for the direct case, which hung the engine: the
    chain's last readable buffer took the readable queue's last place (writable buffers
    follow)."""
    monkeypatch.setenv("SEED", "474688817")
    test_chain_longer_than_readable_queue(False)


def add_laid_out(bench, readable_lengths, writable_lengths, **options):
    """Queues one chain of exactly these buffers (readable first) with random bytes."""
    readable = bytes(bench.rng.getrandbits(8) for _ in range(sum(readable_lengths)))
    return bench.driver.virtqueue_add(readable, sum(writable_lengths),
                                      lengths=(readable_lengths, writable_lengths), **options)


def filling_lengths(readable_count):
    """Readable lengths whose first buffer is more than the data buffer holds (8 KiB), so
    that the readable queue keeps every later one until the function takes words."""
    return [2 * DATA_BUFFER_BYTES] + [8] * (readable_count - 1)


@pytest.mark.parametrize("use_indirect", [False, True])
@pytest.mark.parametrize("tail", ["end", "writable"])
@pytest.mark.parametrize("past_queue", [0, 1, 2])
def test_last_readable_buffer_at_full_readable_queue(past_queue, tail, use_indirect):
    """The chain's last readable buffer meets a readable queue with room (0), taking its
    last place (1: the walk ends with it held and the queue full, which hung the engine:
    its header waited for that buffer, the queue for the function, the function for the
    header), or full (2: the walk counts on), the chain ending there or with writable
    buffers after it."""
    depth = min(READABLE_QUEUE_DEPTH, 64)
    bench = Bench(new_seed(), size=64, max_queue_size=64, indirect=use_indirect)

    async def testbench(ctx):
        await bench.configure(ctx)
        writable_lengths = [1, 1, 6] if tail == "writable" else []
        assert add_laid_out(bench, filling_lengths(1 + depth + past_queue), writable_lengths,
                            use_indirect=use_indirect, direct=0 if use_indirect else None)
        await bench.kick(ctx)
        await bench.drain(ctx)
        assert bench.function.commands == 1 and not bench.faults

    bench.run(testbench)


@pytest.mark.parametrize("layout", ["queue-size", "behind-held", "wrapping"])
def test_long_chain_within_queue_size(layout):
    """C7: a direct chain of up to the queue size is no loop, however many of its buffers
    wait past the readable queue: exactly the queue size (the ring full); the rest of the
    ring walked while a one-buffer chain before it executes (its result held); 48 of 64
    consecutive descriptors wrapping past the table's end, the ring indices past 65535."""
    size = 64
    bench = Bench(new_seed(), size=size, max_queue_size=size, scatter=False,
                  start=0xFFFF if layout == "wrapping" else 0,
                  function_options={"hold_cycles": 500})

    async def testbench(ctx):
        driver = bench.driver
        ctx.set(bench.dut.avail_fetcher.last_avail, bench.start)
        ctx.set(bench.dut.used_writer.used_idx, bench.start)
        await bench.configure(ctx)
        count = size
        if layout == "behind-held":
            bench.function.hold = {driver.virtqueue_add(b"\x01" * 8, 0, max_pieces=1).head}
            count = size - 1
        elif layout == "wrapping":
            driver.free = list(reversed([*range(size - 10, size), *range(size - 10)]))
            count = size - 16
        chain = add_laid_out(bench, filling_lengths(count - 2), [8, 8], use_indirect=False)
        assert len(chain.descriptors) == count
        await bench.kick(ctx)
        await bench.drain(ctx)
        assert bench.function.commands == (2 if layout == "behind-held" else 1)
        assert not bench.faults
        bench.check_dma_discipline()

    bench.run(testbench)


@pytest.mark.parametrize("readable_queue", ["filled", "not-filled"])
def test_chain_past_queue_size_faults(readable_queue):
    """C7: a direct chain walked past the queue size must revisit a descriptor (a loop):
    the rest of the ring, behind a one-buffer chain, leading back to its first descriptor
    faults at its queue size + 1st descriptor, also when its buffers filled the readable
    queue (the walk was counting, its header not out). It is walked while the chain
    before it executes; the fault waits for that one to be completed."""
    size = 64
    bench = Bench(new_seed(), size=size, max_queue_size=size,
                  function_options={"hold_cycles": 500})

    async def testbench(ctx):
        driver = bench.driver
        bench.function.hold = {driver.virtqueue_add(b"\x01" * 8, 0, max_pieces=1).head}
        lengths = filling_lengths(size - 1) if readable_queue == "filled" else [8] * (size - 1)
        chain = add_laid_out(bench, lengths, [], use_indirect=False)
        first, last = chain.descriptors[0], chain.descriptors[-1]
        address, length, _, _ = struct.unpack_from("<QIHH", bench.memory, driver.desc + 16 * last)
        driver.write_desc(driver.desc, last, address, length, c.VRING_DESC_F_NEXT, first)
        await bench.configure(ctx)
        cycle, fault = await bench.wait_fault(ctx)
        assert fault == c.RingFault.CHAIN_LOOP
        await check_stopped(bench, ctx, cycle)
        check_completed_before(bench, 1, cycle, faulting=1)

    bench.run(testbench)


def test_head_fault_after_second_walk():
    """A head outside the queue behind a chain that was walked twice waits, like any fault
    found ahead, for that chain to be completed: the second walk ends with its chain."""
    bench = Bench(new_seed(), size=64, max_queue_size=64, function_options={"hold_cycles": 300})

    async def testbench(ctx):
        driver = bench.driver
        chain = add_laid_out(bench, filling_lengths(48), [8], use_indirect=False)
        bench.function.hold = {chain.head}
        driver.publish(Chain(driver.size + 1, b"", [], b"", []))
        await bench.configure(ctx)
        cycle, fault = await bench.wait_fault(ctx)
        assert fault == c.RingFault.DESC_INDEX
        await check_stopped(bench, ctx, cycle)
        check_completed_before(bench, 1, cycle, faulting=1)

    bench.run(testbench)


def test_indirect_table_longer_than_queue():
    """An indirect table may hold more descriptors than the queue size (as Linux and
    ``virtio_ring`` do): only more than its own entries is a loop."""
    bench = Bench(new_seed(), size=2, indirect=True)

    async def testbench(ctx):
        await bench.configure(ctx)
        for _ in range(3):
            readable = bytes(bench.rng.getrandbits(8) for _ in range(64))
            assert bench.driver.virtqueue_add(readable, 16, readable_pieces=5,
                                              use_indirect=True, direct=0)
            await bench.kick(ctx)
            await bench.drain(ctx)
        assert bench.function.commands == 3 and not bench.faults

    bench.run(testbench)


def test_chain_changed_under_second_walk():
    """A driver that breaks a chain while its second walk is held back: the fault stops
    the queue at once (the header is out, the command can never complete)."""
    bench = Bench(new_seed(), size=64, max_queue_size=64,
                  function_options={"ready": 0.05})

    async def testbench(ctx):
        await bench.configure(ctx)
        readable = bytes(bench.rng.getrandbits(8) for _ in range(SECOND_WALK_BYTES))
        chain = bench.driver.virtqueue_add(readable, 0, readable_pieces=64, direct=None,
                                           use_indirect=False)
        await bench.kick(ctx)
        await wait_second_walk(bench, ctx)
        last = chain.descriptors[-1]
        bench.driver.write_desc(bench.driver.desc, last, 0, 8, c.VRING_DESC_F_NEXT, 999)
        cycle, fault = await bench.wait_fault(ctx, limit=20000)
        assert fault == c.RingFault.DESC_INDEX
        await check_stopped(bench, ctx, cycle)

    bench.run(testbench)


def test_full_ring():
    """``size`` buffers available at once is a full ring, not an AVAIL_AHEAD fault."""
    bench = Bench(new_seed(), size=8)

    async def testbench(ctx):
        await bench.configure(ctx, run=False)
        for _ in range(bench.size):
            assert bench.driver.virtqueue_add(bytes(8), 0, max_pieces=1)
        ctx.set(bench.dut.run, 1)
        await bench.drain(ctx)
        assert bench.function.commands == bench.size and not bench.faults

    bench.run(testbench)


def test_indirect_flag_without_feature():
    """Without VIRTIO_F_INDIRECT_DESC the INDIRECT flag means nothing: the descriptor is a
    plain readable buffer (here: the table's bytes)."""
    bench = Bench(new_seed(), size=8, indirect=False)

    async def testbench(ctx):
        driver = bench.driver
        table = driver.alloc(32, 16, driver.read_ranges)
        driver.write_desc(table, 0, driver.alloc(8, 1, driver.read_ranges), 8, 0)
        head = driver.free.pop()
        driver.write_desc(driver.desc, head, table, 16, c.VRING_DESC_F_INDIRECT)
        driver.publish(Chain(head, bytes(bench.memory[table:table + 16]), [], b"", [head]))
        await bench.configure(ctx)
        await bench.drain(ctx)
        assert bench.function.commands == 1 and not bench.faults

    bench.run(testbench)


def test_no_interrupt_flag():
    """Without EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT suppresses every notification."""
    bench = Bench(new_seed(), size=8)

    async def testbench(ctx):
        bench.driver.set_avail_flags(c.VRING_AVAIL_F_NO_INTERRUPT)
        await bench.configure(ctx)
        await stream_commands(bench, ctx, 12, suppression=False)
        assert bench.interrupts == []
        bench.driver.set_avail_flags(0)
        bench.driver.virtqueue_add(*random_command(bench.rng))
        await bench.kick(ctx)
        await bench.drain(ctx)
        assert len(bench.interrupts) >= 1
        bench.check_interrupts()

    bench.run(testbench)


def test_used_event_passed_once():
    """With EVENT_IDX, one notification when used->idx passes used_event, whatever the
    batching; none for a used_event that is not reached; avail_event lets the driver skip
    doorbells."""
    bench = Bench(new_seed(), size=16, event_idx=True)

    async def testbench(ctx):
        driver = bench.driver
        driver.set_used_event(5)
        await bench.configure(ctx)
        await stream_commands(bench, ctx, 12, suppression=False)
        assert len(bench.interrupts) == 1
        driver.set_used_event(100)
        await stream_commands(bench, ctx, 12, suppression=False)
        assert len(bench.interrupts) == 1
        avail_event, = struct.unpack_from("<H", bench.memory, driver.used + 4 + 8 * driver.size)
        assert avail_event == driver.avail_idx
        bench.check_interrupts()

    bench.run(testbench)


def test_long_held_result():
    """A result the function holds for a long time stops only this queue's completions
    (an engine without parking completes in order); nothing is read or written meanwhile
    beyond prefetching, and the rest completes after it."""
    seed = new_seed()
    bench = Bench(seed, size=8, function_options={"hold_cycles": 3000})

    async def testbench(ctx):
        await bench.configure(ctx)
        first = bench.driver.virtqueue_add(b"", 16, max_pieces=1)
        bench.function.hold = {first.head}
        for _ in range(3):
            assert bench.driver.virtqueue_add(*random_command(bench.rng), max_pieces=1)
        await bench.kick(ctx)
        await ctx.tick().repeat(bench.cycles(500))
        commands = len(bench.dma.reads) + len(bench.dma.writes)
        await ctx.tick().repeat(bench.cycles(1000))
        assert len(bench.dma.reads) + len(bench.dma.writes) == commands
        assert bench.driver.virtqueue_get_buf() is None
        await bench.drain(ctx)
        assert bench.function.commands == 4

    bench.run(testbench)


# --- C7 faults ---------------------------------------------------------------------------

def build_fault(bench, kind):
    """Queue one good buffer, whose result the function holds a while, then one with ring
    fault ``kind``."""
    driver = bench.driver
    bench.function.hold = {driver.virtqueue_add(b"\x01" * 8, 0, max_pieces=1).head}
    free = driver.free
    if kind == "head":
        driver.publish(Chain(driver.size + driver.rng.randrange(4), b"", [], b"", []))
        return c.RingFault.DESC_INDEX
    if kind == "next":
        a, b = free.pop(), free.pop()
        driver.write_desc(driver.desc, a, driver.alloc(8), 8, c.VRING_DESC_F_NEXT, b)
        driver.write_desc(driver.desc, b, driver.alloc(8), 8, c.VRING_DESC_F_NEXT,
                          driver.size + 3)
        driver.publish(Chain(a, b"", [], b"", []))
        return c.RingFault.DESC_INDEX
    if kind == "loop":
        a, b = free.pop(), free.pop()
        driver.write_desc(driver.desc, a, driver.alloc(8), 8, c.VRING_DESC_F_NEXT, b)
        driver.write_desc(driver.desc, b, driver.alloc(8), 8, c.VRING_DESC_F_NEXT, a)
        driver.publish(Chain(a, b"", [], b"", []))
        return c.RingFault.CHAIN_LOOP
    # Indirect tables of two entries.
    table = driver.alloc(32, 16, driver.read_ranges)
    length, entry_flags, entry_next = 32, c.VRING_DESC_F_NEXT, 1
    kinds = {
        "indirect-next": c.RingFault.DESC_INDEX,
        "indirect-loop": c.RingFault.CHAIN_LOOP,
        "nested": c.RingFault.NESTED_INDIRECT,
        "length-0": c.RingFault.INDIRECT_LENGTH,
        "length-24": c.RingFault.INDIRECT_LENGTH,
    }
    second_flags, second_next = 0, 0
    if kind == "indirect-next":
        entry_next = 2
    elif kind == "indirect-loop":
        second_flags, second_next = c.VRING_DESC_F_NEXT, 0
    elif kind == "nested":
        second_flags = c.VRING_DESC_F_INDIRECT
    else:
        length = int(kind.split("-")[1])
    driver.write_desc(table, 0, driver.alloc(8), 8, entry_flags, entry_next)
    driver.write_desc(table, 1, driver.alloc(8), 16, second_flags, second_next)
    head = free.pop()
    driver.write_desc(driver.desc, head, table, length, c.VRING_DESC_F_INDIRECT)
    driver.publish(Chain(head, b"", [], b"", []))
    return kinds[kind]


async def check_stopped(bench, ctx, fault_cycle):
    """After a fault: no DMA command from the fault's cycle on, busy falls once the reads
    are drained, and the queue stays quiet."""
    for _ in range(bench.cycles(2000)):
        if not ctx.get(bench.dut.busy):
            break
        await ctx.tick()
    assert not ctx.get(bench.dut.busy)
    assert not bench.dma.outstanding
    await bench.notify(ctx)
    await ctx.tick().repeat(100)
    commands = bench.dma.reads + bench.dma.writes
    assert all(command.cycle < fault_cycle for command in commands), \
        [cmd for cmd in commands if cmd.cycle >= fault_cycle]
    assert len(bench.faults) == 1


def check_completed_before(bench, count, fault_cycle, faulting=0):
    """The ``count`` buffers queued before a fault were used, published and notified
    before it (C7: nothing taken before the fault is lost); the ``faulting`` ones not."""
    bench.collect()
    assert bench.function.commands == count and len(bench.driver.in_flight) == faulting
    assert all(write.done_cycle < fault_cycle for write in bench.dma.writes)
    bench.check_interrupts()


@pytest.mark.parametrize("kind", ["head", "next", "loop", "indirect-next", "indirect-loop",
                                  "nested", "length-0", "length-24"])
def test_ring_fault(kind):
    """The faulting chain is walked while the function still works on the one before;
    the fault waits for that one to be completed."""
    bench = Bench(new_seed(), size=8, indirect=True, function_options={"hold_cycles": 300})

    async def testbench(ctx):
        expected = build_fault(bench, kind)
        await bench.configure(ctx)
        cycle, fault = await bench.wait_fault(ctx)
        assert fault == expected
        assert cycle > bench.cycles(300)
        await check_stopped(bench, ctx, cycle)
        check_completed_before(bench, 1, cycle, faulting=1)

    bench.run(testbench)


@pytest.mark.parametrize("parking", [False, True])
def test_avail_ahead_fault(parking):
    """A runaway avail index read while the buffers before it are still being walked
    (chains of scattered descriptors, slow reads): they complete, then the fault (also
    on a parking engine, whose heads pass through ParkedHeads)."""
    options = {"ready": 1.0, "park": 0.0} if parking else {"ready": 1.0, "delay": (0, 0)}
    bench = Bench(new_seed(), size=32, parking=parking,
                  dma_options={"read_latency": (40, 60)}, function_options=options)

    async def testbench(ctx):
        await bench.configure(ctx)
        await stream_commands(bench, ctx, 3)
        driver = bench.driver
        for _ in range(6):
            assert driver.virtqueue_add(bytes(8), 0, readable_pieces=4)
        await bench.kick(ctx)
        await ctx.tick().repeat(150)
        struct.pack_into("<H", bench.memory, driver.avail + 2,
                         driver.avail_idx + bench.size + 1)
        await bench.notify(ctx)
        cycle, fault = await bench.wait_fault(ctx)
        assert fault == c.RingFault.AVAIL_AHEAD
        await check_stopped(bench, ctx, cycle)
        check_completed_before(bench, 9, cycle)

    bench.run(testbench)


@pytest.mark.parametrize("faulting", [0, 3])
def test_data_read_error_completes_the_commands_before(faulting):
    """C7: a failed read of command ``faulting``'s data: the commands before it are used,
    published, notified and reported committed before the fault; the function gets the
    error beat for that command and never completes it; nothing after it is taken."""
    bench = Bench(new_seed(), size=32, dma_options={"read_latency": (5, 60)})

    async def testbench(ctx):
        driver = bench.driver
        chains, pieces = [], []
        for _ in range(6):
            before = len(driver.read_ranges)
            chains.append(driver.virtqueue_add(bytes(range(40)), 8, max_pieces=2))
            pieces.append([r for r in driver.read_ranges[before:] if r[1] > r[0]])
        end = pieces[faulting][-1][1]
        bench.dma.fail_reads.append((end - 1, end))
        await bench.configure(ctx)
        await bench.kick(ctx)
        cycle, fault = await bench.wait_fault(ctx)
        assert fault == c.RingFault.DMA_READ
        await check_stopped(bench, ctx, cycle)
        check_completed_before(bench, faulting, cycle, faulting=6 - faulting)
        assert bench.committed == faulting
        assert bench.function.faulted is chains[faulting]

    bench.run(testbench)


def test_ring_read_error_after_some_entries():
    """A ring read that fails after returning a beat of entries: those buffers complete,
    then the fault (as if entries were read one at a time)."""
    bench = Bench(new_seed(), size=16, dma_options={"partial_reads": "all"})
    per_beat = DMA_READ_BEAT_BYTES // 2
    published = per_beat + 4

    async def testbench(ctx):
        driver = bench.driver
        for _ in range(published):
            assert driver.virtqueue_add(bytes(8), 0, max_pieces=1)
        entry = driver.avail + 4 + 2 * (per_beat + 2)
        bench.dma.fail_reads.append((entry, entry + 2))
        await bench.configure(ctx)
        cycle, fault = await bench.wait_fault(ctx)
        assert fault == c.RingFault.DMA_READ
        await check_stopped(bench, ctx, cycle)
        # The entries in the failed read's whole beats before the failing one (the
        # index read carries the entries of its cache line).
        failed, = [read for read in bench.dma.reads if read.failed]
        returned = failed.address + (entry - failed.address) // DMA_READ_BEAT_BYTES * \
            DMA_READ_BEAT_BYTES
        completed = (returned - (driver.avail + 4)) // 2
        assert completed > 0
        check_completed_before(bench, completed, cycle, faulting=published - completed)

    bench.run(testbench)


def test_longest_chains_are_no_loop():
    """Chains of exactly the queue size, direct and in an indirect table, are fine."""
    bench = Bench(new_seed(), size=8, indirect=True)

    async def testbench(ctx):
        await bench.configure(ctx)
        driver = bench.driver
        readable = bytes(range(40))
        pieces = [(driver.alloc(5, 1, driver.read_ranges), 5) for _ in range(8)]
        for (address, length), offset in zip(pieces, range(0, 40, 5)):
            bench.memory[address:address + length] = readable[offset:offset + length]
        table = driver.alloc(128, 16, driver.read_ranges)
        for entry, (address, length) in enumerate(pieces):
            driver.write_desc(table, entry, address, length,
                              c.VRING_DESC_F_NEXT if entry < 7 else 0, entry + 1)
        head = driver.free.pop()
        driver.write_desc(driver.desc, head, table, 128, c.VRING_DESC_F_INDIRECT)
        driver.publish(Chain(head, readable, [], b"", [head]))
        await bench.kick(ctx)
        await bench.drain(ctx)
        # A direct chain using every descriptor.
        indices = list(driver.free)
        assert len(indices) == 8
        driver.free.clear()
        for position, index in enumerate(indices):
            address, length = pieces[position]
            driver.write_desc(driver.desc, index, address, length,
                              c.VRING_DESC_F_NEXT if position < 7 else 0,
                              indices[(position + 1) % 8])
        driver.publish(Chain(indices[0], readable, [], b"", indices))
        await bench.kick(ctx)
        await bench.drain(ctx)
        assert not bench.faults

    bench.run(testbench)


@pytest.mark.parametrize("target", ["avail", "descriptor", "data", "suppression"])
def test_dma_read_error(target):
    bench = Bench(new_seed(), size=8)

    async def testbench(ctx):
        driver = bench.driver
        chain = driver.virtqueue_add(bytes(range(64)), 8, max_pieces=2)
        last_buffer = [r for r in driver.read_ranges[2:] if r[1] > r[0]][-1]
        ranges = {
            "avail": (driver.avail + 2, driver.avail + 4),
            "descriptor": (driver.desc + 16 * chain.head, driver.desc + 16 * chain.head + 16),
            "data": (last_buffer[1] - 1, last_buffer[1]),
            "suppression": (driver.avail, driver.avail + 2),
        }
        bench.dma.fail_reads.append(ranges[target])
        await bench.configure(ctx)
        await bench.kick(ctx)
        cycle, fault = await bench.wait_fault(ctx)
        assert fault == c.RingFault.DMA_READ
        await check_stopped(bench, ctx, cycle)

    bench.run(testbench)


@pytest.mark.parametrize("target", ["buffer", "used"])
def test_dma_write_error(target):
    bench = Bench(new_seed(), size=8, function_options={"write_counts": (1, 16)})

    async def testbench(ctx):
        driver = bench.driver
        chain = driver.virtqueue_add(b"", 16, max_pieces=1)
        if target == "buffer":
            bench.dma.fail_writes.append((chain.writable[0][0], chain.writable[0][0] + 1))
        else:
            bench.dma.fail_writes.append((driver.used, driver.used + 6 + 8 * driver.size))
        await bench.configure(ctx)
        await bench.kick(ctx)
        cycle, fault = await bench.wait_fault(ctx)
        assert fault == c.RingFault.DMA_WRITE
        await check_stopped(bench, ctx, cycle)

    bench.run(testbench)


# --- C9 reset ------------------------------------------------------------------------------

def test_reset_while_busy():
    """A reset in the middle of a stream: outstanding reads are drained before ``busy``
    falls, nothing else is issued, and the queue then works from index 0 again."""
    seed = new_seed()
    bench = Bench(seed, size=16, indirect=True, dma_options={"read_latency": (10, 40)})

    async def testbench(ctx):
        await bench.configure(ctx)
        driver = bench.driver
        for _ in range(12):
            driver.virtqueue_add(*random_command(bench.rng, longest=300))
        await bench.kick(ctx)
        await idle(ctx, bench.rng.randint(20, 300))
        # The device: reset_request, then run low while the reset completes (C9).
        ctx.set(bench.dut.run, 0)
        ctx.set(bench.dut.reset, 1)
        await ctx.tick()
        ctx.set(bench.dut.reset, 0)
        reset_cycle = bench.dma.cycle
        for _ in range(3000):
            if not ctx.get(bench.dut.busy):
                break
            await ctx.tick()
        assert not ctx.get(bench.dut.busy)
        assert not bench.dma.outstanding, "busy fell with DMA outstanding"
        await ctx.tick().repeat(200)
        late = [r for r in bench.dma.reads if r.cycle > reset_cycle]
        assert not late, late
        assert all(w.cycle <= reset_cycle for w in bench.dma.writes)

        # A fresh ring elsewhere; indices start at 0 again.
        bench.driver = bench.function.driver = bench.new_driver(base=0x80000)
        bench.function.results.clear()
        bench.dma.reads.clear()
        bench.dma.writes.clear()
        bench.interrupts.clear()
        await bench.configure(ctx)
        await stream_commands(bench, ctx, 20)
        bench.check_dma_discipline()
        bench.check_interrupts()
        assert not bench.faults

    bench.run(testbench)


def test_reset_withdraws_unsent_write():
    """A write the DMA engine has not taken any of when the reset comes is dropped: busy
    falls and nothing is written after the reset."""
    bench = Bench(new_seed(), size=8, function_options={"write_counts": (1, 16)})

    async def testbench(ctx):
        bench.dma.hold_writes = True
        assert bench.driver.virtqueue_add(bytes(8), 8, max_pieces=1)
        await bench.configure(ctx)
        for _ in range(2000):
            if bench.function.commands and ctx.get(bench.dut.busy):
                break
            await ctx.tick()
        await ctx.tick().repeat(20)
        assert ctx.get(bench.dut.busy) and not bench.dma.writes
        ctx.set(bench.dut.run, 0)
        ctx.set(bench.dut.reset, 1)
        await ctx.tick()
        ctx.set(bench.dut.reset, 0)
        await ctx.tick().repeat(3)
        assert not ctx.get(bench.dut.busy)
        bench.dma.hold_writes = False
        await ctx.tick().repeat(100)
        assert not bench.dma.writes

    bench.run(testbench)


def test_reset_after_fault():
    """A reset clears a fault: the queue works again on a fresh ring."""
    bench = Bench(new_seed(), size=8, indirect=True)

    async def testbench(ctx):
        build_fault(bench, "nested")
        await bench.configure(ctx)
        cycle, _ = await bench.wait_fault(ctx)
        await check_stopped(bench, ctx, cycle)
        ctx.set(bench.dut.run, 0)
        ctx.set(bench.dut.reset, 1)
        await ctx.tick()
        ctx.set(bench.dut.reset, 0)
        assert ctx.get(bench.dut.fault_kind) == c.RingFault.NONE
        bench.driver = bench.function.driver = bench.new_driver(base=0x80000)
        bench.function.results.clear()
        await bench.configure(ctx)
        await stream_commands(bench, ctx, 10)
        assert len(bench.faults) == 1

    bench.run(testbench)


# --- throughput -----------------------------------------------------------------------------

LAYOUTS = {
    "one-buffer": {"max_pieces": 1},
    "indirect-4": {"max_pieces": 4, "use_indirect": True, "direct": 0},
    "direct-4": {"max_pieces": 4, "use_indirect": False},
}


def measure_throughput(layout, latency=24, scatter=False):
    """8 queued 4 KiB commands (readable bytes split at random) with 8 writable bytes,
    memory with a fixed latency, 16 bytes a clock and no stalls, a function always ready:
    command words per clock from the first word to the last (two at most; the code word
    has a beat of its own), and the gaps in cycles between one command's last beat of
    words and the next's first."""
    bench = Bench(new_seed(), size=64, indirect=True, scatter=scatter,
                  dma_options={"read_latency": (latency, latency), "done_latency": (2, 2),
                               "stall": 0, "idle": 0},
                  function_options={"ready": 1.0, "delay": (0, 0)})
    figures = {}

    async def testbench(ctx):
        await bench.configure(ctx)
        for _ in range(8):
            readable = bytes(bench.rng.getrandbits(8) for _ in range(4096))
            assert bench.driver.virtqueue_add(readable, 8, **LAYOUTS[layout])
        await bench.kick(ctx)
        await bench.drain(ctx)
        spans = bench.function.word_cycles
        assert len(spans) == 8 and bench.function.commands == 8
        figures["words_per_clock"] = round(8 * 512 / (spans[-1][1] - spans[0][0] + 1), 3)
        figures["gaps"] = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
        figures["first_word"] = spans[0][0]

    bench.run(testbench)
    print(layout, "scattered" if scatter else "in order", figures)
    return figures


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_throughput(layout):
    """Command words per clock, printed: about two, commands back to back (a gap of 3
    cycles is the function model's own result and header handshakes; tiny buffers at a
    command's start can add a few cycles, each being a read of its own)."""
    measure_throughput(layout)


def test_throughput_scattered():
    """Chains whose descriptors are scattered over the table and indirect tables chained
    out of order cost a round trip per descriptor; printed as above."""
    measure_throughput("direct-4", scatter=True)


# --- parking (fromdevq, C6) ---------------------------------------------------------------

@pytest.mark.parametrize("indirect", [False, True])
def test_parking_random_streams(indirect):
    """A parking engine: random chains parked at random and asked back at random, the
    others completed at once. Every buffer is used once, with its completing result, in
    the order those were given (not ring order); a parked chain is walked again when asked
    back, and its writable bytes hold nothing of its park result."""
    seed = new_seed()
    rng = random.Random(seed)
    bench = Bench(seed, size=rng.choice([2, 4, 8, 16]), event_idx=rng.random() < 0.5,
                  indirect=indirect, parking=True,
                  dma_options={"read_latency": (1, rng.choice([4, 16, 40])),
                               "stall": rng.choice([0, 0.2, 0.4]),
                               "idle": rng.choice([0, 0.2, 0.4])},
                  function_options={"ready": rng.choice([0.5, 0.8, 1.0]),
                                    "park": rng.choice([0.3, 0.7, 1.0]),
                                    "unpark": rng.choice([0.01, 0.1, 0.5])})

    async def testbench(ctx):
        await bench.configure(ctx)
        await stream_commands(bench, ctx, 40)
        function = bench.function
        assert function.commands == 40
        assert any(parked for _, parked in function.headers)
        assert len(function.headers) == 40 + sum(parked for _, parked in function.headers)
        bench.check_dma_discipline()
        bench.check_interrupts()
        assert not bench.faults

    bench.run(testbench)


def test_a_parked_command_holds_up_nothing():
    """The first three chains parked: the three behind them are used while they wait;
    asked back, they are walked again and used in the order they were parked."""
    bench = Bench(new_seed(), size=16, parking=True, function_options={"unpark": 0})
    function = bench.function

    async def testbench(ctx):
        chains = [bench.driver.virtqueue_add(*random_command(bench.rng), max_pieces=1)
                  for _ in range(6)]
        heads = [chain.head for chain in chains]
        function.park_heads = set(heads[:3])
        await bench.configure(ctx)
        await wait_until(ctx, lambda: len(function.parked) == 3 and function.commands == 3,
                         "three parked, three completed")
        await ctx.tick().repeat(300)
        bench.collect()
        assert function.used == heads[3:] and len(bench.driver.in_flight) == 3
        function.unpark = 1
        await bench.drain(ctx)
        assert function.used == heads[3:] + heads[:3]
        assert function.headers == [(head, 0) for head in heads] + \
            [(head, 1) for head in heads[:3]]
        bench.check_dma_discipline()
        assert not bench.faults

    bench.run(testbench)


@pytest.mark.parametrize("fault", ["broken-chain", "read-error"])
def test_a_fault_on_the_second_walk_stops_the_queue(fault):
    """C7 on the walk of an unparked chain: the driver broke it while it was parked (its
    descriptor now leads past the queue), or its descriptor read fails. The queue stops
    once the commands before are completed; the parked one is never used."""
    bench = Bench(new_seed(), size=8, parking=True, function_options={"unpark": 0})
    function, driver = bench.function, bench.driver

    async def testbench(ctx):
        parked = driver.virtqueue_add(b"", 16, max_pieces=1)
        function.park_heads = {parked.head}
        assert driver.virtqueue_add(*random_command(bench.rng), max_pieces=2)
        await bench.configure(ctx)
        await wait_until(ctx, lambda: len(function.parked) == 1 and function.commands == 1,
                         "one parked, one completed")
        [(address, length)] = parked.writable
        descriptor = driver.desc + 16 * parked.head
        if fault == "broken-chain":
            driver.write_desc(driver.desc, parked.head, address, length,
                              c.VRING_DESC_F_WRITE | c.VRING_DESC_F_NEXT, driver.size + 2)
            expected = c.RingFault.DESC_INDEX
        else:
            bench.dma.fail_reads = [(descriptor, descriptor + 16)]
            expected = c.RingFault.DMA_READ
        function.unpark = 1
        cycle, kind = await bench.wait_fault(ctx)
        assert kind == expected
        await check_stopped(bench, ctx, cycle)
        bench.collect()
        assert function.commands == 1 and list(driver.in_flight) == [parked]
        assert driver.writable_bytes(parked) == parked.sentinel

    bench.run(testbench)
