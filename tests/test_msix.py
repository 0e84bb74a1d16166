# amaranth: UnusedElaboratable=no
"""MsixTable: table and PBA over the register bus, and message delivery (C11)."""

import random

import pytest

from memballoon import constants as c
from memballoon.hdl.pcie.msix import MsixTable
from memballoon.tb.regbus_sim import regbus_read, regbus_write
from sim_util import simulate

PBA_OFFSET = 0x800
CTRL = c.PCI_MSIX_ENTRY_VECTOR_CTRL


def entry_offset(vector, field=0):
    return vector * c.PCI_MSIX_ENTRY_SIZE + field


def message_address(vector):
    return 0xFEE0_0000_0000_1000 | vector << 4


def message_data(vector):
    return 0x4000 + vector


async def bus_write(ctx, dut, offset, value, strb=0xF):
    """A register-bus write at byte ``offset`` of the table or PBA."""
    await regbus_write(ctx, dut.bus, offset // 4, value, strb)


async def bus_read(ctx, dut, offset):
    """A register-bus read of the dword at byte ``offset`` of the table or PBA."""
    return await regbus_read(ctx, dut.bus, offset // 4)


async def read_pba(ctx, dut):
    words = [await bus_read(ctx, dut, PBA_OFFSET + 4 * i) for i in range(-(-dut.vectors // 32))]
    return sum(w << 32 * i for i, w in enumerate(words))


async def program_vector(ctx, dut, vector, masked=False):
    address = message_address(vector)
    await bus_write(ctx, dut, entry_offset(vector, c.PCI_MSIX_ENTRY_LOWER_ADDR), address & 0xFFFF_FFFF)
    await bus_write(ctx, dut, entry_offset(vector, c.PCI_MSIX_ENTRY_UPPER_ADDR), address >> 32)
    await bus_write(ctx, dut, entry_offset(vector, c.PCI_MSIX_ENTRY_DATA), message_data(vector))
    await set_vector_mask(ctx, dut, vector, masked)


async def set_vector_mask(ctx, dut, vector, masked):
    await bus_write(ctx, dut, entry_offset(vector, CTRL), c.PCI_MSIX_ENTRY_CTRL_MASKBIT if masked else 0)


async def raise_vector(ctx, dut, vector, log=None):
    ctx.set(dut.request.payload, vector)
    ctx.set(dut.request.valid, 1)
    await ctx.tick().until(dut.request.ready)
    ctx.set(dut.request.valid, 0)
    if log is not None:
        log.append(("request", vector))


async def idle(ctx, cycles):
    await ctx.tick().repeat(cycles)


async def wait_for(ctx, signal):
    """``ctx.tick().until(signal)`` for background testbenches: a plain tick can be
    abandoned when the simulation ends, a pending ``until`` cannot."""
    while not (await ctx.tick().sample(signal))[2]:
        pass


class HardIp:
    """The hard IP's side of MsixSignature: answers each message after a random delay,
    checks it is held stable, and logs what it sent. ``fail_next`` answers that many
    messages with ``fail``."""

    def __init__(self, dut, rng, max_delay=6, log=None):
        self.dut = dut
        self.rng = rng
        self.max_delay = max_delay
        self.log = [] if log is None else log
        self.fail_next = 0
        self.attempts = []

    def sent(self):
        return [entry[1] for entry in self.log if entry[0] == "sent"]

    async def run(self, ctx):
        msix = self.dut.msix
        while True:
            await wait_for(ctx, msix.valid)
            held = (ctx.get(msix.address), ctx.get(msix.data))
            self.attempts.append(held)
            for _ in range(self.rng.randrange(self.max_delay + 1)):
                await ctx.tick()
                assert ctx.get(msix.valid), "valid dropped before the answer"
                assert (ctx.get(msix.address), ctx.get(msix.data)) == held, "message changed"
            answer = msix.fail if self.fail_next else msix.sent
            if self.fail_next:
                self.fail_next -= 1
            ctx.set(answer, 1)
            await ctx.tick()
            ctx.set(answer, 0)
            if answer is msix.sent:
                vector = held[1] - message_data(0)
                assert held[0] == message_address(vector)
                self.log.append(("sent", vector))


async def enable_msix(ctx, dut):
    ctx.set(dut.msix.enable, 1)
    ctx.set(dut.bus_master_enable, 1)


def test_table_read_write():
    dut = MsixTable(3, pba_offset=PBA_OFFSET)
    rng = random.Random(1)

    async def testbench(ctx):
        for v in range(3):
            assert await bus_read(ctx, dut, entry_offset(v, CTRL)) == 1, "masked after reset"
        expected = {}
        for v in range(3):
            for field in (c.PCI_MSIX_ENTRY_LOWER_ADDR, c.PCI_MSIX_ENTRY_UPPER_ADDR,
                          c.PCI_MSIX_ENTRY_DATA):
                expected[entry_offset(v, field)] = 0
        for _ in range(60):
            offset = rng.choice(sorted(expected))
            value, strb = rng.getrandbits(32), rng.randrange(16)
            await bus_write(ctx, dut, offset, value, strb)
            lanes = sum(0xFF << 8 * b for b in range(4) if strb >> b & 1)
            expected[offset] = expected[offset] & ~lanes | value & lanes
        for offset, value in expected.items():
            assert await bus_read(ctx, dut, offset) == value, hex(offset)

        # Vector control: only the mask bit, and only through byte 0.
        await bus_write(ctx, dut, entry_offset(1, CTRL), 0xFFFF_FFFE)
        assert await bus_read(ctx, dut, entry_offset(1, CTRL)) == 0
        await bus_write(ctx, dut, entry_offset(1, CTRL), 0xFFFF_FFFF, strb=0b1110)
        assert await bus_read(ctx, dut, entry_offset(1, CTRL)) == 0
        await bus_write(ctx, dut, entry_offset(1, CTRL), 0xFFFF_FFFF)
        assert await bus_read(ctx, dut, entry_offset(1, CTRL)) == 1

        # Unimplemented addresses read 0 and writes to them change nothing.
        for offset in (entry_offset(3), PBA_OFFSET - 4, PBA_OFFSET + 4, PBA_OFFSET + 8, 0xFFC):
            await bus_write(ctx, dut, offset, 0xFFFF_FFFF)
            assert await bus_read(ctx, dut, offset) == 0, hex(offset)
        for offset, value in expected.items():
            assert await bus_read(ctx, dut, offset) == value, hex(offset)

    simulate(dut, testbench)


@pytest.mark.parametrize("stopper", ["function_mask", "vector_mask", "bus_master"])
def test_stopped_vector_pends_then_delivers(stopper):
    dut = MsixTable(3, pba_offset=PBA_OFFSET)
    hard_ip = HardIp(dut, random.Random(2))

    async def set_stopper(ctx, stopped):
        if stopper == "function_mask":
            ctx.set(dut.msix.function_mask, stopped)
        elif stopper == "bus_master":
            ctx.set(dut.bus_master_enable, not stopped)
        else:
            await set_vector_mask(ctx, dut, 1, stopped)

    async def testbench(ctx):
        await enable_msix(ctx, dut)
        for v in range(3):
            await program_vector(ctx, dut, v)
        await set_stopper(ctx, True)
        await raise_vector(ctx, dut, 1)
        await raise_vector(ctx, dut, 1)
        await idle(ctx, 20)
        assert hard_ip.attempts == []
        assert await read_pba(ctx, dut) == 0b010
        await set_stopper(ctx, False)
        await idle(ctx, 20)
        assert hard_ip.sent() == [1], "two requests while stopped make one message"
        assert await read_pba(ctx, dut) == 0
        assert ctx.get(dut.sent_count) == 1

    simulate(dut, testbench, background=[hard_ip.run])


def test_reset_masks_every_vector():
    dut = MsixTable(3, pba_offset=PBA_OFFSET)
    hard_ip = HardIp(dut, random.Random(3))

    async def testbench(ctx):
        await enable_msix(ctx, dut)
        await raise_vector(ctx, dut, 2)
        await idle(ctx, 10)
        assert hard_ip.attempts == [], "vectors are masked out of reset"
        assert await read_pba(ctx, dut) == 0b100

    simulate(dut, testbench, background=[hard_ip.run])


def test_disabled_msix_drops_requests():
    dut = MsixTable(3, pba_offset=PBA_OFFSET)
    hard_ip = HardIp(dut, random.Random(4))

    async def testbench(ctx):
        ctx.set(dut.bus_master_enable, 1)
        for v in range(3):
            await program_vector(ctx, dut, v)
        for v in range(3):
            await raise_vector(ctx, dut, v)
        assert await read_pba(ctx, dut) == 0
        ctx.set(dut.msix.enable, 1)
        await idle(ctx, 20)
        assert hard_ip.attempts == []

    simulate(dut, testbench, background=[hard_ip.run])


def test_fail_makes_vector_pending_again():
    dut = MsixTable(3, pba_offset=PBA_OFFSET)
    hard_ip = HardIp(dut, random.Random(5))

    async def testbench(ctx):
        await enable_msix(ctx, dut)
        for v in range(3):
            await program_vector(ctx, dut, v)
        hard_ip.fail_next = 2
        await raise_vector(ctx, dut, 2)
        await idle(ctx, 40)
        assert hard_ip.sent() == [2]
        assert len(hard_ip.attempts) == 3
        assert (ctx.get(dut.sent_count), ctx.get(dut.fail_count)) == (1, 2)

        # A message refused because MSI-X was disabled meanwhile is dropped.
        hard_ip.fail_next = 1
        await raise_vector(ctx, dut, 0)
        await ctx.tick().until(dut.msix.valid)
        ctx.set(dut.msix.enable, 0)
        await idle(ctx, 10)
        assert await read_pba(ctx, dut) == 0
        ctx.set(dut.msix.enable, 1)
        await idle(ctx, 20)
        assert hard_ip.sent() == [2]
        assert ctx.get(dut.fail_count) == 3

    simulate(dut, testbench, background=[hard_ip.run])


def test_burst_while_message_in_flight():
    dut = MsixTable(3, pba_offset=PBA_OFFSET)
    hard_ip = HardIp(dut, random.Random(6), max_delay=0)
    answer_delay = 30

    async def slow_hard_ip(ctx):
        while True:
            await wait_for(ctx, dut.msix.valid)
            vector = ctx.get(dut.msix.data) - message_data(0)
            await idle(ctx, answer_delay)
            ctx.set(dut.msix.sent, 1)
            await ctx.tick()
            ctx.set(dut.msix.sent, 0)
            hard_ip.log.append(("sent", vector))

    async def testbench(ctx):
        await enable_msix(ctx, dut)
        for v in range(3):
            await program_vector(ctx, dut, v)
        await raise_vector(ctx, dut, 0)
        await ctx.tick().until(dut.msix.valid)
        for v in (0, 1, 2, 1, 0, 2):
            assert ctx.get(dut.request.ready)
            await raise_vector(ctx, dut, v)
        assert ctx.get(dut.msix.valid), "the burst came while the first message was held"
        assert await read_pba(ctx, dut) == 0b111
        await idle(ctx, 4 * (answer_delay + 4))
        sent = hard_ip.sent()
        assert sent[0] == 0 and sorted(sent[1:]) == [0, 1, 2]
        assert sent[1:] == [1, 2, 0], "round-robin after the last vector sent"
        assert ctx.get(dut.sent_count) == 4

    simulate(dut, testbench, background=[slow_hard_ip])


def test_random_requests_are_never_lost():
    """Random requests, vector masks, function mask, BME and answer delays (with fails):
    every vector gets a message after its last request, and never more messages than
    requests. 40 vectors so the PBA spans two dwords."""
    vectors = 40
    dut = MsixTable(vectors, pba_offset=PBA_OFFSET)
    rng = random.Random(7)
    log = []
    hard_ip = HardIp(dut, random.Random(8), max_delay=8, log=log)

    async def testbench(ctx):
        await enable_msix(ctx, dut)
        masked = set()
        for v in range(vectors):
            await program_vector(ctx, dut, v)
        for _ in range(400):
            action = rng.random()
            if action < 0.6:
                await raise_vector(ctx, dut, rng.randrange(vectors), log)
            elif action < 0.75:
                v = rng.randrange(vectors)
                masked ^= {v}
                await set_vector_mask(ctx, dut, v, v in masked)
            elif action < 0.8:
                ctx.set(dut.msix.function_mask, rng.random() < 0.5)
            elif action < 0.85:
                ctx.set(dut.bus_master_enable, rng.random() < 0.7)
            elif action < 0.88:
                hard_ip.fail_next = 1
            else:
                await idle(ctx, rng.randrange(1, 5))
        for v in masked:
            await set_vector_mask(ctx, dut, v, False)
        ctx.set(dut.msix.function_mask, 0)
        ctx.set(dut.bus_master_enable, 1)
        for _ in range(2000):
            await ctx.tick()
            if not ctx.get(dut.msix.valid) and await read_pba(ctx, dut) == 0:
                break
        await idle(ctx, 20)

        requested = [entry[1] for entry in log if entry[0] == "request"]
        sent = hard_ip.sent()
        assert set(sent) == set(requested)
        for v in set(requested):
            last_request = max(i for i, e in enumerate(log) if e == ("request", v))
            last_sent = max(i for i, e in enumerate(log) if e == ("sent", v))
            assert last_sent > last_request, f"vector {v} lost its last request"
            assert sent.count(v) <= requested.count(v)
        assert ctx.get(dut.sent_count) == len(sent)
        assert await read_pba(ctx, dut) == 0

    simulate(dut, testbench, background=[hard_ip.run])


@pytest.mark.parametrize("vectors, pba_offset", [(3, 0x20), (64, 0x3F8), (0, 0x800), (3, 0x804), (3, 0x1000)])
def test_layout_errors(vectors, pba_offset):
    with pytest.raises(ValueError):
        MsixTable(vectors, pba_offset=pba_offset)
