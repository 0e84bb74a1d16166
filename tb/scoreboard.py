"""Lockstep comparison of the RTL with the reference model, and the RTL as a scenario rig.

:class:`SimRig` is the RTL over the PCIe model (``tb/harness.py``) as a
:class:`~memballoon.tb.scenarios.Rig`: the management port is the harness's AXI4-Lite
master; every memory request the device sends to the root complex is logged exact to the
byte (C12) and can be made to fail (C7): an Unsupported Request or Completer Abort
completion, or no completion at all. A posted write cannot fail on PCIe except by Bus
Master Enable going low under the device, so :meth:`SimRig.fail_writes_after` holds the
RQ interface from the last read of a given range on, waits for the device to present a
write there, and then drops Bus Master Enable: that write is dropped by the hard IP and
the next one cannot be issued.

SimRig wraps the read handler of the harness's host (``tb/host_latency.py``), so it sees
every read when it arrives, before the host's latency: ``dma_log`` is in the order the
device sent its requests. An injected UR or CA answer goes out after the request's host
latency, as the host's own answer would (:meth:`HostLatency.complete`); a timed-out read
is never answered.

:class:`Lockstep` drives two rigs with the same operations, each through its own driver
model, and after every step compares what the contract fixes: the bitmap (read over the
management port), ``balloon_pages``, the balloon counters, device status, fault info and
return budget, both used areas byte for byte, the results the driver got (GET counts,
used lengths, MIN_BALLOON values) and the driver's own view of the balloon.
:func:`random_stream` is the seeded stream it runs; a mismatch raises
:class:`ScoreboardMismatch` naming the seed and step.
"""

import itertools
import random

import cocotb
from cocotb.triggers import ClockCycles, Event, RisingEdge
from cocotbext.pcie.core.tlp import Tlp, TlpType
from cocotbext.pcie.core.utils import PcieId

from memballoon import constants as c
from memballoon.hdl.pcie.dma import COMPLETION_TIMEOUT_CYCLES
from memballoon.virtio_memballoon import DeviceNeedsReset
from memballoon.virtio_ring import VringDesc

from . import scenarios as s
from .harness import BACKPRESSURE_PATTERNS, pause_pattern
from .scenarios import Rig

__all__ = ["SimRig", "Lockstep", "ScoreboardMismatch", "random_stream"]

#: user_clk cycles in a row :meth:`SimRig.settle` lets pass with no read waiting for the
#: host (the device finishing a used-ring update or an interrupt after the driver saw the
#: buffer; a request that follows an answer comes well within them).
SETTLE_CYCLES = 200
#: How many times a comparison settles and looks again before it calls a difference real.
SETTLE_TRIES = 20
#: UltraScale+ RQ descriptor (PG213): request type bits of the first beat.
RQ_TYPE_SHIFT, RQ_TYPE_MASK, RQ_TYPE_MEM_WRITE = 75, 0xF, 0b0001
#: Cycles Bus Master Enable is low before the RQ interface runs again: the hard IP model
#: updates cfg_function_status on its next clock, the device samples it after that.
BME_SETTLE_CYCLES = 4
#: Management reads of the fault info, at most, before Bus Master Enable comes back after
#: a write fault was injected (each a few dozen cycles).
FAULT_SEEN_POLLS = 100


class SimRig(Rig):
    """The RTL of one :class:`~memballoon.tb.harness.MemballoonTb` after enumeration."""

    def __init__(self, tb):
        self.tb = tb
        self.backend = tb.backend
        self.params = tb.params
        self.dma_log = []
        self._read_faults = []
        self._trigger = None            # end address of the read that holds RQ
        self._armed = None              # set once that read came
        self._fired = None              # the task that drops bus mastering
        rc = tb.rc
        self._read = rc.rx_tlp_handler[TlpType.MEM_READ]
        self._write = rc.rx_tlp_handler[TlpType.MEM_WRITE]
        for fmt_type in (TlpType.MEM_READ, TlpType.MEM_READ_64):
            rc.register_rx_tlp_handler(fmt_type, self._on_read)
        for fmt_type in (TlpType.MEM_WRITE, TlpType.MEM_WRITE_64):
            rc.register_rx_tlp_handler(fmt_type, self._on_write)

    async def mgmt_read(self, offset):
        return await self.tb.mgmt_read(offset)

    async def mgmt_write(self, offset, value):
        await self.tb.mgmt_write(offset, value)

    @staticmethod
    def _span(tlp):
        return tlp.address + tlp.get_first_be_offset(), tlp.get_be_byte_count()

    async def _on_read(self, tlp):
        addr, length = self._span(tlp)
        self.dma_log.append(("r", addr, length))
        for start, end, how in self._read_faults:
            if addr < end and start < addr + length:
                if how == "timeout":
                    cocotb.start_soon(self._timed_out(tlp))
                    return
                make = Tlp.create_ur_completion_for_tlp if how == "UR" else \
                    Tlp.create_ca_completion_for_tlp
                self.tb.host.complete(tlp, [make(tlp, PcieId(0, 0, 0))])
                return
        if self._trigger is not None and addr < self._trigger <= addr + length:
            self._trigger = None
            self.tb.dev.rq_sink.set_pause_generator(itertools.repeat(1))
            self._fired = cocotb.start_soon(self._drop_bus_master())
            self._armed.set()
        await self._read(tlp)

    async def _on_write(self, tlp):
        addr, length = self._span(tlp)
        msi = any(region is self.tb.rc.msi_region for *_, region in
                  self.tb.rc.mem_address_space.find_regions(addr, length))
        if not msi:
            self.dma_log.append(("w", addr, length))
        await self._write(tlp)

    async def _timed_out(self, tlp):
        """A request the host never answers: once the device's completion timeout has
        passed (3/4 of it at the earliest) its tag is the device's again, as PCIe lets a
        requester reuse it; the model stops tracking it then, not before."""
        await ClockCycles(self.tb.dut.user_clk, COMPLETION_TIMEOUT_CYCLES * 3 // 4)
        dev = self.tb.dev
        dev.active_request[tlp.tag] = None
        dev.cpld_credit_count = max(dev.cpld_credit_count - tlp.get_data_credits(), 0)

    def fail_reads(self, addr, length, how="UR"):
        if how not in ("UR", "CA", "timeout"):
            raise ValueError(f"a read fails by UR, CA or timeout, not {how!r}")
        self._read_faults.append((addr, addr + length, how))

    def fail_writes_after(self, addr, length, passing=0):
        self._trigger = addr + length
        self._passing = passing
        self._armed = Event()

    async def _drop_bus_master(self):
        """RQ is held: once the device presents a memory write (after ``passing`` more,
        each let through alone), clear Bus Master Enable as the host's command-register
        write would, then let RQ run again."""
        dut = self.tb.dut
        sink = self.tb.dev.rq_sink
        while True:
            await RisingEdge(dut.user_clk)
            if dut.m_axis_rq_tvalid.value and int(dut.m_axis_rq_tdata.value) >> \
                    RQ_TYPE_SHIFT & RQ_TYPE_MASK == RQ_TYPE_MEM_WRITE:
                if not self._passing:
                    break
                self._passing -= 1
                sink.set_pause_generator(None)
                sink.pause = False
                while True:
                    await RisingEdge(dut.user_clk)
                    if dut.m_axis_rq_tvalid.value and dut.m_axis_rq_tready.value and \
                            dut.m_axis_rq_tlast.value:
                        break
                sink.set_pause_generator(itertools.repeat(1))
        self.tb.function.bus_master_enable = False
        await ClockCycles(dut.user_clk, BME_SETTLE_CYCLES)
        self.tb.dev.rq_sink.set_pause_generator(pause_pattern(*BACKPRESSURE_PATTERNS["rq"]))

    async def clear_faults(self):
        self._read_faults = []
        if self._armed is not None:
            await self._armed.wait()
            await self._fired
            self._armed = self._fired = None
            # Bus mastering comes back once the device has seen a write fail (C7, the
            # management port works without it), so the injection does not depend on
            # how soon the device's next write follows the dropped one.
            for _ in range(FAULT_SEEN_POLLS):
                if await self.mgmt_read(c.MGMT_FAULT_INFO):
                    break
            self.tb.function.bus_master_enable = True

    async def flr(self):
        await self.tb.flr_handshake()
        await self.tb.restore_msix_table()

    async def settle(self):
        """SETTLE_CYCLES in a row with no read waiting for the host's latency: a chain of
        dependent reads settles however slow the host is."""
        quiet = 0
        while quiet < SETTLE_CYCLES:
            await RisingEdge(self.tb.dut.user_clk)
            quiet = 0 if self.tb.host.pending else quiet + 1


# --- lockstep ---------------------------------------------------------------------------------

class ScoreboardMismatch(AssertionError):
    """The two rigs disagree."""


class _Side:
    """One rig with its driver and the random source of its scatter lists."""

    def __init__(self, rig, seed):
        self.rig = rig
        self.vb = None
        self.sg_rng = random.Random(seed)


class Lockstep:
    """``ref`` and ``dut`` rigs driven by the same operations (the reference first)."""

    def __init__(self, ref, dut):
        self.ref = ref
        self.dut = dut
        self.sides = ()
        self.context = ""

    def start(self, seed):
        self.sides = (_Side(self.ref, seed), _Side(self.dut, seed))

    async def each(self, op, what):
        """Run ``op(side)`` on both sides; both must return the same (or raise the same
        error, which then ends the stream). Returns the result."""
        outcomes = []
        for side in self.sides:
            try:
                outcomes.append((None, await op(side)))
            except Exception as exc:        # the driver's or a scenario's: compared below
                outcomes.append((exc, f"{type(exc).__name__}: {exc}"))
        (ref_exc, ref), (dut_exc, dut) = outcomes
        if ref != dut:
            raise ScoreboardMismatch(f"{self.context}: {what}: reference {ref!r}, device "
                                     f"{dut!r} ({await self.device_state()})") from dut_exc
        if ref_exc is not None:
            raise ref_exc
        return ref

    async def device_state(self):
        """The device's status and last C7 fault, for a mismatch message."""
        rig = self.dut
        status = await rig.mgmt_read(c.MGMT_DEVICE_STATUS)
        info = await rig.mgmt_read(c.MGMT_FAULT_INFO)
        names = " ".join(flag.name for flag in c.DeviceStatus if status & flag) or "0"
        fault = c.RingFault(info & 0xF).name
        return f"device_status {names}, last fault {fault} on queue {info >> 8}"

    @staticmethod
    async def _snapshot(side, words):
        rig, vb = side.rig, side.vb
        state = {
            "bitmap": sorted(await s.read_bitmap(rig, words)),
            "balloon_pages": await s.read_balloon_pages(rig),
            **await s.read_counters(rig),
            **{name: await rig.mgmt_read(getattr(c, name)) for name in
               ("MGMT_DEVICE_STATUS", "MGMT_FAULT_INFO", "MGMT_RETURN_BUDGET")},
            "driver pages": list(vb.pages), "driver size": vb.num_pages,
            "driver extra": sorted(vb.extra_pages), "driver minimum": vb.min_balloon,
        }
        for vq in (vb.fromdev_vq, vb.todev_vq):
            state[f"{vq.name} used area"] = (await s.used_area(vq)).hex()
        return state

    async def compare(self, words):
        """Everything the contract fixes is equal on both sides (the device is given time
        to finish what it started before a difference counts)."""
        ref = await self._snapshot(self.sides[0], words)
        for _ in range(SETTLE_TRIES):
            await self.dut.settle()
            dut = await self._snapshot(self.sides[1], words)
            diffs = [f"{key}: reference {ref[key]!r}, device {dut[key]!r}"
                     for key in ref if ref[key] != dut[key]]
            if not diffs:
                return
        raise ScoreboardMismatch(f"{self.context}: " + "; ".join(diffs) +
                                 f" ({await self.device_state()})")


EXTRA_FIRST_FROM_END = 16
EXTRA_PAGES = 8
POOL_PAGES = 48
#: Pages raw commands name: below the driver's pool, never in the balloon.
RAW_PAGES = range(1, 8)


async def random_stream(lockstep, seed, steps=60):
    """A seeded stream on both rigs: random page size, features, queue size, command
    chunking and scatter lists; gives, gets (partial grants by budget), exchanges, extra
    memory, raw malformed and violating commands, minimums followed by the policy, host
    reset requests and resets with buffers outstanding. Compared after every step and in
    full at the end. Returns the steps run."""
    rng = random.Random(seed)
    lockstep.start(seed)
    ref_rig = lockstep.ref
    params = ref_rig.params
    n = params.bitmap_pages
    page_size = c.page_size_of_feature(rng.choice(params.page_size_bits))
    without = rng.choice([(), (s.EXTRA_MEM,), (c.VIRTIO_F_INDIRECT_DESC,),
                          (c.VIRTIO_F_RING_EVENT_IDX, s.EXTRA_MEM),
                          (c.VIRTIO_F_INDIRECT_DESC, c.VIRTIO_F_RING_EVENT_IDX)])
    sizes = [2, 4, 16, 64, 256] if c.VIRTIO_F_INDIRECT_DESC in without else [1, 2, 16, 256]
    queue_size = rng.choice([q for q in sizes if q <= params.max_queue_size])
    chunk = rng.choice([1, 3, 64, 512])
    extra_first = n - EXTRA_FIRST_FROM_END
    extra = [page_size * p for p in range(extra_first, extra_first + EXTRA_PAGES)]
    universe = set(RAW_PAGES) | set(range(s.POOL_FIRST_PAGE, s.POOL_FIRST_PAGE + POOL_PAGES)) \
        | set(range(extra_first, extra_first + EXTRA_PAGES))
    words = sorted({p // 32 for p in universe})
    lockstep.context = (f"seed {seed}: {c.size_name(page_size)} pages, without "
                        f"{[c.FEATURE_NAMES[b] for b in without]}, queue {queue_size}, "
                        f"{chunk} pages per command, setup")

    async def setup(side):
        await s.set_extra_range(side.rig, extra_first, EXTRA_PAGES)
        side.vb = await s.probe(side.rig, pool_pages=POOL_PAGES, page_size=page_size,
                                without=without, queue_size=queue_size,
                                max_pages_per_cmd=chunk)
        side.vb.sg_policy = s.random_sg_policy(side.sg_rng, side.vb)
    await lockstep.each(setup, "setup")
    await lockstep.compare(words)
    head = lockstep.context.rsplit(", ", 1)[0]

    async def give(side, count):
        vb = side.vb
        await vb.give_pages([vb.pool.alloc_page() for _ in range(count)])

    async def get(side, wanted):
        granted = await side.vb.get_pages(wanted)
        for addr in granted:
            if addr not in side.vb.extra_origin:
                side.vb.pool.free_page(addr)
        return granted

    async def exchange(side, wanted, count):
        vb = side.vb
        await vb.exchange_pages(wanted, [vb.pool.alloc_page() for _ in range(count)])
        for addr in wanted:
            if addr not in vb.extra_origin:
                vb.pool.free_page(addr)

    async def get_extra(side, wanted, give_back):
        got = await side.vb.get_pages(wanted)
        if got and give_back:
            await side.vb.give_pages(got)
        return got

    async def raw(side, data, writable):
        return await s.raw_command(side.vb, data, writable)

    async def minimum(side, value):
        await s.set_min_balloon(side.rig, value)
        got = await side.vb.wait_for_host(s.WAIT)
        return got, await side.vb.update_balloon_size()

    async def reset_request(side):
        await side.rig.mgmt_write(c.MGMT_CONTROL, c.MGMT_CONTROL_REQUEST_RESET)
        await side.rig.backend.wait_irq(s.CONFIG_VECTOR, s.WAIT)
        try:
            await side.vb.give_pages([side.vb.pool.alloc_page()])
        except DeviceNeedsReset:
            refused = True
        else:
            refused = False
        await side.vb.reset()
        await s.set_return_budget(side.rig, c.MGMT_UNLIMITED_BUDGET)
        return refused

    async def dma_fault(side, ahead, data, writable, cut, how):
        # C7 under a random DMA fault: ``ahead`` good raw commands, then one whose readable
        # bytes after ``cut`` fail; those ahead complete, the faulting one changes nothing.
        rig, vq = side.rig, side.vb.todev_vq
        for command in ahead:
            await vq.add_raw_chain([VringDesc(await vq.map_raw(command), len(command))],
                                   "ahead")
        head, tail = await vq.map_raw(data[:cut]), await vq.map_raw(data[cut:])
        descs = [VringDesc(head, cut, c.VRING_DESC_F_NEXT, 1),
                 VringDesc(tail, len(data) - cut, c.VRING_DESC_F_NEXT if writable else 0, 2)]
        if writable:
            descs.append(VringDesc(await vq.map_raw(bytes(writable)), writable,
                                   c.VRING_DESC_F_WRITE))
        rig.fail_reads(tail, len(data) - cut, how)
        await vq.add_raw_chain(descs, "faulting")
        await vq.virtqueue_notify()
        await rig.backend.wait_irq(s.CONFIG_VECTOR, s.WAIT)
        await rig.settle()
        await rig.clear_faults()
        return await s.wait_used(rig, vq, len(ahead))

    async def reset_after_fault(side):
        await side.vb.reset()

    async def reset_outstanding(side, count):
        # Buffers the device has not used and a doorbell it cannot serve (no bus
        # mastering): the reset drops both and the new queues start clean.
        rig, vq = side.rig, side.vb.todev_vq
        for _ in range(count):
            await vq.virtqueue_add_outbuf([s.cmd(s.GIVE, s.page_addr(1, page_size))], "out")
        await rig.backend.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY, 2)
        await vq.virtqueue_notify()
        await side.vb.reset()
        await rig.backend.config_write(c.PCI_COMMAND,
                                       c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER, 2)

    vb = lockstep.sides[0].vb
    raw_cases = [(data, writable) for _, data, writable, policy in
                 s.malformed_cases(n) if policy is None]
    ops = ["give", "give", "get", "get", "exchange", "extra", "budget", "min", "raw",
           "reset-request", "reset-outstanding", "dma-fault", "dma-fault"]
    for step in range(steps):
        op = rng.choice(ops)
        lockstep.context = f"{head}, step {step} ({op})"
        if op == "give" and vb.pool.free:
            count = rng.randint(1, len(vb.pool.free))
            await lockstep.each(lambda side: give(side, count), "give")
        elif op == "get" and vb.pages:
            wanted = rng.sample(list(vb.pages), rng.randint(1, len(vb.pages)))
            await lockstep.each(lambda side: get(side, wanted), "granted pages")
        elif op == "exchange" and vb.pages and vb.pool.free:
            count = rng.randint(1, min(len(vb.pages), len(vb.pool.free)))
            wanted = rng.sample(list(vb.pages), count)
            await lockstep.each(lambda side: exchange(side, wanted, count), "exchange")
        elif op == "extra" and vb.extra_mem:
            free = [addr for addr in extra if addr not in vb.extra_pages and addr not in vb.pages]
            if free:
                wanted = rng.sample(free, rng.randint(1, len(free)))
                back = rng.random() < 0.5
                await lockstep.each(lambda side: get_extra(side, wanted, back), "extra pages")
        elif op == "budget":
            budget = rng.choice([0, 1, 5, c.MGMT_UNLIMITED_BUDGET])
            await lockstep.each(lambda side: s.set_return_budget(side.rig, budget), "budget")
        elif op == "min":
            value = rng.randint(-4, 40) * page_size + rng.choice([0, 0, 1])
            await lockstep.each(lambda side: minimum(side, value), "minimum and policy")
        elif op == "raw":
            page = s.page_addr(rng.choice(RAW_PAGES), page_size)
            data, writable = rng.choice(raw_cases + [
                (s.cmd(s.GIVE, page + 8, s.page_addr(n, page_size)), 0),
                (s.cmd(s.GET, page), s.GET_RESULT),
                (s.cmd(s.EXCHANGE, page + page_size // 2, s.page_addr(n + 1, page_size)), 0)])
            await lockstep.each(lambda side: raw(side, data, writable), "raw command")
        elif op == "reset-request":
            await lockstep.each(reset_request, "reset request refused the next command")
        elif op == "dma-fault" and vb.todev_vq.num_free >= 6:
            free = vb.pool.free or [s.page_addr(p, page_size) for p in RAW_PAGES]
            held = list(vb.pages) or free
            kind = rng.choice([s.GIVE, s.GET, s.EXCHANGE])
            count = rng.randint(1, 8)
            addrs = {s.GIVE: lambda: rng.choices(free, k=count),
                     s.GET: lambda: rng.choices(held, k=count),
                     s.EXCHANGE: lambda: rng.choices(held, k=count) +
                     rng.choices(free, k=count)}[kind]()
            data = s.cmd(kind, *addrs)
            writable = s.GET_RESULT if kind == s.GET else 0
            ahead = [s.cmd(s.GIVE, s.page_addr(rng.choice(RAW_PAGES), page_size))
                     for _ in range(rng.randint(0, min(3, vb.todev_vq.num_free - 3)))]
            cut = rng.randrange(1, len(data))
            how = rng.choice(["UR", "CA"])
            await lockstep.each(lambda side: dma_fault(side, ahead, data, writable, cut, how),
                                "commands ahead of the fault")
            await lockstep.compare(words)
            await lockstep.each(reset_after_fault, "reset after the fault")
        elif op == "reset-outstanding":
            count = rng.randint(1, vb.todev_vq.num_free)
            await lockstep.each(lambda side: reset_outstanding(side, count), "reset")
        await lockstep.compare(words)
    lockstep.context = f"{head}, end"
    await lockstep.compare(range(-(-n // 32)))
    return steps
