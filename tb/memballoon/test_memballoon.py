"""cocotb tests of the memballoon device (C5..C12) over cocotbext-pcie's root complex and
UltraScale+ model, driven by the driver model through the simulation backend.

Every scenario of ``tb/scenarios.py`` (the same code ``tests/test_scenarios.py`` runs on
the reference model) runs here on the RTL through :class:`~memballoon.tb.scoreboard.SimRig`;
``random_stream`` runs seeded random command streams on the RTL and the reference model
in lockstep (``tb/scoreboard.py``) and compares them bit for bit after every step; a
failure names its seed. Every test runs with the harness's idle and backpressure
inserters on every stream and ends by checking the hard IP model's error flags.

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

from memballoon import constants as c
from memballoon.refmodel import DEFAULT_RING_FEATURES
from memballoon.tb import scenarios
from memballoon.tb.harness import MemballoonTb
from memballoon.tb.runner import params_from_env, run_cocotb
from memballoon.tb.scenarios import SCENARIO_PARAMS, SCENARIOS, RefRig
from memballoon.tb.scoreboard import Lockstep, SimRig, random_stream
from memballoon.virtio_pci_modern import VirtioPciModernDevice

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


# --- pytest entry ---------------------------------------------------------------------------

#: Everything but the long index wrap.
REGULAR_TESTS = [f"name={name}" for name in SCENARIOS] + [f"seed={seed}" for seed in SEEDS]
SMOKE_TESTS = ["name=commands", "name=malformed", "name=framing", "name=min_balloon_held",
               "name=fault_dma_read_ur", "name=fault_chain_loop", "name=reset_under_load",
               "name=dma_discipline", "name=atomic_get_pages_addresses", "name=intx_fallback",
               "seed=0"]


@pytest.mark.parametrize("data_width", [512, 256])
def test_memballoon(data_width):
    """Build the device at ``data_width`` and run its cocotb tests."""
    full = data_width == 512 or os.environ.get("TB_FULL") == "1"
    wrap = ["index_wrap"] if os.environ.get("TB_WRAP") == "1" else []
    run_cocotb("memballoon.tb.memballoon.test_memballoon", "test_memballoon",
               dataclasses.replace(SCENARIO_PARAMS, data_width=data_width),
               testcase=(REGULAR_TESTS if full else SMOKE_TESTS) + wrap)
