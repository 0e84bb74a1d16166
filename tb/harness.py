"""Testbench of ``memballoon_usp``: root complex, UltraScale+ hard IP model, management port.

Layout after verilog-pcie/Corundum testbenches: :class:`MemballoonTb` builds a
cocotbext-pcie ``RootComplex`` and an ``UltraScalePlusPcieDevice`` configured from
:class:`~memballoon.params.DeviceParams` (Gen3 x16 at 512 bits, Gen3 x8 at 256 bits; BAR0
64-bit of ``params.bar.size``; MSI-X with the table and PBA in BAR0 held by the DUT; the
cfg_ext window of ``tb/cfg_ext.py``; INTA of ``tb/intx.py``), connects the DUT by port prefixes, and keeps idle
and backpressure inserters running on every AXI stream and on the AXI4-Lite management
master for the whole test. The model drives ``user_clk`` (250 MHz) and ``user_reset`` as
the hard IP does. The root complex answers memory reads after a host's latency
(``tb/host_latency.py``): by default a random one per request, ``TEST_HOST_LATENCY_NS``,
drawn from the test's seed (``tb/seed.py``: a CRC of the cocotb test's name, ``SEED=n``
replays), which the log names.
"""

import itertools
import logging
import random
import time

from cocotb.task import current_task
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotb.utils import get_sim_time
from cocotbext.axi import AxiLiteBus, AxiLiteMaster, AxiStreamBus
from cocotbext.pcie.core import RootComplex
from cocotbext.pcie.core.tlp import Tlp, TlpType
from cocotbext.pcie.core.utils import PcieId
from cocotbext.pcie.xilinx.us import UltraScalePlusPcieDevice
from cocotbext.pcie.xilinx.us.tlp import Tlp_us

from memballoon import constants as c
from memballoon.backend_sim import SimBackend
from memballoon.hdl.pcie.usp_shim import MAX_PAYLOAD_BYTES
from memballoon.params import DeviceParams

from .cfg_ext import CfgExtWindow
from .host_latency import HostLatency
from .intx import IntxWire
from .seed import seed_for

__all__ = ["MemballoonTb", "pause_pattern"]

#: Hard IP link configuration per AXI-stream width (a valid cocotbext-pcie combination).
LINK_CONFIG = {512: (3, 16), 256: (3, 8)}
USER_CLK_FREQUENCY = 250e6
#: The host's memory read latency in tests (ns, uniform per request): a server's
#: 400-1000 ns and shorter, so that completions of different requests often overtake
#: each other.
TEST_HOST_LATENCY_NS = (50, 1000)


def pause_pattern(period, paused):
    """An endless pause pattern: ``paused`` cycles of pause in every ``period``."""
    return itertools.cycle([1] * paused + [0] * (period - paused))


#: (period, paused) per stream; periods differ so the inserters never run in lockstep.
IDLE_PATTERNS = {"cq": (3, 1), "rc": (5, 2), "aw": (4, 1), "w": (5, 2), "ar": (3, 1)}
BACKPRESSURE_PATTERNS = {"cc": (7, 3), "rq": (3, 1), "b": (4, 1), "r": (5, 2)}


class MemballoonTb:
    """One DUT instance with its PCIe host and management master; ``host_latency`` and
    ``host_bandwidth`` are :class:`~memballoon.tb.host_latency.HostLatency`'s."""

    def __init__(self, dut, params: DeviceParams, host_latency=TEST_HOST_LATENCY_NS,
                 host_bandwidth=None):
        self.dut = dut
        self.params = params
        self.log = logging.getLogger("cocotb.tb")
        self.log.setLevel(logging.INFO)

        generation, lanes = LINK_CONFIG[params.data_width]
        self.rc = RootComplex()
        self.seed = seed_for(current_task().get_name())
        self.host = HostLatency(self.rc, random.Random(self.seed), host_latency,
                                host_bandwidth)
        self.log.info("host: %s, seed %d (SEED=%d replays)", self.host.describe(),
                      self.seed, self.seed)
        self.dev = UltraScalePlusPcieDevice(
            pcie_generation=generation,
            pcie_link_width=lanes,
            user_clk_frequency=USER_CLK_FREQUENCY,
            alignment="dword",
            cq_straddle=False,
            cc_straddle=False,
            rq_straddle=False,
            rc_straddle=False,
            rc_4tlp_straddle=False,
            pf_count=1,
            max_payload_size=MAX_PAYLOAD_BYTES,
            enable_client_tag=True,
            enable_extended_tag=True,
            enable_parity=False,
            enable_rx_msg_interface=False,
            enable_sriov=False,
            enable_extended_configuration=False,
            pf0_msi_enable=False,
            pf0_msix_enable=True,
            pf0_msix_table_size=params.msix_vectors - 1,     # N-1 encoding
            pf0_msix_table_bir=0,
            pf0_msix_table_offset=params.bar.msix_table,
            pf0_msix_pba_bir=0,
            pf0_msix_pba_offset=params.bar.msix_pba,

            user_clk=dut.user_clk,
            user_reset=dut.user_reset,
            rq_bus=AxiStreamBus.from_prefix(dut, "m_axis_rq"),
            rc_bus=AxiStreamBus.from_prefix(dut, "s_axis_rc"),
            cq_bus=AxiStreamBus.from_prefix(dut, "s_axis_cq"),
            pcie_cq_np_req=dut.pcie_cq_np_req,
            pcie_cq_np_req_count=dut.pcie_cq_np_req_count,
            cc_bus=AxiStreamBus.from_prefix(dut, "m_axis_cc"),
            cfg_max_payload=dut.cfg_max_payload,
            cfg_max_read_req=dut.cfg_max_read_req,
            cfg_function_status=dut.cfg_function_status,
            cfg_flr_in_process=dut.cfg_flr_in_process,
            cfg_flr_done=dut.cfg_flr_done,
            cfg_interrupt_msix_enable=dut.cfg_interrupt_msix_enable,
            cfg_interrupt_msix_mask=dut.cfg_interrupt_msix_mask,
            cfg_interrupt_msix_address=dut.cfg_interrupt_msix_address,
            cfg_interrupt_msix_data=dut.cfg_interrupt_msix_data,
            cfg_interrupt_msix_int=dut.cfg_interrupt_msix_int,
            cfg_interrupt_msix_sent=dut.cfg_interrupt_msix_sent,
            cfg_interrupt_msix_fail=dut.cfg_interrupt_msix_fail,
            cfg_interrupt_msi_function_number=dut.cfg_interrupt_msi_function_number,
            cfg_interrupt_int=dut.cfg_interrupt_int,
            cfg_interrupt_pending=dut.cfg_interrupt_pending,
            cfg_interrupt_sent=dut.cfg_interrupt_sent,
            cfg_ext_read_received=dut.cfg_ext_read_received,
            cfg_ext_write_received=dut.cfg_ext_write_received,
            cfg_ext_register_number=dut.cfg_ext_register_number,
            cfg_ext_function_number=dut.cfg_ext_function_number,
            cfg_ext_write_data=dut.cfg_ext_write_data,
            cfg_ext_write_byte_enable=dut.cfg_ext_write_byte_enable,
            cfg_ext_read_data=dut.cfg_ext_read_data,
            cfg_ext_read_data_valid=dut.cfg_ext_read_data_valid,
        )
        # The model leaves cfg_flr_in_process undriven; no FLR unless a test starts one.
        dut.cfg_flr_in_process.value = 0

        self.function = self.dev.functions[0]
        self.function.vendor_id = c.PCI_VENDOR_ID_REDHAT_QUMRANET
        self.function.device_id = c.MEMBALLOON_PCI_DEVICE_ID
        self.function.revision_id = c.MEMBALLOON_PCI_REVISION_ID
        self.function.class_code = c.PCI_CLASS_MEMORY_OTHER
        self.function.subsystem_vendor_id = c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID
        self.function.subsystem_id = c.MEMBALLOON_PCI_SUBSYSTEM_ID
        # Non-prefetchable: common configuration and ISR have read side effects.
        self.function.configure_bar(0, params.bar.size, ext=True, prefetch=False)
        self.cfg_ext = CfgExtWindow(self.dev, self.function,
                                    params.cfg_ext_base, params.cfg_ext_size)
        self.intx = IntxWire(self.dev, self.function)

        self.rc.make_port().connect(self.dev)

        self.mgmt = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil_mgmt"),
                                  dut.user_clk, dut.user_reset)

        self._start_inserters()

        self.pci_dev = None
        self.backend = None
        self._start_sim_ns = get_sim_time("ns")
        self._start_wall = time.perf_counter()

    def _start_inserters(self):
        """Idle on every source, backpressure on every sink, for the whole test."""
        wr, rd = self.mgmt.write_if, self.mgmt.read_if
        sources = {"cq": self.dev.cq_source, "rc": self.dev.rc_source,
                   "aw": wr.aw_channel, "w": wr.w_channel, "ar": rd.ar_channel}
        sinks = {"cc": self.dev.cc_sink, "rq": self.dev.rq_sink,
                 "b": wr.b_channel, "r": rd.r_channel}
        for name, stream in sources.items():
            stream.set_pause_generator(pause_pattern(*IDLE_PATTERNS[name]))
        for name, stream in sinks.items():
            stream.set_pause_generator(pause_pattern(*BACKPRESSURE_PATTERNS[name]))

    async def init(self):
        """Wait for the model's power-on reset of the user logic to end."""
        await RisingEdge(self.dut.user_clk)
        if not self.dut.user_reset.value:
            await RisingEdge(self.dut.user_reset)
        await FallingEdge(self.dut.user_reset)
        await ClockCycles(self.dut.user_clk, 10)

    async def enumerate(self):
        """Enumerate the bus, enable memory space and bus mastering, and make the
        driver backend for the function."""
        await self.rc.enumerate()
        self.pci_dev = self.rc.find_device(self.function.pcie_id)
        await self.pci_dev.enable_device()
        await self.pci_dev.set_master()
        self.backend = SimBackend(self.rc, self.pci_dev, intx=self.intx)
        await self.wait_power_on_clear()
        return self.backend

    async def wait_power_on_clear(self):
        """A host enumerates long after the FPGA came up; here enumeration is quicker
        than the power-on clear of the bitmap (C9), so wait for device_status to read 0
        as a driver's reset would."""
        status = self.params.bar.common_cfg + c.VIRTIO_PCI_COMMON_STATUS
        for _ in range(self.reset_cycles() // 8):
            if not await self.backend.bar_read(0, status, 1):
                return
        raise AssertionError("device_status stays non-zero after power-on (C9)")

    def reset_cycles(self):
        """Clock cycles a reset may take: the bitmap clear (64 pages a cycle) and slack."""
        return self.params.bitmap_pages // 64 + 1000

    # --- host management port (C10) ------------------------------------------------------

    async def mgmt_read(self, addr):
        resp = await self.mgmt.read(addr, 4)
        assert resp.resp == 0, f"mgmt read {addr:#05x}: response {resp.resp!r}"
        return int.from_bytes(resp.data, "little")

    async def mgmt_write(self, addr, value):
        resp = await self.mgmt.write(addr, value.to_bytes(4, "little"))
        assert resp.resp == 0, f"mgmt write {addr:#05x}: response {resp.resp!r}"

    # --- function-level reset ------------------------------------------------------------

    async def flr_handshake(self, timeout_cycles=None):
        """The hard IP's side of an FLR of PF0 (PG213): ``cfg_flr_in_process[0]`` high
        until the user logic answers with ``cfg_flr_done[0]``. The model does not reset
        its own configuration state; the host restores it anyway (``pci_reset_function``
        saves and restores configuration space around the FLR)."""
        clock = RisingEdge(self.dut.user_clk)
        await clock
        self.dut.cfg_flr_in_process.value = 1
        timeout_cycles = timeout_cycles or self.reset_cycles()
        for _ in range(timeout_cycles):
            await clock
            if int(self.dut.cfg_flr_done.value) & 1:
                break
        else:
            raise AssertionError(f"cfg_flr_done[0] not asserted within {timeout_cycles} "
                                 "cycles of cfg_flr_in_process[0]")
        self.dut.cfg_flr_in_process.value = 0
        await clock

    async def restore_msix_table(self):
        """Rewrite every MSI-X table entry from the host's vectors, unmasked, as Linux's
        ``pci_restore_msi_state`` does after a reset; a read flushes the writes."""
        table = self.params.bar.msix_table
        for k, vector in enumerate(self.pci_dev.msi_vectors[:self.params.msix_vectors]):
            entry = table + k * c.PCI_MSIX_ENTRY_SIZE
            await self.backend.bar_write(0, entry + c.PCI_MSIX_ENTRY_LOWER_ADDR,
                                         vector.addr & 0xFFFFFFFF, 4)
            await self.backend.bar_write(0, entry + c.PCI_MSIX_ENTRY_UPPER_ADDR,
                                         vector.addr >> 32, 4)
            await self.backend.bar_write(0, entry + c.PCI_MSIX_ENTRY_DATA, vector.data, 4)
            await self.backend.bar_write(0, entry + c.PCI_MSIX_ENTRY_VECTOR_CTRL, 0, 4)
        await self.backend.bar_read(0, table, 4)

    # --- checks ---------------------------------------------------------------------------

    def check_errors(self, expect_ur=False):
        """Fail on anything the hard IP model flagged: local errors (dropped TLPs, buffer
        overflows), target/master aborts and poisoned data on the function, and INTA
        edges that did not wait for cfg_interrupt_sent (PG213)."""
        errors = []
        while not self.dev.local_error.empty():
            errors.append(f"local error {self.dev.local_error.get_nowait()!r}")
        fn = self.function
        for flag in ("signaled_target_abort", "received_target_abort",
                     "master_data_parity_error", "signaled_system_error",
                     "detected_parity_error"):
            if getattr(fn, flag):
                errors.append(flag)
        if fn.received_master_abort and not expect_ur:
            errors.append("received_master_abort")
        if self.intx.protocol_errors:
            errors.append(f"{self.intx.protocol_errors} INTA changes before cfg_interrupt_sent")
        assert not errors, f"hard IP model reports: {', '.join(errors)}"

    async def inject_cq_request(self, fmt_type, bar_id, offset, length=1, data=None,
                                discontinue=False, timeout_ns=20000):
        """Hand a request straight to the CQ interface, as the hard IP would after its
        BAR decode, and return the completions the DUT sends to the root complex.

        For requests the model itself never forwards (I/O to a memory-only function, a
        BAR the hard IP would not decode, a locked read) and for ``discontinue``, which
        the model's CQ source sets on the TLP's last beat as the IP does after an internal
        error: the DUT must still answer non-posted ones, except a discontinued one.
        """
        req = Tlp()
        req.fmt_type = fmt_type
        req.requester_id = PcieId(0, 0, 0)
        req.completer_id = self.function.pcie_id
        if data is None:
            req.set_addr_be(offset, length * 4)
        else:
            req.set_addr_be_data(offset, data)
        nonposted = fmt_type in {TlpType.MEM_READ, TlpType.MEM_READ_64, TlpType.MEM_READ_LOCKED,
                                 TlpType.MEM_READ_LOCKED_64, TlpType.IO_READ,
                                 TlpType.IO_WRITE}
        if nonposted:
            req.tag = await self.rc.alloc_tag()
        req = Tlp_us(req)
        req.bar_id = bar_id
        req.bar_aperture = (self.params.bar.size - 1).bit_length()
        req.discontinue = discontinue
        self.dev.cq_queue.put_nowait(req)
        if not nonposted:
            return []
        cpl = await self.rc.recv_cpl(req.tag, timeout_ns, "ns")
        self.rc.release_tag(req.tag)
        return [cpl] if cpl else []

    # --- performance ----------------------------------------------------------------------

    def clock_rate(self):
        """(user_clk cycles simulated, wall seconds, cycles per wall second) so far."""
        cycles = (get_sim_time("ns") - self._start_sim_ns) * USER_CLK_FREQUENCY * 1e-9
        wall = time.perf_counter() - self._start_wall
        return cycles, wall, cycles / wall if wall else 0.0
