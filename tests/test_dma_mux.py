"""DmaMux: clients' commands merged round-robin, answers routed back by a FIFO of ids.

A fake engine on the merged port answers reads with beats that name the command they
belong to (client, command number, beat number), checks that the write data it gets
belongs to the write command it granted, and returns write_done with an error bit that
also depends on the command. Each client checks that it gets exactly its own answers, in
its own command order. Every stream has seeded random idle or backpressure.
"""

import random

import pytest
from amaranth.sim import Simulator

from memballoon.hdl.pcie.dma import READ_COMMANDS_HELD
from memballoon.hdl.pcie.dma_mux import DmaMux
from memballoon.hdl.pcie.interface import DMA_READ_BEAT_BYTES
from sim_util import run_with_waves, stream_consumer, stream_put, wait_until


def tag(client, command, beat=0):
    """What the fake engine and the clients put in data: who, which command, which beat."""
    return client << 48 | command << 16 | beat


def beats(length, beat_bytes=8):
    """Beats of a ``length``-byte transfer: 8 bytes a write beat, 16 a read beat."""
    return (length + beat_bytes - 1) // beat_bytes


def read_beats(length):
    """(beat index, count, last) of each read beat of a ``length``-byte read."""
    n = beats(length, DMA_READ_BEAT_BYTES)
    return [(i, length - DMA_READ_BEAT_BYTES * i if i == n - 1 else DMA_READ_BEAT_BYTES,
             i == n - 1) for i in range(n)]


def run_mux(n, reads, writes, *, seed, idle=0.3, backpressure=0.3, engine_write_stall=None,
            engine_read_hold=0):
    """``reads[c]``/``writes[c]``: lengths of client c's commands; the engine answers no
    read before cycle ``engine_read_hold``. Returns what the engine saw (granted commands
    in order) and what each client received."""
    rng = random.Random(seed)
    dut = DmaMux(n)
    dma = dut.dma
    granted_reads, granted_writes = [], []
    read_answers, write_queue, done_queue = [], [], []
    got_reads = [[] for _ in range(n)]
    got_dones = [[] for _ in range(n)]
    clock = [0]

    # --- fake engine ---
    def on_read_cmd(cmd):
        client, command = cmd.address >> 32, cmd.address & 0xFFFF_FFFF
        granted_reads.append((client, clock[0]))
        read_answers.append((client, command, cmd.length))

    async def engine_read_data(ctx):
        while True:
            if not read_answers or clock[0] < engine_read_hold:
                await ctx.tick()
                continue
            client, command, length = read_answers.pop(0)
            for i, count, last in read_beats(length):
                await stream_put(ctx, dma.read_data, dict(
                    data=tag(client, command, i), count=count, last=last, error=0), rng, idle)

    def on_write_cmd(cmd):
        client, command = cmd.address >> 32, cmd.address & 0xFFFF_FFFF
        granted_writes.append((client, clock[0]))
        write_queue.append([client, command, beats(cmd.length), 0])

    def on_write_data(beat):
        entry = write_queue[0]
        client, command, count, received = entry
        assert beat.data == tag(client, command, received), "write data of another command"
        entry[3] += 1
        assert bool(beat.last) == (entry[3] == count)
        if beat.last:
            write_queue.pop(0)
            done_queue.append((client, command))

    async def engine_write_done(ctx):
        while True:
            if not done_queue:
                await ctx.tick()
                continue
            client, command = done_queue.pop(0)
            await stream_put(ctx, dma.write_done, dict(error=command % 3 == 0), rng, idle)

    def write_cmd_backpressure():
        if engine_write_stall and engine_write_stall[0] <= clock[0] < engine_write_stall[1]:
            return 1.0
        return backpressure

    # --- clients ---
    def client_commands(c, stream, lengths):
        """Client c's commands of ``lengths`` on ``stream``, numbered in the address."""
        async def run(ctx):
            for command, length in enumerate(lengths):
                await stream_put(ctx, stream, dict(address=c << 32 | command, length=length),
                                 rng, idle)
        return run

    def client_write_data(c):
        async def run(ctx):
            for command, length in enumerate(writes[c]):
                for i in range(beats(length)):
                    await stream_put(ctx, dut.clients[c].write_data, dict(
                        data=tag(c, command, i), last=i == beats(length) - 1), rng, idle)
        return run

    async def clock_count(ctx):
        async for _ in ctx.tick():
            clock[0] += 1

    async def until_answered(ctx):
        await wait_until(ctx, lambda: all(
            sum(b.last for b in got_reads[c]) == len(reads[c]) and
            len(got_dones[c]) == len(writes[c]) for c in range(n)), "mux stalled")
        await ctx.tick().repeat(20)

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    for c in range(n):
        client = dut.clients[c]
        sim.add_testbench(client_commands(c, client.read_cmd, reads[c]))
        sim.add_testbench(client_commands(c, client.write_cmd, writes[c]))
        sim.add_testbench(client_write_data(c))
        sim.add_testbench(stream_consumer(client.read_data, got_reads[c].append, rng,
                                          backpressure), background=True)
        sim.add_testbench(stream_consumer(
            client.write_done, lambda p, c=c: got_dones[c].append((clock[0], p.error)),
            rng, backpressure), background=True)
    sim.add_testbench(until_answered)
    for tb in (clock_count, engine_read_data, engine_write_done,
               stream_consumer(dma.read_cmd, on_read_cmd, rng, backpressure),
               stream_consumer(dma.write_cmd, on_write_cmd, rng, write_cmd_backpressure),
               stream_consumer(dma.write_data, on_write_data, rng, backpressure)):
        sim.add_testbench(tb, background=True)
    run_with_waves(sim)
    return granted_reads, granted_writes, got_reads, got_dones


def check_answers(n, reads, writes, got_reads, got_dones):
    for c in range(n):
        expected = [(tag(c, command, i), count, last)
                    for command, length in enumerate(reads[c])
                    for i, count, last in read_beats(length)]
        assert [(b.data, b.count, bool(b.last)) for b in got_reads[c]] == expected, \
            f"client {c} read data"
        assert [bool(error) for _, error in got_dones[c]] == \
            [command % 3 == 0 for command in range(len(writes[c]))], f"client {c} write_done"


@pytest.mark.parametrize("n,seed", [(2, 1), (3, 2), (5, 3)])
def test_interleaved_clients(n, seed):
    """Clients issue reads and writes at random times with random backpressure: each
    gets its own read data and write_done in its command order, and the engine gets each
    write's data right after granting it."""
    rng = random.Random(seed)
    reads = [[rng.randint(1, 40) for _ in range(rng.randint(10, 20))] for _ in range(n)]
    writes = [[rng.randint(1, 40) for _ in range(rng.randint(8, 15))] for _ in range(n)]
    _, _, got_reads, got_dones = run_mux(n, reads, writes, seed=seed)
    check_answers(n, reads, writes, got_reads, got_dones)


def test_round_robin():
    """With every client always asking and the engine always taking, grants rotate."""
    n = 3
    reads = [[8] * 12 for _ in range(n)]
    writes = [[8] * 12 for _ in range(n)]
    granted_reads, granted_writes, got_reads, got_dones = run_mux(
        n, reads, writes, seed=4, idle=0, backpressure=0)
    check_answers(n, reads, writes, got_reads, got_dones)
    for granted in (granted_reads, granted_writes):
        order = [client for client, _ in granted]
        assert order == [order[0], (order[0] + 1) % n, (order[0] + 2) % n] * 12


def test_waiting_writes_do_not_hold_reads():
    """While the engine takes no write command (a client's write waits in the mux), the
    other clients' reads are granted and their data delivered."""
    n = 2
    reads = [[16] * 6, [24] * 10]
    writes = [[16] * 3, []]
    stall = (0, 3000)
    granted_reads, granted_writes, got_reads, got_dones = run_mux(
        n, reads, writes, seed=5, engine_write_stall=stall)
    check_answers(n, reads, writes, got_reads, got_dones)
    assert all(cycle < stall[1] for _, cycle in granted_reads)
    assert all(cycle >= stall[1] for _, cycle in granted_writes)


def test_depth_covers_the_engine():
    """While the engine answers no read, one client gets READ_COMMANDS_HELD reads granted
    (the most a DmaEngine holds) before the mux waits: the mux does not limit them."""
    reads = [[16] * (READ_COMMANDS_HELD + 8), []]
    hold = 1000
    granted_reads, _, got_reads, got_dones = run_mux(
        2, reads, [[], []], seed=6, idle=0, backpressure=0, engine_read_hold=hold)
    check_answers(2, reads, [[], []], got_reads, got_dones)
    assert sum(cycle < hold for _, cycle in granted_reads) == READ_COMMANDS_HELD
