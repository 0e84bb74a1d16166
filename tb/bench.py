"""``make bench``: throughput and latency of the balloon commands on the RTL against a host
with a server's memory read latency (a benchmark that prints tables, not a test).

``python -m memballoon.tb.bench [--width 512 256] [--latency 0 500 1000]`` builds the
device with the default :class:`~memballoon.params.DeviceParams` per width and runs the
cocotb test :func:`measure_commands` once per host latency: the harness's host
(``tb/host_latency.py``) answers every memory read after exactly that many ns, no jitter,
no bandwidth cap. Measured: GIVE, GET and EXCHANGE with 1, 64 and 512 pages per command
(EXCHANGE: that many pairs), 1 and 8 commands queued behind one doorbell, and 1-page GIVE
and GET with 64 and 256 queued in the 256-entry queue. Cycles are counted on
``user_clk`` at the device's ports, from the doorbell's beat on the CQ interface to the
RQ write that publishes the last used idx. Pages per clock are the command pages over
those cycles; the latency is the 1-page, 1-command figure. Steady state, for the deep
1-page rows and the 8-queued rows of 64 and 512 pages: the clocks between the first
used-idx write that publishes at least a quarter of the commands and the last one, over
the commands (pages) published in between: the pipeline's fill and the first round trips
are left out. Doorbell to last used idx includes at least three host round trips before
the first command's data (ring, descriptor, data) that no engine can hide; the steady
figure is the rate the engine sustains once they are paid. The idle/backpressure inserters of
the tests are off here: the figures are the device's, not the testbench's. Printed as
Markdown tables (for README), with the simulation speed; the pages per clock are also
plotted (PNG, path printed).
"""

import argparse
import json
import os
import pathlib
import sys
import time

import cocotb
from cocotb.triggers import RisingEdge
from matplotlib.figure import Figure

from memballoon import constants as c
from memballoon.params import DeviceParams
from memballoon.tb import scenarios as s
from memballoon.tb.harness import LINK_CONFIG, MemballoonTb
from memballoon.tb.runner import REPO, params_from_env, run_cocotb
from memballoon.tb.scoreboard import RQ_TYPE_MASK, RQ_TYPE_MEM_WRITE, RQ_TYPE_SHIFT, SimRig

KINDS = (s.GIVE, s.GET, s.EXCHANGE)
KIND_NAMES = {s.GIVE: "GIVE", s.GET: "GET", s.EXCHANGE: "EXCHANGE"}
SIZES = (1, 64, 512)
DEPTHS = (1, 8)
#: Sizes of the 8-queued rows measured in steady state too.
STEADY_SIZES = (64, 512)
#: 1-page commands queued deep: (kind, queued), measured in steady state too.
DEEP = tuple((kind, depth) for kind in (s.GIVE, s.GET) for depth in (64, 256))
#: Host memory read latencies measured (ns, fixed).
LATENCIES_NS = (0, 500, 1000)
RESULTS_ENV = "MEMBALLOON_BENCH_RESULTS"
LATENCY_ENV = "MEMBALLOON_BENCH_LATENCY_NS"
#: Where in the RQ write's first beat (PG213, dword-aligned mode) the payload starts.
RQ_DESCRIPTOR_BYTES = 16


class UsedIdxWatch:
    """Counts ``user_clk`` cycles from the next CQ beat (the doorbell) until the device
    writes ``base + count`` into the used idx at ``used_addr`` over RQ; ``writes`` lists
    each used idx write as (cycles, commands published since ``base``)."""

    def __init__(self, dut, used_addr, base, count):
        self.dut = dut
        self.idx_addr = used_addr + c.VRING_USED_IDX
        self.base = base
        self.count = count
        self.writes = []
        self.task = cocotb.start_soon(self._run())

    def _used_idx(self, tlp):
        """The used idx a write TLP (descriptor and payload) sets, or None."""
        desc = int.from_bytes(tlp[:RQ_DESCRIPTOR_BYTES], "little")
        if desc >> RQ_TYPE_SHIFT & RQ_TYPE_MASK != RQ_TYPE_MEM_WRITE:
            return None
        base = desc & ~3 & (1 << 64) - 1
        at = RQ_DESCRIPTOR_BYTES + self.idx_addr - base
        if not RQ_DESCRIPTOR_BYTES <= at <= len(tlp) - 2:
            return None
        return int.from_bytes(tlp[at:at + 2], "little")

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
                    idx, beats = self._used_idx(b"".join(beats)), []
                    if idx is not None:
                        self.writes.append((cycle - start, idx - self.base & 0xFFFF))
                        if self.writes[-1][1] == self.count:
                            return cycle - start


def steady_cycles_per_command(writes, count):
    """Clocks per command between the first used idx write that publishes a quarter of
    ``count`` and the last one (see the module docstring); None when that write is the
    last."""
    start_cycle, start_count = next((t, n) for t, n in writes if n >= count // 4)
    end_cycle, end_count = writes[-1]
    if end_count == start_count:
        return None
    return (end_cycle - start_cycle) / (end_count - start_count)


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
        """``depth`` commands of ``size`` pages behind one doorbell: the cycles to the last
        used idx and the used idx writes (:class:`UsedIdxWatch`)."""
        vb, vq = self.vb, self.vb.todev_vq
        wanted = [self.pages(size) for _ in range(depth)]
        if kind != s.GIVE:                              # set-up, not measured
            await vb.give_pages([page for command in wanted for page in command])
        if kind == s.GIVE:
            commands = [(s.cmd(s.GIVE, *pages), 0) for pages in wanted]
        elif kind == s.GET:
            commands = [(s.cmd(s.GET, *pages), s.GET_RESULT) for pages in wanted]
        else:
            commands = [(s.cmd(s.EXCHANGE, *pages, *self.pages(size)), 0) for pages in wanted]
        for i, (data, writable) in enumerate(commands):
            sgs = [(data, False)] + ([(writable, True)] if writable else [])
            await vq.virtqueue_add_sgs(sgs, i)
        watch = UsedIdxWatch(self.rig.tb.dut, vq.used.iova, vq.last_used_idx, depth)
        await vq.virtqueue_notify()
        cycles = await watch.task
        used = await s.wait_used(self.rig, vq, depth)
        expected = s.GET_RESULT if kind == s.GET else 0
        assert used == [(i, expected) for i in range(depth)], used
        await self.rig.settle()
        return cycles, watch.writes


@cocotb.test(timeout_time=1000000, timeout_unit="us")
async def measure_commands(dut):
    """Every row of the tables at the host latency in MEMBALLOON_BENCH_LATENCY_NS; results
    to the JSON file the runner names in MEMBALLOON_BENCH_RESULTS."""
    tb = MemballoonTb(dut, params_from_env(), host_latency=int(os.environ[LATENCY_ENV]))
    for stream in (tb.dev.cq_source, tb.dev.rc_source, tb.dev.cc_sink, tb.dev.rq_sink):
        stream.clear_pause_generator()
    await tb.init()
    await tb.enumerate()
    rig = SimRig(tb)
    vb = await s.probe(rig, pool_pages=0, max_pages_per_cmd=max(SIZES))
    assert vb.todev_vq.num == max(depth for _, depth in DEEP), "the deep rows fill the queue"
    bench = Bench(rig, vb)
    start_cycles, start_wall = tb.clock_rate()[:2]
    results = []
    rows = [(kind, size, depth) for kind in KINDS for size in SIZES for depth in DEPTHS]
    for kind, size, depth in rows + [(kind, 1, depth) for kind, depth in DEEP]:
        cycles, writes = await bench.run(kind, size, depth)
        result = {"kind": KIND_NAMES[kind], "size": size, "depth": depth, "cycles": cycles}
        if (kind, depth) in DEEP or (depth > 1 and size in STEADY_SIZES):
            result["steady"] = steady_cycles_per_command(writes, depth)
        results.append(result)
    cycles, wall, _ = tb.clock_rate()
    tb.check_errors()
    pathlib.Path(os.environ[RESULTS_ENV]).write_text(json.dumps({
        "results": results, "sim_cycles": cycles - start_cycles,
        "wall": wall - start_wall}))


def _keyed(data):
    return {(r["kind"], r["size"], r["depth"]): r for r in data["results"]}


def table(width, by_latency):
    """Markdown tables of one width's results, a column pair per host latency."""
    latencies = list(by_latency)
    keyed = {ns: _keyed(by_latency[ns]) for ns in latencies}
    head = "| command | pages/cmd | queued | " + " | ".join(
        f"{ns} ns: clocks | pages/clk | steady" for ns in latencies) + " |"
    rows = [head, "|---|---:|---:|" + "---:|---:|---:|" * len(latencies)]

    def steady(result, size):
        clocks = result.get("steady")
        return "–" if clocks is None or size == 1 else f"{size / clocks:.3f}"

    for key in keyed[latencies[0]]:
        cells = [f"{keyed[ns][key]['cycles']} | "
                 f"{key[1] * key[2] / keyed[ns][key]['cycles']:.3f} | "
                 f"{steady(keyed[ns][key], key[1])}" for ns in latencies]
        rows.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    generation, lanes = LINK_CONFIG[width]
    lines = [f"{width} bits (Gen{generation} x{lanes}), host read latency fixed per column:",
             "", *rows, "",
             "Steady state, 1-page commands in the 256-entry queue, clocks per command:", "",
             "| command | queued | " + " | ".join(f"{ns} ns" for ns in latencies) + " |",
             "|---|---:|" + "---:|" * len(latencies)]
    for kind, depth in DEEP:
        key = (KIND_NAMES[kind], 1, depth)
        lines.append(f"| {key[0]} | {depth} | " + " | ".join(
            f"{keyed[ns][key]['steady']:.1f}" for ns in latencies) + " |")
    lines += ["", "Steady: pages per clock once the pipeline is full (module docstring)."]
    lines += ["", "Doorbell-to-used latency, 1 page, 1 command, clocks:", "",
              "| command | " + " | ".join(f"{ns} ns" for ns in latencies) + " |",
              "|---|" + "---:|" * len(latencies)]
    for kind in KINDS:
        key = (KIND_NAMES[kind], 1, 1)
        lines.append(f"| {key[0]} | " + " | ".join(
            str(keyed[ns][key]["cycles"]) for ns in latencies) + " |")
    speeds = ", ".join(f"{ns} ns {d['sim_cycles'] / d['wall']:.0f}"
                       for ns, d in by_latency.items())
    lines += ["", "EXCHANGE sizes are pairs (N wanted + N given). Clocks: user_clk (250 MHz) "
              "from the doorbell's CQ beat to the RQ write of the last used idx; no "
              "idle/backpressure insertion. Simulation, user_clk cycles per wall second: "
              f"{speeds}."]
    return "\n".join(lines)


def plot(width, by_latency, path):
    """Pages per clock against pages per command, a line per host latency and depth, a
    panel per command; written to ``path``."""
    figure = Figure(figsize=(13, 4.2))
    axes = figure.subplots(1, len(KINDS), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for color, (ns, data) in enumerate(by_latency.items()):
            keyed = _keyed(data)
            for depth, style in zip(DEPTHS, (":", "-")):
                rates = [size * depth / keyed[(KIND_NAMES[kind], size, depth)]["cycles"]
                         for size in SIZES]
                ax.plot(SIZES, rates, style, marker="o", color=f"C{color}",
                        label=f"{ns} ns, {depth} queued")
        ax.set_xscale("log", base=2)
        ax.set_xticks(SIZES, [str(size) for size in SIZES])
        ax.set_title(KIND_NAMES[kind] + (" (pairs)" if kind == s.EXCHANGE else ""))
        ax.set_xlabel("pages per command")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("pages per clock")
    axes[-1].legend(fontsize=8)
    figure.suptitle(f"memballoon {width} bits: pages per clock against host read latency")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, nargs="+", choices=(512, 256), default=[512],
                        help="AXI-stream data widths to measure")
    parser.add_argument("--latency", type=int, nargs="+", default=list(LATENCIES_NS),
                        help="host memory read latencies, ns (fixed, one run each)")
    args = parser.parse_args()
    env = {"COCOTB_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    start = time.perf_counter()
    for width in args.width:
        params = DeviceParams(data_width=width)
        out = REPO / "build" / f"bench-{width}"
        by_latency = {}
        for ns in args.latency:
            results = out / f"results-{ns}ns.json"
            try:
                run_cocotb("memballoon.tb.bench", "bench", params,
                           testcase=["measure_commands"],
                           extra_env={**env, RESULTS_ENV: str(results), LATENCY_ENV: str(ns)})
            except AssertionError as exc:
                print(f"bench failed at {width} bits, {ns} ns: {exc}", file=sys.stderr)
                return 1
            by_latency[ns] = json.loads(results.read_text())
        print(table(width, by_latency))
        figure = out / "pages_per_clock.png"
        plot(width, by_latency, figure)
        print(f"\nplot: {figure}\n")
    print(f"total wall time (builds + runs): {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
