"""ReadPort unit tests: the request slices (one client's valid never reaches another's
ready in the same clock), priority, and what ``allow`` and ``halt`` do to requests."""

from memballoon.hdl.virtqueue.read_port import ReadPort
from sim_util import simulate, wait_until


def request(address, length=16):
    return {"command": {"address": address, "length": length}, "mark": 0}


def test_a_clients_ready_does_not_wait_on_another_client():
    dut = ReadPort(clients=2, max_reads=8)
    issued = []

    async def testbench(ctx):
        ctx.set(dut.allow, 1)
        for client, address in ((0, 0x1000), (1, 0x2000)):
            ctx.set(dut.requests[client].valid, 1)
            ctx.set(dut.requests[client].payload, request(address))
        # Both are taken in the same clock, the lower one first issued.
        assert ctx.get(dut.requests[0].ready) and ctx.get(dut.requests[1].ready)
        await ctx.tick()
        for client in (0, 1):
            ctx.set(dut.requests[client].valid, 0)
        ctx.set(dut.read_cmd.ready, 1)
        for _ in range(6):
            await ctx.tick()
            if ctx.get(dut.read_cmd.valid):
                issued.append(ctx.get(dut.read_cmd.payload.address))
        assert issued == [0x1000, 0x2000]

    simulate(dut, testbench)


def test_no_request_is_taken_while_disallowed_or_halted_and_a_halt_withdraws_one():
    dut = ReadPort(clients=2, max_reads=8)

    async def testbench(ctx):
        ctx.set(dut.requests[1].valid, 1)
        ctx.set(dut.requests[1].payload, request(0x3000))
        for _ in range(3):                   # not allowed: it stays with the client
            assert not ctx.get(dut.requests[1].ready)
            await ctx.tick()
        ctx.set(dut.allow, 1)
        ctx.set(dut.halt, 1)
        assert not ctx.get(dut.requests[1].ready)
        await ctx.tick()
        ctx.set(dut.halt, 0)
        await ctx.tick()                     # taken into the client's slice
        ctx.set(dut.requests[1].valid, 0)
        ctx.set(dut.halt, 1)                 # withdrawn before it is issued
        await ctx.tick()
        ctx.set(dut.halt, 0)
        ctx.set(dut.read_cmd.ready, 1)
        for _ in range(6):
            assert not ctx.get(dut.read_cmd.valid)
            await ctx.tick()
        ctx.set(dut.requests[0].valid, 1)    # and the port still works
        ctx.set(dut.requests[0].payload, request(0x4000))
        await wait_until(ctx, lambda: ctx.get(dut.read_cmd.valid), "the next read")
        assert ctx.get(dut.read_cmd.payload.address) == 0x4000

    simulate(dut, testbench)
