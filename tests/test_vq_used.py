"""UsedWriter alone: used elements and publications go on while a suppression read is out,
and the reads split the publications into consecutive ranges, each decided by the
driver's rule (virtio 1.2 2.7.10, C11; Linux's ``vhost_notify``). The WritePort's side
(``write`` taken, ``published`` after a done latency) and the host's (a read answered
after a round trip) are modelled cycle by cycle."""

import gc
import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from memballoon import constants as c
from memballoon.hdl.virtqueue.split.used import UsedWriter
from memballoon.tb.seed import new_seed
from memballoon.virtio_ring import vring_need_event, vring_used_event_offset
from sim_util import simulate, wait_until

#: A host answering a read after 500 ns, in 250 MHz clocks.
HOST_LATENCY = 125
MAX_BATCH = 8
SIZE = 16
INDEX_MASK = 0xFFFF
DEVICE = 0x4000                 # the used ring
DRIVER = 0x2000                 # the avail ring
DATA = 0x8000                   # writable buffers, one slot per command
DATA_SLOT = 0x20
#: In steady state, results offered every clock and writes taken every clock: a batch of
#: ``MAX_BATCH`` costs a clock per write (data, used element), one for ``used->idx`` and
#: one back in Idle.
BATCH_CLOCKS = {0: MAX_BATCH + 2, 8: 2 * MAX_BATCH + 2}   # by result bytes


@pytest.fixture(autouse=True)
def collect_failed_simulations():
    """Finalizes the testbenches a failed check left suspended before the next test's
    report: collected while pytest parses a traceback's source, CPython 3.11.7 fails with
    "AST constructor recursion depth mismatch" and the session stops."""
    yield
    gc.collect()


@dataclass
class Check:
    """One suppression read: the range of used indices it covers, what it read, the
    interrupts raised after it."""
    requested: int              # the cycle its read was first offered
    old: int
    new: int
    answered: int = None
    value: int = None
    needed: bool = None
    interrupts: list = field(default_factory=list)
    publications: list = field(default_factory=list)


@dataclass
class Publication:
    taken: int                  # the cycle the WritePort took its used->idx write
    first: int
    last: int                   # used->idx written
    handed: int = None          # the cycle of its ``published`` pulse


class Rig:
    """A UsedWriter, its commands (random heads and lengths, ``writable`` result bytes in
    one segment each), the WritePort's and the host's models, and what they saw.

    ``write_stall`` is the chance ``write.ready`` and ``read.ready`` are low in a cycle,
    ``result_idle`` the chance a result is held back a cycle, ``update`` the chance the
    driver moves ``used_event`` (near the used index) or toggles NO_INTERRUPT in a cycle.
    """

    def __init__(self, seed, count, *, event_idx, latency=(HOST_LATENCY, HOST_LATENCY),
                 done_latency=(1, 8), write_stall=0.0, result_idle=0.0, writable=0,
                 start=0, update=0.02):
        print(f"seed {seed}")
        self.rng = random.Random(seed)
        self.dut = UsedWriter(max_batch=MAX_BATCH)
        self.event_idx = event_idx
        self.latency = latency
        self.done_latency = done_latency
        self.write_stall = write_stall
        self.result_idle = result_idle
        self.writable = writable
        self.start = start
        self.update = update
        self.commands = [(self.rng.randrange(SIZE), self.rng.getrandbits(32),
                          self.rng.getrandbits(8 * writable)) for _ in range(count)]
        self.value = 0                  # used_event, or avail->flags, in host memory
        self.cycle = 0
        self.taken = []                 # cycles results were taken
        self.elements = 0               # used elements written
        self.data_writes = 0
        self.publications = []
        self.checks = []
        self.idle_cycles = []

    @property
    def suppression_address(self):
        if self.event_idx:
            return DRIVER + vring_used_event_offset(SIZE)
        return DRIVER + c.VRING_AVAIL_FLAGS

    def needed(self, value, new, old):
        if self.event_idx:
            return vring_need_event(value, new, old)
        return not value & c.VRING_AVAIL_F_NO_INTERRUPT

    def used_index(self, count):
        return (self.start + count) & INDEX_MASK

    # --- the driver ----------------------------------------------------------------------

    def move_suppression(self):
        if self.rng.random() >= self.update:
            return
        if self.event_idx:
            # About the used->idx the host sees: before it (a driver behind), the ranges
            # being checked, or just ahead.
            seen = self.publications[-1].last if self.publications else self.start
            self.value = (seen + self.rng.randint(-8 * MAX_BATCH, MAX_BATCH)) & INDEX_MASK
        else:
            self.value ^= c.VRING_AVAIL_F_NO_INTERRUPT

    # --- processes -----------------------------------------------------------------------

    async def produce(self, ctx):
        """Results and their completions (and segments), taken together."""
        dut, rng = self.dut, random.Random(self.rng.random())
        for index, (head, used_len, data) in enumerate(self.commands):
            while rng.random() < self.result_idle:
                await ctx.tick()
            ctx.set(dut.results.payload.used_len, used_len)
            ctx.set(dut.results.payload.write_data, data)
            ctx.set(dut.results.payload.write_count, self.writable)
            ctx.set(dut.completions.payload.head, head)
            ctx.set(dut.completions.payload.writable, self.writable)
            ctx.set(dut.segments.payload.address, DATA + DATA_SLOT * index)
            ctx.set(dut.segments.payload.length, self.writable)
            ctx.set(dut.results.valid, 1)
            ctx.set(dut.completions.valid, 1)
            ctx.set(dut.segments.valid, self.writable != 0)
            segment_taken = self.writable == 0
            while True:
                _, _, taken, popped = await ctx.tick().sample(dut.results.ready,
                                                              dut.segments.ready)
                if popped:
                    segment_taken = True
                    ctx.set(dut.segments.valid, 0)
                if taken:
                    ctx.set(dut.results.valid, 0)
                    ctx.set(dut.completions.valid, 0)
                if not ctx.get(dut.results.valid) and segment_taken:
                    break

    async def host(self, ctx):
        """The WritePort, the host and the checks, one cycle an iteration: inputs for the
        cycle are set, then what happened in it is sampled at its clock edge."""
        dut, rng = self.dut, self.rng
        dones = deque()                 # (cycle, Publication), in the order taken
        answers = deque()               # (cycle, Check)
        handing = deque()               # Publications taken and not handed
        held = {}                       # stream -> payload offered and not taken
        while True:
            cycle = self.cycle
            self.move_suppression()
            ctx.set(dut.write.ready, rng.random() >= self.write_stall)
            ctx.set(dut.read.ready, rng.random() >= self.write_stall)
            handed = bool(dones) and dones[0][0] <= cycle
            ctx.set(dut.published, handed)
            answer = answers[0][1] if answers and answers[0][0] <= cycle else None
            ctx.set(dut.response.valid, answer is not None)
            ctx.set(dut.response.payload.data, self.value)
            ctx.set(dut.response.payload.count, 2)
            ctx.set(dut.response.payload.last, 1)

            (_, _, write_valid, write_ready, write, read_valid, read_ready, read,
             response_ready, results_ready, batch, interrupt, idle) = await ctx.tick().sample(
                dut.write.valid, dut.write.ready, dut.write.payload,
                dut.read.valid, dut.read.ready, dut.read.payload, dut.response.ready,
                dut.results.ready, dut.batch, dut.interrupt, dut.idle)
            self.cycle += 1

            read_continues = "read" in held
            for name, valid, ready, payload in (("write", write_valid, write_ready, write),
                                                ("read", read_valid, read_ready, read)):
                if name in held:
                    assert valid and payload == held[name], f"{name} changed or withdrawn"
                if valid and not ready:
                    held[name] = payload
                else:
                    held.pop(name, None)

            if handed:
                _, publication = dones.popleft()
                assert publication is handing.popleft()
                publication.handed = cycle
                assert batch == (publication.last - publication.first) & INDEX_MASK, \
                    "batch is not the handed publication's (C7)"

            if write_valid and write_ready:
                self.on_write(cycle, write, handing, dones)

            if read_valid and not read_continues:
                self.on_request(cycle, read)
            if read_valid and read_ready:
                low, high = self.latency
                answers.append((cycle + rng.randint(low, high), self.checks[-1]))

            if answer is not None:
                assert response_ready, "a suppression answer not taken at once"
                answers.popleft()
                answer.answered, answer.value = cycle, self.value
                answer.needed = self.needed(self.value, answer.new, answer.old)

            if interrupt:
                check = self.checks[-1] if self.checks else None
                assert check is not None and check.answered is not None, \
                    f"interrupt at {cycle} before any answer"
                assert not check.interrupts, f"a second interrupt at {cycle}"
                check.interrupts.append(cycle)

            if idle:
                self.idle_cycles.append(cycle)
                self.check_idle(cycle, handing)
            if results_ready:
                self.taken.append(cycle)

    def on_write(self, cycle, write, handing, dones):
        if write.publish:
            assert write.address == DEVICE + c.VRING_USED_IDX and write.length == 2
            first = self.publications[-1].last if self.publications else self.start
            assert write.data == self.used_index(self.elements), "used->idx"
            publication = Publication(cycle, first, write.data)
            self.publications.append(publication)
            assert not handing, "a second publication in the WritePort"
            handing.append(publication)
            done = cycle + self.rng.randint(*self.done_latency)
            dones.append((max(done, dones[-1][0] + 1) if dones else done, publication))
        elif write.address >= DATA:
            index = self.elements
            assert write.address == DATA + DATA_SLOT * index and write.length == self.writable
            assert write.data == self.commands[index][2]
            self.data_writes += 1
        else:
            position = self.used_index(self.elements) % SIZE
            head, used_len, _ = self.commands[self.elements]
            assert write.address == DEVICE + c.VRING_USED_RING + \
                c.VRING_USED_ELEM_SIZE * position
            assert write.length == c.VRING_USED_ELEM_SIZE
            assert write.data == head | used_len << 32, f"used element {self.elements}"
            assert self.data_writes == (self.elements + 1 if self.writable else 0)
            self.elements += 1

    def on_request(self, cycle, read):
        """A read first offered in ``cycle`` was requested in the clock before: it covers
        the publications reported before that clock."""
        assert read.command.address == self.suppression_address
        assert read.command.length == 2
        previous = self.checks[-1] if self.checks else None
        assert previous is None or previous.answered is not None, "two reads out"
        old = previous.new if previous else self.start
        covered = [p for p in self.publications if p.handed is not None and p.handed < cycle - 1]
        assert covered and covered[-1].last != old, f"a read at {cycle} covering nothing"
        self.checks.append(Check(cycle, old, covered[-1].last))

    def check_idle(self, cycle, handing):
        """``idle``: every result taken before ``cycle`` is published, handed and its
        notification decided."""
        assert self.elements == len(self.taken), f"idle at {cycle} with results unwritten"
        assert not handing, f"idle at {cycle} with a publication in the WritePort"
        last = self.publications[-1].last if self.publications else self.start
        assert last == self.used_index(self.elements), f"idle at {cycle}, unpublished"
        check = self.checks[-1] if self.checks else None
        checked = check.new if check else self.start
        assert checked == last, f"idle at {cycle} with publications unchecked"
        assert check is None or check.answered is not None, f"idle at {cycle}, read out"
        assert check is None or len(check.interrupts) == check.needed, \
            f"idle at {cycle} before the interrupt was raised"

    # --- running and the checks ----------------------------------------------------------

    def run(self):
        dut = self.dut

        async def testbench(ctx):
            ctx.set(dut.config.size, SIZE)
            ctx.set(dut.config.device, DEVICE)
            ctx.set(dut.config.driver, DRIVER)
            ctx.set(dut.event_idx, self.event_idx)
            ctx.set(dut.used_idx, self.start)
            limit = int(10 * len(self.commands) / (1 - self.result_idle)) + 20 * HOST_LATENCY
            await wait_until(ctx, lambda: len(self.taken) == len(self.commands),
                             "every result taken", limit)
            await wait_until(ctx, lambda: ctx.get(dut.idle), "idle", limit)
            await ctx.tick().repeat(2 * self.latency[1])
            assert ctx.get(dut.idle)

        simulate(dut, testbench, background=[self.produce, self.host])
        self.check_interrupts()

    def check_interrupts(self):
        """Every publication checked once, the checks' ranges made of whole publications;
        an interrupt exactly after the checks whose range needs one."""
        assert self.publications[-1].last == self.used_index(len(self.commands))
        publications = iter(self.publications)
        for check in self.checks:
            while not check.publications or check.publications[-1].last != check.new:
                check.publications.append(next(publications))
            assert check.publications[0].first == check.old
            assert check.answered is not None
            assert len(check.interrupts) == check.needed, check
        assert next(publications, None) is None, "publications never checked"

    def published_during_reads(self):
        """Publications the WritePort took while a suppression read was out."""
        return [p for p in self.publications
                if any(k.requested < p.taken < k.answered for k in self.checks)]

    def clocks_per_command(self):
        """Between the first batch's end and the last result, per result taken."""
        taken = self.taken[MAX_BATCH:]
        return (taken[-1] - taken[0]) / (len(taken) - 1)


@pytest.mark.parametrize("writable", [0, 8])
def test_publications_go_on_while_a_check_is_out(writable):
    """Results offered every clock, writes taken every clock, a host answering after 500
    ns: results are taken and published at the full rate while each read is out, and one
    read covers every publication handed before it."""
    rig = Rig(new_seed(), 400, event_idx=True, writable=writable)
    rig.run()
    during = rig.published_during_reads()
    per_command = rig.clocks_per_command()
    print(f"{writable} result bytes: {per_command:.3f} clocks per command, "
          f"{len(rig.publications)} publications, {len(rig.checks)} checks, "
          f"{len(during)} publications while a read was out")
    assert len(during) > len(rig.publications) // 2
    assert per_command <= BATCH_CLOCKS[writable] / MAX_BATCH
    assert len(rig.checks) < len(rig.publications) // 4


@pytest.mark.parametrize("latency", [(HOST_LATENCY, HOST_LATENCY), (1, 2 * HOST_LATENCY)])
def test_interrupts_follow_vring_need_event(latency):
    """EVENT_IDX, used_event moved about the used index while results come at random, the
    indices wrapping: an interrupt exactly when the checked range [previous check's new,
    this one's new) passes used_event, also when used_event lands in a publication made
    while the previous read was out."""
    seed = new_seed()
    rig = Rig(seed, 1500, event_idx=True, latency=latency, write_stall=0.3, result_idle=0.5,
              writable=random.Random(seed).choice([0, 8]), start=0x10000 - 100, update=0.05)
    rig.run()
    needed = [check for check in rig.checks if check.needed]
    assert needed and len(needed) < len(rig.checks)
    during = rig.published_during_reads()
    # used_event inside a publication made while a read was out, not the range's first.
    landed = [check for check in rig.checks for p in check.publications[1:]
              if p in during and vring_need_event(check.value, p.last, p.first)]
    print(f"{len(rig.checks)} checks, {len(needed)} interrupts, {len(landed)} with "
          f"used_event in a publication made while a read was out")
    assert landed


def test_idle_only_when_everything_is_decided():
    """Sparse results, stalled writes and slow dones: ``idle`` (checked in every cycle)
    only once every result is published, handed and its notification decided; it is
    reached between results."""
    rig = Rig(new_seed(), 120, event_idx=True, done_latency=(1, 40), write_stall=0.5,
              result_idle=0.995, update=0.01)
    rig.run()
    assert len([cycle for cycle in rig.idle_cycles if cycle < rig.taken[-1]]) > HOST_LATENCY


def test_no_interrupt_flag_without_event_idx():
    """Without EVENT_IDX: an interrupt after each check that read avail->flags without
    VRING_AVAIL_F_NO_INTERRUPT, none after those that read it set."""
    rig = Rig(new_seed(), 400, event_idx=False, write_stall=0.2, result_idle=0.6,
              update=0.01)
    rig.run()
    outcomes = {check.needed for check in rig.checks}
    assert outcomes == {True, False}
