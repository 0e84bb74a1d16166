"""cocotb tests of the memballoon device (C5..C12) over cocotbext-pcie's root complex and
UltraScale+ model, driven by the driver model through the simulation backend.

Every scenario of ``tb/scenarios.py`` (the same code ``tests/test_scenarios.py`` runs on
the reference model) runs here on the RTL through :class:`~memballoon.tb.scoreboard.SimRig`;
``random_stream`` runs seeded random command streams on the RTL and the reference model
in lockstep (``tb/scoreboard.py``) and compares them bit for bit after every step; a
failure names its seed. Every test runs with the harness's idle and backpressure
inserters on every stream and the host's random read latency (``tb/host_latency.py``),
and ends by checking the hard IP model's error flags. The ``host_*`` tests check that host:
on its own (read-after-write, out-of-order answers, RCB split, bandwidth cap) and at the
device's ports (every read's round trip at least the latency; a slow first request of a
command's data answered after the requests behind it, the command still exact).

The pytest function at the bottom builds the DUT with ``SCENARIO_PARAMS`` per data width:
everything at 512 bits, ``SMOKE_TESTS`` at 256 bits (``TB_FULL=1`` runs everything at
both widths). :func:`index_wrap` pushes 65544 buffers through todevq, about 20 minutes
of this simulation, so it runs only with ``TB_WRAP=1``; the regular run checks the 16-bit
index arithmetic where it is cheap (an avail idx moved backwards is 65535 ahead, a
``used_event`` of 65535 right after reset, tests/test_scenarios.py wraps in full on the
model).
"""

import dataclasses
import os

import cocotb
import pytest
from cocotb.triggers import RisingEdge, Timer
from cocotb.utils import get_sim_time
from cocotbext.pcie.core import RootComplex
from cocotbext.pcie.core.tlp import CplStatus, Tlp, TlpType
from cocotbext.pcie.core.utils import PcieId

from memballoon import constants as c
from memballoon.refmodel import DEFAULT_RING_FEATURES
from memballoon.tb import scenarios
from memballoon.tb.harness import USER_CLK_FREQUENCY, MemballoonTb
from memballoon.tb.host_latency import HostLatency
from memballoon.tb.runner import params_from_env, run_cocotb
from memballoon.tb.scenarios import SCENARIO_PARAMS, SCENARIOS, RefRig
from memballoon.tb.scoreboard import (RQ_TYPE_MASK, RQ_TYPE_SHIFT, Lockstep, SimRig,
                                      random_stream)
from memballoon.virtio_pci_modern import VirtioPciModernDevice
from memballoon.virtio_ring import VringDesc

#: Simulated time a test may take (the completion-timeout fault waits 2**17 cycles).
TEST_TIMEOUT_US = 20000
#: Seeds of the lockstep random streams, and steps per stream.
SEEDS = range(6)
STREAM_STEPS = 40
#: Buffers through todevq in the index test: past the 16-bit wrap of avail and used idx.
WRAP_BUFFERS = (1 << 16) + 8


async def setup(dut):
    tb = MemballoonTb(dut, params_from_env())
    await tb.init()
    await tb.enumerate()
    return tb, SimRig(tb)


async def finish(tb):
    """End of every test: no error flagged by the model, no MSI-X message refused by the
    hard IP (C10 counter), the simulation speed in the log."""
    tb.check_errors()
    assert await tb.mgmt_read(c.MGMT_MSIX_FAILED) == 0, "hard IP refused MSI-X messages"
    cycles, wall, rate = tb.clock_rate()
    tb.log.info("%d user_clk cycles in %.2f s: %.0f cycles/s", cycles, wall, rate)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
@cocotb.parametrize(name=[cocotb.Param(name, name) for name in SCENARIOS])
async def run_scenario(dut, name):
    """One scenario of tb/scenarios.py on the RTL (see its docstring there)."""
    tb, rig = await setup(dut)
    scenario, kwargs = SCENARIOS[name]
    tb.log.info("scenario %s: %s", name, scenario.__doc__.splitlines()[0])
    await scenario(rig, **kwargs)
    await finish(tb)


async def ring_features(backend):
    """The ring features the RTL offers, so the reference model offers the same."""
    vdev = VirtioPciModernDevice(backend)
    await vdev.vp_modern_probe()
    offered = await vdev.vp_modern_get_features()
    return tuple(bit for bit in DEFAULT_RING_FEATURES if offered >> bit & 1)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
@cocotb.parametrize(seed=list(SEEDS))
async def lockstep_stream(dut, seed):
    """Seeded random command stream on the RTL and the reference model in lockstep:
    bitmap, counters, used rings, GET counts and fromdevq messages equal after every
    step (tb/scoreboard.py)."""
    tb, rig = await setup(dut)
    tb.log.info("lockstep random stream, seed %d", seed)
    ref = RefRig(tb.params, await ring_features(tb.backend))
    await random_stream(Lockstep(ref, rig), seed, STREAM_STEPS)
    await finish(tb)


@cocotb.test(timeout_time=200000, timeout_unit="us")
async def index_wrap(dut):
    """virtio 1.2 2.7: more than 65536 buffers through todevq: the 16-bit avail and used
    indices wrap and the device keeps up (a GIVE and a GET straddle the wrap)."""
    tb, rig = await setup(dut)
    await scenarios.index_wrap(rig, WRAP_BUFFERS, tb.params.max_queue_size)
    await finish(tb)


# --- the host's read latency (tb/host_latency.py) ------------------------------------------

#: Latencies the host tests set (ns): a fixed one, and a slow and a fast request.
HOST_LATENCY_NS = 800
SLOW_NS, FAST_NS = 2000, 100
#: The model test's reads by tag: a slow one, a fast one overtaking it, an unmapped one.
MODEL_LATENCY_BY_TAG = {2: SLOW_NS, 3: FAST_NS, 4: 2 * FAST_NS}
#: Completion bandwidth cap of the model test (bytes per ns).
HOST_BANDWIDTH = 1
NS_PER_CYCLE = 1e9 / USER_CLK_FREQUENCY
#: UltraScale+ descriptors (PG213, dword-aligned): RQ request tag, dword count and the
#: memory read type; RC completion tag and Request Completed.
RQ_TAG_SHIFT, RQ_DWORDS_SHIFT, RQ_DWORDS_MASK, RQ_TYPE_MEM_READ = 96, 64, 0x7FF, 0b0000
RC_TAG_SHIFT, RC_COMPLETED_BIT = 64, 30


class PortReads:
    """Memory reads as the device's ports see them, in ``user_clk`` cycles: per request
    (in RQ order) its address and dword count, the cycle its request beat was taken and
    the cycles of its first and last completion beats."""

    def __init__(self, dut):
        self.dut = dut
        self.requests = []
        self._open = {}                 # tag -> request waiting for its completions
        self.task = cocotb.start_soon(self._run())

    def _descriptor(self, name):
        dut = self.dut
        if getattr(dut, f"{name}_tvalid").value and getattr(dut, f"{name}_tready").value:
            return int(getattr(dut, f"{name}_tdata").value) & (1 << 128) - 1

    async def _run(self):
        cycle, rq_first, rc_first = 0, True, True
        while True:
            await RisingEdge(self.dut.user_clk)
            cycle += 1
            desc = self._descriptor("m_axis_rq")
            if desc is not None:
                if rq_first and desc >> RQ_TYPE_SHIFT & RQ_TYPE_MASK == RQ_TYPE_MEM_READ:
                    request = {"address": desc & (1 << 64) - 4,
                               "dwords": desc >> RQ_DWORDS_SHIFT & RQ_DWORDS_MASK,
                               "sent": cycle, "first": None, "last": None}
                    self.requests.append(request)
                    self._open[desc >> RQ_TAG_SHIFT & 0xFF] = request
                rq_first = bool(self.dut.m_axis_rq_tlast.value)
            desc = self._descriptor("s_axis_rc")
            if desc is not None:
                request = self._open.get(desc >> RC_TAG_SHIFT & 0xFF) if rc_first else None
                if request is not None:
                    request["first"] = request["first"] or cycle
                    if desc >> RC_COMPLETED_BIT & 1:
                        request["last"] = cycle
                        del self._open[desc >> RC_TAG_SHIFT & 0xFF]
                rc_first = bool(self.dut.s_axis_rc_tlast.value)

    def answered(self):
        self.task.cancel()
        assert not self._open, f"reads never completed: {list(self._open.values())}"
        return self.requests


def _holds(address, dwords, byte):
    """A read of ``dwords`` at ``address`` covers ``byte``."""
    return address <= byte < address + 4 * dwords


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def host_latency_model(dut):
    """The host alone, on a root complex with no device: a read answers with the memory
    as it was on arrival (the posted write before it in, the CPU write after it out),
    after its latency, split at RCB in order; a read with a shorter latency overtakes;
    an unmapped read gets UR after the latency; the bandwidth cap spaces completions."""
    rc = RootComplex()
    sent = []

    async def send(tlp):
        sent.append((get_sim_time("ns"), tlp))
    rc.send = send
    host = HostLatency(rc, None, HOST_LATENCY_NS)
    region = rc.mem_pool.alloc_region(0x1000)
    base = region.get_absolute_address(0)
    written = bytes(range(256)) * 2

    def request(fmt_type, tag, addr, length=None, data=None):
        tlp = Tlp()
        tlp.fmt_type, tlp.tag, tlp.requester_id = fmt_type, tag, PcieId(1, 0, 0)
        if data is None:
            tlp.set_addr_be(addr, length)
        else:
            tlp.set_addr_be_data(addr, data)
        return tlp

    await rc.handle_tlp(request(TlpType.MEM_WRITE_64, 0, base, data=written))
    arrival = get_sim_time("ns")
    await rc.handle_tlp(request(TlpType.MEM_READ_64, 1, base + 2, 510))
    await region.write(0, bytes(512))                   # after the read arrived
    await Timer(2 * HOST_LATENCY_NS, "ns")
    assert sent and all(t >= arrival + HOST_LATENCY_NS for t, _ in sent), sent
    assert len(sent) > 1, "a 510-byte read not split at max payload 128"
    assert [cpl.byte_count for _, cpl in sent] == sorted(
        (cpl.byte_count for _, cpl in sent), reverse=True), "completions out of order"
    data = b"".join(cpl.get_data() for _, cpl in sent)
    assert data[2:512] == written[2:], "the answer is not the memory on arrival"

    sent.clear()
    host.latency = lambda tlp: MODEL_LATENCY_BY_TAG[tlp.tag]
    await rc.handle_tlp(request(TlpType.MEM_READ_64, 2, base, 4))
    await rc.handle_tlp(request(TlpType.MEM_READ_64, 3, base, 4))
    await rc.handle_tlp(request(TlpType.MEM_READ_64, 4, 1 << 40, 4))
    await Timer(SLOW_NS + FAST_NS, "ns")
    assert [cpl.tag for _, cpl in sent] == [3, 4, 2], "the faster reads did not overtake"
    assert sent[1][1].status == CplStatus.UR

    sent.clear()
    host.latency, host.bandwidth = 0, HOST_BANDWIDTH
    start = get_sim_time("ns")
    await rc.handle_tlp(request(TlpType.MEM_READ_64, 5, base, 512))
    await Timer(2 * 512 / HOST_BANDWIDTH, "ns")
    times = [t - start for t, _ in sent]
    payloads = [cpl.get_payload_size() for _, cpl in sent]
    assert times == [sum(payloads[:k]) / HOST_BANDWIDTH for k in range(len(sent))], \
        f"completions at {times} ns for payloads {payloads} at {HOST_BANDWIDTH} B/ns"


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def host_latency_at_ports(dut):
    """Every read of a GIVE, from its request beat on RQ to its first completion beat on
    RC, takes at least the host's fixed latency."""
    tb, rig = await setup(dut)
    vb = await scenarios.probe(rig, pool_pages=1)
    await rig.settle()
    tb.host.latency = HOST_LATENCY_NS
    reads = PortReads(dut)
    await vb.give_pages([vb.pool.alloc_page()])
    await rig.settle()
    trips = [(r["first"] - r["sent"]) * NS_PER_CYCLE for r in reads.answered()]
    assert trips, "no read at the ports"
    assert min(trips) >= HOST_LATENCY_NS, f"round trips {trips} ns, latency {HOST_LATENCY_NS}"
    tb.log.info("%d reads, round trips %.0f..%.0f ns", len(trips), min(trips), max(trips))
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def host_out_of_order_at_ports(dut):
    """The first read request of a 512-page GIVE's data is answered after the requests
    behind it (out of order at the RC port); the device reassembles the data: the GIVE is
    used and the balloon holds its 512 pages."""
    tb, rig = await setup(dut)
    vb = await scenarios.probe(rig, pool_pages=0)
    vq = vb.todev_vq
    pages = [scenarios.page_addr(1024 + i) for i in range(512)]
    data = scenarios.cmd(scenarios.GIVE, *pages)
    buf = await vq.map_raw(data)
    await rig.settle()
    tb.host.latency = lambda tlp: SLOW_NS if _holds(tlp.address, tlp.length, buf) else FAST_NS
    reads = PortReads(dut)
    await vq.add_raw_chain([VringDesc(buf, len(data))], "give")
    await vq.virtqueue_notify()
    assert await scenarios.wait_used(rig, vq, 1) == [("give", 0)]
    await rig.settle()
    answered = reads.answered()
    first = next(i for i, r in enumerate(answered) if _holds(r["address"], r["dwords"], buf))
    overtaking = [r for r in answered[first + 1:] if r["last"] < answered[first]["first"]]
    assert overtaking, "no later read completed before the slow one"
    assert await scenarios.read_balloon_pages(rig) == len(pages)
    assert sorted(await scenarios.read_bitmap(rig, range(1024 // 32, 1536 // 32))) == \
        list(range(1024, 1024 + len(pages)))
    await finish(tb)


# --- pytest entry ---------------------------------------------------------------------------

HOST_TESTS = ["host_latency_model", "host_latency_at_ports", "host_out_of_order_at_ports"]
#: Everything but the long index wrap.
REGULAR_TESTS = [f"name={name}" for name in SCENARIOS] + [f"seed={seed}" for seed in SEEDS] \
    + HOST_TESTS
SMOKE_TESTS = ["name=commands", "name=malformed", "name=framing", "name=min_balloon_held",
               "name=fault_dma_read_ur", "name=fault_chain_loop", "name=reset_under_load",
               "name=dma_discipline", "name=atomic_get_pages_addresses", "name=intx_fallback",
               "seed=0", "host_out_of_order_at_ports"]


@pytest.mark.parametrize("data_width", [512, 256])
def test_memballoon(data_width):
    """Build the device at ``data_width`` and run its cocotb tests."""
    full = data_width == 512 or os.environ.get("TB_FULL") == "1"
    wrap = ["index_wrap"] if os.environ.get("TB_WRAP") == "1" else []
    run_cocotb("memballoon.tb.memballoon.test_memballoon", "test_memballoon",
               dataclasses.replace(SCENARIO_PARAMS, data_width=data_width),
               testcase=(REGULAR_TESTS if full else SMOKE_TESTS) + wrap)
