"""``make bench``: throughput and latency of the balloon commands on the RTL (a benchmark
that prints a table, not a test).

``python -m memballoon.tb.bench [--width 512 256]`` builds the device with the default
:class:`~memballoon.params.DeviceParams` per width and runs the cocotb test
:func:`measure_commands`: GIVE, GET and EXCHANGE with 1, 64 and 512 pages per command
(EXCHANGE: that many pairs), 1 and 8 commands queued behind one doorbell. Cycles are
counted on ``user_clk`` at the device's ports, from the doorbell's beat on the CQ
interface to the RQ write that publishes the last used idx. Pages per clock are the
command pages over those cycles; the latency is the 1-page, 1-command figure. The
idle/backpressure inserters of the tests are off here: the figures are the device's, not
the testbench's. The last lines are the simulation speed (user_clk cycles per wall
second). The table is Markdown, for README.
"""

import argparse
import json
import os
import pathlib
import sys
import time

import cocotb
from cocotb.triggers import RisingEdge

from memballoon import constants as c
from memballoon.params import DeviceParams
from memballoon.tb import scenarios as s
from memballoon.tb.harness import LINK_CONFIG, MemballoonTb
from memballoon.tb.runner import REPO, params_from_env, run_cocotb
from memballoon.tb.scoreboard import SimRig

KINDS = (s.GIVE, s.GET, s.EXCHANGE)
KIND_NAMES = {s.GIVE: "GIVE", s.GET: "GET", s.EXCHANGE: "EXCHANGE"}
SIZES = (1, 64, 512)
DEPTHS = (1, 8)
RESULTS_ENV = "MEMBALLOON_BENCH_RESULTS"
#: UltraScale+ RQ descriptor (PG213, dword-aligned mode): request type bits and where the
#: payload starts in the first beat.
RQ_TYPE_SHIFT, RQ_TYPE_MASK, RQ_TYPE_MEM_WRITE = 75, 0xF, 0b0001
RQ_DESCRIPTOR_BYTES = 16


class UsedIdxWatch:
    """Counts ``user_clk`` cycles from the next CQ beat (the doorbell) until the device
    writes ``target`` into the used idx at ``used_addr`` over RQ."""

    def __init__(self, dut, used_addr, target):
        self.dut = dut
        self.idx_addr = used_addr + c.VRING_USED_IDX
        self.target = target & 0xFFFF
        self.task = cocotb.start_soon(self._run())

    def _used_idx_written(self, tlp):
        desc = int.from_bytes(tlp[:RQ_DESCRIPTOR_BYTES], "little")
        if desc >> RQ_TYPE_SHIFT & RQ_TYPE_MASK != RQ_TYPE_MEM_WRITE:
            return False
        base = desc & ~3 & (1 << 64) - 1
        at = RQ_DESCRIPTOR_BYTES + self.idx_addr - base
        if not RQ_DESCRIPTOR_BYTES <= at <= len(tlp) - 2:
            return False
        return int.from_bytes(tlp[at:at + 2], "little") == self.target

    async def _run(self):
        dut = self.dut
        width = len(dut.m_axis_rq_tdata) // 8
        cycle, start, beats = 0, None, []
        while True:
            await RisingEdge(dut.user_clk)
            cycle += 1
            if start is None:
                if dut.s_axis_cq_tvalid.value and dut.s_axis_cq_tready.value:
                    start = cycle
                continue
            if dut.m_axis_rq_tvalid.value and dut.m_axis_rq_tready.value:
                beats.append(int(dut.m_axis_rq_tdata.value).to_bytes(width, "little"))
                if dut.m_axis_rq_tlast.value:
                    tlp, beats = b"".join(beats), []
                    if self._used_idx_written(tlp):
                        return cycle - start


class Bench:
    """The device with one driver; addresses for the commands come from a running page
    counter, so no command finds a page it did not expect."""

    def __init__(self, rig, vb):
        self.rig = rig
        self.vb = vb
        self.next_page = 1

    def pages(self, count):
        first, self.next_page = self.next_page, self.next_page + count
        return [s.page_addr(p) for p in range(first, first + count)]

    async def run(self, kind, size, depth):
        """Cycles for ``depth`` commands of ``size`` pages behind one doorbell."""
        vb, vq = self.vb, self.vb.todev_vq
        commands = []
        for _ in range(depth):
            wanted = self.pages(size)
            if kind == s.GIVE:
                commands.append((s.cmd(s.GIVE, *wanted), 0))
                continue
            await vb.give_pages(wanted)                 # set-up, not measured
            if kind == s.GET:
                commands.append((s.cmd(s.GET, *wanted), s.GET_RESULT))
            else:
                commands.append((s.cmd(s.EXCHANGE, *wanted, *self.pages(size)), 0))
        for i, (data, writable) in enumerate(commands):
            sgs = [(data, False)] + ([(writable, True)] if writable else [])
            await vq.virtqueue_add_sgs(sgs, i)
        watch = UsedIdxWatch(self.rig.tb.dut, vq.used.iova, vq.last_used_idx + depth)
        await vq.virtqueue_notify()
        cycles = await watch.task
        used = await s.wait_used(self.rig, vq, depth)
        expected = s.GET_RESULT if kind == s.GET else 0
        assert used == [(i, expected) for i in range(depth)], used
        await self.rig.settle()
        return cycles


@cocotb.test(timeout_time=200000, timeout_unit="us")
async def measure_commands(dut):
    """Every (command, pages, queued) combination; results to the JSON file the runner
    names in MEMBALLOON_BENCH_RESULTS."""
    tb = MemballoonTb(dut, params_from_env())
    for stream in (tb.dev.cq_source, tb.dev.rc_source, tb.dev.cc_sink, tb.dev.rq_sink):
        stream.clear_pause_generator()
    await tb.init()
    await tb.enumerate()
    rig = SimRig(tb)
    vb = await s.probe(rig, pool_pages=0, max_pages_per_cmd=max(SIZES))
    bench = Bench(rig, vb)
    start_cycles, start_wall = tb.clock_rate()[:2]
    results = []
    for kind in KINDS:
        for size in SIZES:
            for depth in DEPTHS:
                cycles = await bench.run(kind, size, depth)
                results.append({"kind": KIND_NAMES[kind], "size": size, "depth": depth,
                                "cycles": cycles})
    cycles, wall, _ = tb.clock_rate()
    tb.check_errors()
    pathlib.Path(os.environ[RESULTS_ENV]).write_text(json.dumps({
        "results": results, "sim_cycles": cycles - start_cycles,
        "wall": wall - start_wall}))


def table(by_width):
    """The Markdown table of every width's results."""
    widths = list(by_width)
    head = "| command | pages/cmd | queued | " + " | ".join(
        f"{w}-bit clocks | {w}-bit pages/clk" for w in widths) + " |"
    rule = "|---|---:|---:|" + "---:|---:|" * len(widths)
    rows = [head, rule]
    keyed = {w: {(r["kind"], r["size"], r["depth"]): r["cycles"]
                 for r in by_width[w]["results"]} for w in widths}
    for kind in KINDS:
        for size in SIZES:
            for depth in DEPTHS:
                key = (KIND_NAMES[kind], size, depth)
                cells = []
                for w in widths:
                    cycles = keyed[w][key]
                    cells.append(f"{cycles} | {size * depth / cycles:.3f}")
                rows.append(f"| {key[0]} | {size} | {depth} | " + " | ".join(cells) + " |")
    lines = ["", *rows, "",
             "EXCHANGE sizes are pairs (N wanted + N given). Clocks: user_clk (250 MHz) "
             "from the doorbell's CQ beat to the RQ write of the last used idx; no "
             "idle/backpressure insertion."]
    for w in widths:
        latency = ", ".join(f"{KIND_NAMES[k]} {keyed[w][(KIND_NAMES[k], 1, 1)]}" for k in KINDS)
        data = by_width[w]
        generation, lanes = LINK_CONFIG[w]
        lines.append(f"- {w} bits (Gen{generation} x{lanes}): doorbell-to-used latency, 1 page, "
                     f"in clocks: {latency}; simulation {data['sim_cycles'] / data['wall']:.0f} "
                     f"user_clk cycles per wall second")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, nargs="+", choices=(512, 256), default=[512, 256],
                        help="AXI-stream data widths to measure")
    args = parser.parse_args()
    env = {"COCOTB_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    by_width = {}
    start = time.perf_counter()
    for width in args.width:
        params = DeviceParams(data_width=width)
        out = REPO / "build" / f"bench-{width}" / "results.json"
        try:
            run_cocotb("memballoon.tb.bench", "bench", params, testcase=["measure_commands"],
                       extra_env={**env, RESULTS_ENV: str(out)})
        except AssertionError as exc:
            print(f"bench failed at {width} bits: {exc}", file=sys.stderr)
            return 1
        by_width[width] = json.loads(out.read_text())
    print(table(by_width))
    print(f"\ntotal wall time (builds + runs): {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
