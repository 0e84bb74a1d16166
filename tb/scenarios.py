"""Backend-generic scenarios of the memballoon device (C5..C12).

A scenario is ``async def scenario(rig)``: it drives one memballoon function through the
driver model (``sw/virtio_memballoon.py``, ``sw/virtio_ring.py``) and the host's management
port (C10), and asserts what ``CONTRACT.md`` says. A :class:`Rig` is everything a scenario
knows of the machine: the driver's :class:`~memballoon.backend.Backend`, the management
registers, a log of the device's DMA (C12) and fault injection (C7). :class:`RefRig` runs
on the reference model (pytest: ``tests/test_scenarios.py``); ``SimRig`` in
``tb/scoreboard.py`` runs on the RTL over the PCIe model (cocotb:
``tb/memballoon/test_memballoon.py``). The scenarios do not know which one they run on.

What is timing-dependent on a real device is never compared: how many doorbells the
driver rang (it skips them by ``avail_event``) and how many used-buffer interrupts a batch
produced (C11 lets the device publish a batch in one go or piece by piece). Everything
else is exact: bitmap (read over the management port), ``balloon_pages``, the balloon
counters, used lengths, GET counts and fromdevq messages.

``SCENARIOS`` names every scenario with its arguments.
"""

import abc
import struct

from memballoon import constants as c
from memballoon.backend_ref import RefBackend
from memballoon.params import DeviceParams
from memballoon.refmodel import COUNTER_NAMES, DEFAULT_RING_FEATURES, MemballoonRef
from memballoon.virtio_memballoon import DeviceNeedsReset, PagePool, VirtioMemballoon
from memballoon.virtio_pci_modern import VirtioPciModernDevice
from memballoon.virtio_ring import (VringDesc, sg_split, vring_avail_event_offset,
                                    vring_used_event_offset)

__all__ = ["Rig", "RefRig", "SCENARIOS", "SCENARIO_PARAMS", "BALLOON_COUNTERS",
           "read_counters", "read_bitmap", "read_balloon_pages", "set_min_balloon",
           "set_return_budget", "set_extra_range", "probe", "cmd", "raw_command",
           "wait_used", "used_area", "ring_regions"]

PAGE = c.page_size_of_feature(c.VIRTIO_MEMBALLOON_F_4K)
GIVE = c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES
GET = c.VIRTIO_MEMBALLOON_GCMD_GET_PAGES
EXCHANGE = c.VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES
EXTRA_MEM = c.VIRTIO_MEMBALLOON_F_EXTRA_MEM
GET_RESULT = 8                                      # C5: one le64 count
U32 = 0xFFFF_FFFF

#: The build the scenarios run on: a bitmap small enough to read whole over the
#: management port in a test (C8 allows any power of two from 2**10).
SCENARIO_PARAMS = DeviceParams(bitmap_pages=1 << 12)

#: Counters a scenario compares exactly. Doorbells and MSI-X messages depend on timing
#: (the driver skips doorbells by ``avail_event``; C11 lets a batch of used buffers take
#: one interrupt or several), so they are checked by their own scenarios only.
TIMING_COUNTERS = ("MGMT_NOTIFY_COUNT_Q0", "MGMT_NOTIFY_COUNT_Q1", "MGMT_MSIX_SENT",
                   "MGMT_MSIX_FAILED")
BALLOON_COUNTERS = tuple(name for name in COUNTER_NAMES if name not in TIMING_COUNTERS)

#: Window pages the driver's page pool starts at; pages below are for raw commands.
POOL_FIRST_PAGE = 64
#: Bounds of waits for the device (simulated seconds on the RTL): never a speed claim,
#: only how long a test waits before it calls a missing event missing.
WAIT = 200e-6
#: How long "nothing happens" is watched.
QUIET = 4e-6
#: Config-change vector and todevq/fromdevq vectors as virtio_pci_modern.init maps them.
CONFIG_VECTOR = 0
QUEUE_VECTOR = {c.FROMDEVQ: 1, c.TODEVQ: 2}


# --- the machine a scenario runs on --------------------------------------------------------

class Rig(abc.ABC):
    """One memballoon function: ``backend`` for the driver, ``params`` of its build, the
    host's management port, the device's DMA as seen from host memory, fault injection.

    ``dma_log`` holds every device access to host memory as ``(kind, address, length)``,
    kind ``"r"`` or ``"w"``, exact to the byte (MSI-X messages are not DMA and are not in
    it)."""

    backend = None
    params = None
    dma_log = None

    @abc.abstractmethod
    async def mgmt_read(self, offset):
        """A 32-bit management register (``MGMT_*``, C10)."""

    @abc.abstractmethod
    async def mgmt_write(self, offset, value):
        """A 32-bit management register write."""

    @abc.abstractmethod
    def fail_reads(self, addr, length, how="UR"):
        """Device reads touching ``addr``..``addr + length`` fail from now on: ``how`` is
        "UR", "CA" (completion status) or "timeout" (no completion at all), C7."""

    @abc.abstractmethod
    def fail_writes_after(self, addr, length, passing=0):
        """Device writes fail once the device has read all of ``addr``..``addr + length``
        and made ``passing`` more writes (C7 DMA_WRITE: the only way a posted write fails
        on PCIe is Bus Master Enable going low under the device, so the RTL rig does
        that)."""

    @abc.abstractmethod
    async def clear_faults(self):
        """Device accesses work again (and bus mastering is back on)."""

    @abc.abstractmethod
    async def flr(self):
        """A function-level reset, with the host restoring the MSI-X table after it (C9)."""

    async def settle(self):
        """Let the device finish what the last access started (nothing on the model, whose
        accesses return once the device has reacted)."""


class RefRig(Rig):
    """The reference model behind :class:`~memballoon.backend_ref.RefBackend`.

    ``ring_features`` defaults to what the model implements; the scoreboard passes what
    the RTL offers."""

    def __init__(self, params=SCENARIO_PARAMS, ring_features=DEFAULT_RING_FEATURES):
        self.params = params
        self.model = MemballoonRef(params, ring_features=ring_features,
                                   bitmap_pages=params.bitmap_pages)
        self.backend = RefBackend(self.model)
        self.dma_log = self.model.memory.dma_log

    async def mgmt_read(self, offset):
        return self.model.mgmt_read(offset)

    async def mgmt_write(self, offset, value):
        self.model.mgmt_write(offset, value)

    def fail_reads(self, addr, length, how="UR"):
        self.model.memory.inject_fault(addr, length, read=True, write=False)

    def fail_writes_after(self, addr, length, passing=0):
        # The model reads a command whole before it writes anything for it.
        self.model.memory.inject_fault(0, 1 << 64, read=False, write=True, passing=passing)

    async def clear_faults(self):
        self.model.memory.clear_faults()

    async def flr(self):
        # The host restores the command register and the MSI-X table afterwards, as
        # Linux's pci_reset_function does.
        self.model.flr()
        await self.backend.config_write(c.PCI_COMMAND,
                                        c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER, 2)
        await self.backend.alloc_irq_vectors(self.params.msix_vectors)


# --- host side (C10) ---------------------------------------------------------------------

def _signed32(value):
    return value - (1 << 32) if value >> 31 else value


async def read_counters(rig, names=BALLOON_COUNTERS):
    return {name: await rig.mgmt_read(getattr(c, name)) for name in names}


def counter_delta(before, after):
    """Non-zero changes between two :func:`read_counters` snapshots (counters wrap)."""
    return {name: after[name] - before[name] & U32 for name in before
            if after[name] != before[name]}


async def expect_counters(rig, before, context, **expected):
    """The balloon counters moved by exactly ``expected`` since ``before``."""
    got = counter_delta(before, await read_counters(rig, tuple(before)))
    want = {f"MGMT_{name}": value for name, value in expected.items()}
    assert got == want, f"{context}: counters moved by {got}, expected {want}"


async def read_balloon_pages(rig):
    return _signed32(await rig.mgmt_read(c.MGMT_BALLOON_PAGES))


async def read_bitmap(rig, words=None):
    """Set pages of the bitmap, read word by word over the management port (C10);
    ``words`` limits the read to those word indices."""
    if words is None:
        words = range(-(-rig.params.bitmap_pages // 32))
    pages = set()
    for index in words:
        await rig.mgmt_write(c.MGMT_BITMAP_INDEX, index)
        word = await rig.mgmt_read(c.MGMT_BITMAP_DATA)
        pages.update(32 * index + bit for bit in range(32) if word >> bit & 1)
    return pages


async def set_min_balloon(rig, nbytes):
    """C6/C10: commit a signed minimum (LO, then HI commits)."""
    raw = nbytes & (1 << 64) - 1
    await rig.mgmt_write(c.MGMT_MIN_BALLOON_LO, raw & U32)
    await rig.mgmt_write(c.MGMT_MIN_BALLOON_HI, raw >> 32)


async def set_return_budget(rig, pages):
    await rig.mgmt_write(c.MGMT_RETURN_BUDGET, pages)


async def set_extra_range(rig, first, count):
    await rig.mgmt_write(c.MGMT_EXTRA_FIRST_PAGE, first)
    await rig.mgmt_write(c.MGMT_EXTRA_PAGES, count)


async def set_window_base(rig, addr):
    await rig.mgmt_write(c.MGMT_WINDOW_BASE_LO, addr & U32)
    await rig.mgmt_write(c.MGMT_WINDOW_BASE_HI, addr >> 32)


async def device_status(rig):
    return await rig.mgmt_read(c.MGMT_DEVICE_STATUS)


# --- driver side -------------------------------------------------------------------------

def cmd(code, *addrs):
    """A todevq command: le64 code, then le64 addresses (C5)."""
    return struct.pack(f"<{1 + len(addrs)}Q", code, *addrs)


async def probe(rig, pool_pages=32, page_size=PAGE, without=(), queue_size=None, **kwargs):
    """The memballoon driver probed on ``rig`` with a page pool from window page
    ``POOL_FIRST_PAGE`` on."""
    pool = PagePool(POOL_FIRST_PAGE * page_size, pool_pages, page_size) if pool_pages else None
    vb = VirtioMemballoon(rig.backend, pool=pool, **kwargs)
    await vb.virtballoon_probe(page_size=page_size, without=without, queue_size=queue_size)
    return vb


def fixed_policy(sgs_of, indirect=None):
    """An sg policy that splits every command by ``sgs_of(command, writable)``."""
    def policy(command, writable):
        return sgs_of(command, writable), indirect
    return policy


def split_at(cuts, writable_pieces=None, fill=0xAA):
    """Readable bytes cut at ``cuts``; writable bytes in ``writable_pieces`` (default one
    piece), pre-filled with ``fill`` so a device write shows."""
    def sgs_of(command, writable):
        sgs = [(piece, False) for piece in sg_split(command, cuts)]
        pieces = writable_pieces or ([writable] if writable else [])
        sgs += [(bytearray([fill] * n), True) for n in pieces]
        return sgs
    return sgs_of


def random_sg_policy(rng, vb):
    """Each command split at random bytes, its GET result over random writable pieces,
    direct or indirect at random where the queue allows."""
    def policy(command, writable):
        cuts = [rng.randrange(len(command) + 1) for _ in range(rng.randrange(4))]
        sgs = [(piece, False) for piece in sg_split(command, cuts)]
        left = writable
        while left:
            piece = rng.randint(1, left)
            sgs.append((bytearray(piece), True))
            left -= piece
        vq = vb.todev_vq
        if vq.indirect:
            return sgs, rng.choice([None, True] if len(sgs) > vq.num else [None, True, False])
        if len(sgs) > vq.num:
            sgs = [(command, False)] + ([(bytearray(writable), True)] if writable else [])
        return sgs, None
    return policy


async def raw_command(vb, data, writable=0, policy=None):
    """Send bytes the driver would refuse to build, through its transport (``tell_host``):
    (used.len, the writable bytes after completion)."""
    saved = vb.sg_policy
    vb.sg_policy = policy or fixed_policy(split_at([]))
    try:
        [(length, result)] = await vb.tell_host([(data, writable)])
    finally:
        vb.sg_policy = saved
    return length, result


async def wait_used(rig, vq, count, timeout=WAIT, poll=0.2e-6):
    """Poll ``vq`` until ``count`` buffers came back, without relying on interrupts:
    ``(token, len)`` of each."""
    got = []
    deadline = rig.backend.now() + timeout
    while len(got) < count:
        item = await vq.virtqueue_get_buf()
        if item is not None:
            got.append(item)
            continue
        assert rig.backend.now() < deadline, \
            f"{vq.name}: {len(got)} of {count} buffers used within {timeout * 1e6:g} us"
        await rig.backend.sleep(poll)
    return got


async def wait_used_idx(rig, vq, idx, timeout=WAIT, poll=0.2e-6):
    """Poll the used idx until it reads ``idx``, touching nothing the device reads."""
    deadline = rig.backend.now() + timeout
    while await vq.used.read16(c.VRING_USED_IDX) != idx & 0xFFFF:
        assert rig.backend.now() < deadline, f"{vq.name}: used idx never reached {idx}"
        await rig.backend.sleep(poll)


async def wait_irq(rig, vector, timeout=WAIT):
    await rig.backend.wait_irq(vector, timeout)


async def assert_quiet(rig, vq, what):
    """Nothing comes back on ``vq`` for a while."""
    await rig.backend.sleep(QUIET)
    assert await vq.virtqueue_get_buf() is None, f"{what}: a buffer was used"


async def used_area(vq):
    """The whole used area of ``vq`` (flags, idx, ring, avail_event) as the driver sees it."""
    return await vq.used.read(0, vring_avail_event_offset(vq.num) + 2)


def page_addr(page, page_size=PAGE):
    return page * page_size


def pages_of(addrs, page_size=PAGE):
    return {addr // page_size for addr in addrs}


async def check_balloon(rig, vb, context, extra_host_owned=()):
    """C8/C10: the device's bitmap and size are the driver's (plus extra memory the host
    still owns)."""
    want = pages_of(vb.pages, vb.page_size) | set(extra_host_owned)
    got = await read_bitmap(rig)
    assert got == want, f"{context}: bitmap {sorted(got)} != driver {sorted(want)}"
    assert await read_balloon_pages(rig) == vb.num_pages, f"{context}: balloon_pages"


async def ring_regions(vq):
    """What the device may touch for the buffers in flight on ``vq`` (C12), from the
    descriptors the driver wrote: (readable ranges, writable ranges) as (address, length)."""
    readable = [(vq.desc.iova, c.vring_desc_size(vq.num)),
                (vq.avail.iova, c.vring_avail_size(vq.num))]
    writable = [(vq.used.iova, c.vring_used_size(vq.num))]
    for state in vq._desc_state.values():
        if state.indir is not None:
            size = c.VRING_DESC_SIZE * len(state.bufs)
            readable.append((state.indir.iova, size))
            raw = await state.indir.region.read(state.indir.offset, size)
        else:
            raw = b"".join([await vq.desc.read(c.VRING_DESC_SIZE * slot, c.VRING_DESC_SIZE)
                            for slot in state.slots])
        for at in range(0, len(raw), c.VRING_DESC_SIZE):
            desc = VringDesc.unpack(raw[at:at + c.VRING_DESC_SIZE])
            (writable if desc.flags & c.VRING_DESC_F_WRITE else readable).append(
                (desc.addr, desc.len))
    return readable, writable


def inside(ranges, addr, length):
    return any(start <= addr and addr + length <= start + size for start, size in ranges)


# --- C5 commands -------------------------------------------------------------------------

async def commands(rig):
    """C5: GIVE, GET and EXCHANGE through the driver; bitmap, size and counters after each;
    one page and 512 pages per command."""
    vb = await probe(rig, pool_pages=600)
    before = await read_counters(rig)
    pages = [vb.pool.alloc_page() for _ in range(8)]
    await vb.give_pages(pages)
    await check_balloon(rig, vb, "give 8")
    await expect_counters(rig, before, "give 8", CMD_GIVE=1, PAGES_ENTERED=8)

    before = await read_counters(rig)
    one = vb.pool.alloc_page()
    await vb.give_pages([one])
    assert await vb.get_pages([one]) == [one]
    await check_balloon(rig, vb, "give and get one")
    await expect_counters(rig, before, "give and get one", CMD_GIVE=1, CMD_GET=1,
                          PAGES_ENTERED=1, PAGES_LEFT=1)

    before = await read_counters(rig)
    assert await vb.get_pages(pages[2:5]) == pages[2:5]
    await check_balloon(rig, vb, "get 3")
    await expect_counters(rig, before, "get 3", CMD_GET=1, PAGES_LEFT=3)

    before = await read_counters(rig)
    give = [vb.pool.alloc_page() for _ in range(2)]
    await vb.exchange_pages([pages[0], pages[5]], give)
    await check_balloon(rig, vb, "exchange 2")
    await expect_counters(rig, before, "exchange 2", CMD_EXCHANGE=1, PAGES_LEFT=2,
                          PAGES_ENTERED=2)
    # A wanted page may re-enter in the same exchange: it leaves first, then enters.
    before = await read_counters(rig)
    await vb.exchange_pages([pages[1]], [pages[1]])
    await check_balloon(rig, vb, "exchange a page with itself")
    await expect_counters(rig, before, "exchange with itself", CMD_EXCHANGE=1, PAGES_LEFT=1,
                          PAGES_ENTERED=1)

    before = await read_counters(rig)
    big = [vb.pool.alloc_page() for _ in range(512)]
    vb.max_pages_per_cmd = 512
    await vb.give_pages(big)
    assert await vb.get_pages(big[::2]) == big[::2]
    await check_balloon(rig, vb, "512 pages")
    await expect_counters(rig, before, "512 pages", CMD_GIVE=1, CMD_GET=1,
                          PAGES_ENTERED=512, PAGES_LEFT=256)


async def get_budget(rig):
    """C5/C10: GET grants a prefix: it stops at the first page not in the balloon and when
    the host's return budget is spent; granted pages decrement the budget; EXCHANGE
    ignores it."""
    vb = await probe(rig, without=(EXTRA_MEM,))
    pages = [vb.pool.alloc_page() for _ in range(12)]
    await vb.give_pages(pages)
    assert await rig.mgmt_read(c.MGMT_RETURN_BUDGET) == c.MGMT_UNLIMITED_BUDGET

    await set_return_budget(rig, 4)
    before = await read_counters(rig)
    assert await vb.get_pages(pages[:6]) == pages[:4]
    assert await rig.mgmt_read(c.MGMT_RETURN_BUDGET) == 0
    await expect_counters(rig, before, "budget 4, asked 6", CMD_GET=1, PAGES_LEFT=4,
                          GET_SHORT=1)
    before = await read_counters(rig)
    assert await vb.get_pages([pages[4]]) == []
    await expect_counters(rig, before, "budget 0", CMD_GET=1, GET_SHORT=1)

    before = await read_counters(rig)
    give = [vb.pool.alloc_page() for _ in range(2)]
    await vb.exchange_pages(pages[4:6], give)
    await expect_counters(rig, before, "exchange with budget 0", CMD_EXCHANGE=1,
                          PAGES_LEFT=2, PAGES_ENTERED=2)
    assert await rig.mgmt_read(c.MGMT_RETURN_BUDGET) == 0

    await set_return_budget(rig, 3)
    assert await vb.get_pages(pages[6:8]) == pages[6:8]
    assert await rig.mgmt_read(c.MGMT_RETURN_BUDGET) == 1
    await set_return_budget(rig, c.MGMT_UNLIMITED_BUDGET)
    # The prefix stops at a page the balloon does not hold (a raw GET: the driver would
    # not ask for it); the page after it stays in.
    stranger = page_addr(POOL_FIRST_PAGE - 1)
    before = await read_counters(rig)
    length, result = await raw_command(vb, cmd(GET, pages[8], stranger, pages[9]), GET_RESULT)
    assert (length, int.from_bytes(result, "little")) == (GET_RESULT, 1)
    vb._left([pages[8]])
    await expect_counters(rig, before, "stops at a page not in the balloon", CMD_GET=1,
                          PAGES_LEFT=1, GET_SHORT=1)
    assert await vb.get_pages(pages[9:]) == pages[9:]
    assert await rig.mgmt_read(c.MGMT_RETURN_BUDGET) == c.MGMT_UNLIMITED_BUDGET
    await check_balloon(rig, vb, "end")


async def get_limit_and_duplicates(rig):
    """C5: a GET longer than the device's grant limit (``DeviceParams.get_grant_limit``)
    is a prefix grant of that many pages; an address named twice in one GET is granted
    once, the prefix stopping at its second occurrence, as executing in place gives."""
    limit = rig.params.get_grant_limit
    vb = await probe(rig, pool_pages=limit + 8)
    pages = [vb.pool.alloc_page() for _ in range(limit + 4)]
    await vb.give_pages(pages)
    before = await read_counters(rig)
    length, result = await raw_command(vb, cmd(GET, *pages[:limit + 3]), GET_RESULT)
    assert (length, int.from_bytes(result, "little")) == (GET_RESULT, limit)
    vb._left(pages[:limit])
    await expect_counters(rig, before, "past the grant limit", CMD_GET=1, PAGES_LEFT=limit,
                          GET_SHORT=1)
    a, b = pages[limit:limit + 2]
    length, result = await raw_command(vb, cmd(GET, a, a, b), GET_RESULT)
    assert (length, int.from_bytes(result, "little")) == (GET_RESULT, 1)
    vb._left([a])
    await check_balloon(rig, vb, "a page named twice")


def malformed_cases(bitmap_pages):
    """(name, readable bytes, writable length, sg policy or None) of every C5 malformed
    command; each carries a valid page that must not move."""
    p = page_addr(1)
    far = page_addr(bitmap_pages - 1)
    only_writable = fixed_policy(lambda command, writable: [(bytearray(b"\xAA" * 8), True)])
    return [
        ("unknown code 3", cmd(3, p), 0, None),
        ("unknown code MIN_BALLOON on todevq", cmd(c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON, p), 0,
         None),
        ("unknown code 2**63", cmd(1 << 63, p), 0, None),
        ("13 bytes", cmd(GIVE, p)[:13], 0, None),
        ("4 bytes", cmd(GIVE)[:4], 0, None),
        ("GIVE of 20 bytes", cmd(GIVE, p, far)[:20], 0, None),
        ("no readable bytes", b"", 8, only_writable),
        ("GIVE N=0", cmd(GIVE), 0, None),
        ("GET N=0", cmd(GET), GET_RESULT, None),
        ("EXCHANGE N=0", cmd(EXCHANGE), 0, None),
        ("EXCHANGE of 1 address", cmd(EXCHANGE, p), 0, None),
        ("EXCHANGE of 3 addresses", cmd(EXCHANGE, p, far, page_addr(2)), 0, None),
        ("GET without writable bytes", cmd(GET, p), 0, None),
        ("GET with 4 writable bytes", cmd(GET, p), 4, None),
        ("GET with 16 writable bytes", cmd(GET, p), 16, None),
        ("GET with 7 + 2 writable bytes", cmd(GET, p), 9,
         fixed_policy(split_at([], [7, 2]))),
        ("GIVE with 8 writable bytes", cmd(GIVE, far), 8, None),
        ("GIVE with 1 writable byte", cmd(GIVE, far), 1, None),
        ("EXCHANGE with 8 writable bytes", cmd(EXCHANGE, p, far), 8, None),
    ]


async def malformed(rig):
    """C5: every malformed command changes no state, completes with used.len 0 and writes
    nothing into its writable bytes, and is counted."""
    vb = await probe(rig, pool_pages=0)
    length, _ = await raw_command(vb, cmd(GIVE, page_addr(1)))
    assert length == 0
    cases = malformed_cases(rig.params.bitmap_pages)
    before = await read_counters(rig)
    for name, data, writable, policy in cases:
        length, result = await raw_command(vb, data, writable, policy)
        assert length == 0, f"{name}: used.len {length}"
        assert result == b"\xAA" * writable, f"{name}: the device wrote {result.hex()}"
    await expect_counters(rig, before, "malformed commands", CMD_MALFORMED=len(cases))
    assert await read_bitmap(rig) == {1}
    assert await read_balloon_pages(rig) == 1
    assert not await device_status(rig) & c.VIRTIO_CONFIG_S_NEEDS_RESET


async def violations(rig):
    """C5: invalid addresses (misaligned, out of window, double give) change nothing and
    are counted by kind; the valid addresses of the same command still act, in order.
    Alignment is checked before the window."""
    vb = await probe(rig, pool_pages=0)
    n = rig.params.bitmap_pages
    p = [page_addr(i) for i in range(8)]
    out = page_addr(n)
    before = await read_counters(rig)
    await raw_command(vb, cmd(GIVE, p[1], p[1] + 8, out, p[2], p[1], (1 << 64) - PAGE,
                              out + 1, p[3], p[2] + PAGE // 2))
    assert await read_bitmap(rig) == {1, 2, 3}
    await expect_counters(rig, before, "GIVE with violations", CMD_GIVE=1, PAGES_ENTERED=3,
                          VIOLATION_MISALIGNED=3, VIOLATION_OUT_OF_WINDOW=2,
                          VIOLATION_DOUBLE_GIVE=1)
    before = await read_counters(rig)
    # Wanted: p1 (leaves), misaligned, p6 (not in the balloon), p2 (leaves); given: p4,
    # p2 (left just before: enters again), out of window, p3 (double).
    await raw_command(vb, cmd(EXCHANGE, p[1], p[5] + 4, p[6], p[2], p[4], p[2], out, p[3]))
    assert await read_bitmap(rig) == {2, 3, 4}
    await expect_counters(rig, before, "EXCHANGE with violations", CMD_EXCHANGE=1,
                          PAGES_LEFT=2, PAGES_ENTERED=2, VIOLATION_MISALIGNED=1,
                          VIOLATION_NOT_IN_BALLOON=1, VIOLATION_OUT_OF_WINDOW=1,
                          VIOLATION_DOUBLE_GIVE=1)
    for name, addrs, granted, counted in (
            ("misaligned stops GET", [p[2], p[3] + 512, p[3]], 1,
             {"VIOLATION_MISALIGNED": 1}),
            ("out of window stops GET", [out, p[3]], 0, {"VIOLATION_OUT_OF_WINDOW": 1}),
            ("page not in the balloon stops GET", [p[7], p[3]], 0, {})):
        before = await read_counters(rig)
        length, result = await raw_command(vb, cmd(GET, *addrs), GET_RESULT)
        assert (length, int.from_bytes(result, "little")) == (GET_RESULT, granted), name
        await expect_counters(rig, before, name, CMD_GET=1, GET_SHORT=1,
                              **({"PAGES_LEFT": granted} if granted else {}), **counted)
    assert await read_bitmap(rig) == {3, 4}
    assert await read_balloon_pages(rig) == 2


async def window_base(rig):
    """C8/C10: the tracked window starts at the host's base (set before DRIVER_OK, fixed
    while DRIVER_OK is set): pages below it or past its end are out of window."""
    base = page_addr(3 * rig.params.bitmap_pages)
    await set_window_base(rig, base)
    vb = await probe(rig, pool_pages=0)
    await vb.vdev.vp_modern_get_status()            # flushes the posted DRIVER_OK write
    await set_window_base(rig, 0)                   # ignored while DRIVER_OK is set
    assert await rig.mgmt_read(c.MGMT_WINDOW_BASE_LO) == base & U32
    assert await rig.mgmt_read(c.MGMT_WINDOW_BASE_HI) == base >> 32
    before = await read_counters(rig)
    last = base + page_addr(rig.params.bitmap_pages - 1)
    await raw_command(vb, cmd(GIVE, base, base - PAGE, last, last + PAGE, 0))
    assert await read_bitmap(rig) == {0, rig.params.bitmap_pages - 1}
    await expect_counters(rig, before, "window at base", CMD_GIVE=1, PAGES_ENTERED=2,
                          VIOLATION_OUT_OF_WINDOW=3)


async def framing(rig):
    """C5 framing (virtio 1.2 2.7.4): a command split at any byte, over direct and indirect
    chains, and a GET result split over writable descriptors, act as the unsplit
    command."""
    vb = await probe(rig, pool_pages=0, queue_size=64)
    addrs = [page_addr(i) for i in (5, 6, 7)]
    data = cmd(GIVE, *addrs)
    back = cmd(GET, *addrs)
    cases = [([cut], cut % 2 == 0) for cut in range(1, len(data))]
    cases += [(list(range(1, len(data))), False), (list(range(1, len(data))), True),
              ([3, 3, 17], True), ([8, 16, 24], False)]
    for i, (cuts, indirect) in enumerate(cases):
        pieces = [[GET_RESULT], [1] * GET_RESULT, [3, 5]][i % 3]
        policy = fixed_policy(split_at(cuts), indirect)
        length, _ = await raw_command(vb, data, 0, policy)
        assert length == 0
        assert await read_bitmap(rig, [0]) == {5, 6, 7}, f"GIVE cut at {cuts}"
        length, result = await raw_command(vb, back, GET_RESULT,
                                           fixed_policy(split_at(cuts, pieces), indirect))
        assert (length, int.from_bytes(result, "little")) == (GET_RESULT, 3), \
            f"GET cut at {cuts}, result in {pieces}"
        assert await read_bitmap(rig, [0]) == set(), f"GET cut at {cuts}"
    assert await read_balloon_pages(rig) == 0
    assert await rig.mgmt_read(c.MGMT_CMD_MALFORMED) == 0


async def indirect_flag_without_feature(rig):
    """C7/virtio 1.2 2.7.5.3: without VIRTIO_F_INDIRECT_DESC the INDIRECT flag means
    nothing: a descriptor that carries it is an ordinary readable buffer (here a GIVE
    whose 16 bytes, read as a table, would be a descriptor of 36 KiB at address 1)."""
    vb = await probe(rig, pool_pages=0, without=(c.VIRTIO_F_INDIRECT_DESC,))
    data = cmd(GIVE, page_addr(9))
    buf = await vb.todev_vq.map_raw(data)
    await vb.todev_vq.add_raw_chain([VringDesc(buf, len(data), c.VRING_DESC_F_INDIRECT)], "t")
    await vb.todev_vq.virtqueue_notify()
    assert await wait_used(rig, vb.todev_vq, 1) == [("t", 0)]
    assert await read_bitmap(rig, [0]) == {9}
    assert await read_balloon_pages(rig) == 1
    assert not await vb.vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert await rig.mgmt_read(c.MGMT_RING_FAULTS) == 0


# --- C6 fromdevq -----------------------------------------------------------------------

async def min_balloon(rig, extra_mem):
    """C6: the host's minimum reaches the driver as le64 MIN_BALLOON + le64 bytes, used.len
    16; a negative minimum is sent as 0 without EXTRA_MEM. The policy follows it."""
    without = () if extra_mem else (EXTRA_MEM,)
    vb = await probe(rig, without=without)
    assert vb.extra_mem == extra_mem
    before = await read_counters(rig)
    for value, sent in ((5 * PAGE, 5 * PAGE), (-3 * PAGE, -3 * PAGE if extra_mem else 0),
                        (-(1 << 63), -(1 << 63) if extra_mem else 0), (2 * PAGE + 1, 2 * PAGE + 1)):
        await set_min_balloon(rig, value)
        assert await vb.wait_for_host(WAIT) == [sent], f"minimum {value}"
    await expect_counters(rig, before, "four minimums", MIN_SENT=4)
    assert await rig.mgmt_read(c.MGMT_MIN_BALLOON_LO) == (2 * PAGE + 1) & U32
    assert await vb.update_balloon_size() == 3          # 2 pages and a byte: 3 pages
    await check_balloon(rig, vb, "policy after the minimum")


async def min_balloon_held(rig):
    """C6: with no buffer posted the device holds the newest minimum and sends it when a
    buffer arrives; older unsent values are dropped and counted."""
    vb = await probe(rig)
    await set_min_balloon(rig, PAGE)
    [(buf, length)] = await wait_used(rig, vb.fromdev_vq, 1)     # not refilled
    assert length == c.FROMDEVQ_MIN_BUFFER
    assert struct.unpack("<Qq", buf) == (c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON, PAGE)
    before = await read_counters(rig)
    for value in (2 * PAGE, 3 * PAGE, 4 * PAGE):
        await set_min_balloon(rig, value)
    await assert_quiet(rig, vb.fromdev_vq, "no buffer posted")
    await expect_counters(rig, before, "three minimums, no buffer", MIN_DROPPED=2)
    await vb.send_msg_buf()
    assert await vb.wait_for_host(WAIT) == [4 * PAGE]
    await expect_counters(rig, before, "then a buffer", MIN_DROPPED=2, MIN_SENT=1)
    await assert_quiet(rig, vb.fromdev_vq, "nothing more to send")


async def fromdevq_malformed(rig):
    """C6: a fromdevq buffer with readable bytes or fewer than 16 writable bytes is used
    with used.len 0 and counted at once, also behind good buffers held for a minimum
    (used elements need not follow ring order); the held good ones then get the minimums
    in ring order, one each, and one split 5 + 11 gets the whole message."""
    vb = await probe(rig)
    vq = vb.fromdev_vq
    await set_min_balloon(rig, PAGE)
    await wait_used(rig, vq, 1)                 # the probe's buffer: nothing held now
    before = await read_counters(rig)
    good = {"split": [(bytearray(5), True), (bytearray(11), True)],
            "good16": [(bytearray(16), True)], "good24": [(bytearray(24), True)]}
    bad = {"readable": [(b"\x01" * 8, False), (bytearray(16), True)],
           "15": [(bytearray(15), True)], "8": [(bytearray(8), True)],
           "4+4": [(bytearray(4), True), (bytearray(4), True)]}
    ring = ["split", "readable", "good16", "15", "8", "good24", "4+4"]
    for token in ring:
        await vq.virtqueue_add_sgs(good.get(token) or bad[token], token)
    await vq.virtqueue_kick()
    got = await wait_used(rig, vq, len(bad))
    assert got == [(token, 0) for token in ring if token in bad], got
    await assert_quiet(rig, vq, "good buffers without a minimum")
    await expect_counters(rig, before, "malformed behind held ones",
                          FROMDEVQ_MALFORMED=len(bad))
    # More malformed ones while the three good ones are still held.
    late = {"late-readable": [(b"\x02" * 3, False)], "late-12": [(bytearray(12), True)]}
    for token, sgs in late.items():
        await vq.virtqueue_add_sgs(sgs, token)
    await vq.virtqueue_kick()
    assert await wait_used(rig, vq, len(late)) == [(token, 0) for token in late]
    # One minimum each, in ring order ("split": the message across 5 + 11 bytes).
    for n, token in enumerate(token for token in ring if token in good):
        await set_min_balloon(rig, (7 + n) * PAGE)
        assert await wait_used(rig, vq, 1) == [(token, c.FROMDEVQ_MIN_BUFFER)], token
        written = b"".join(buf for buf, _ in good[token])[:c.FROMDEVQ_MIN_BUFFER]
        assert struct.unpack("<Qq", written) == \
            (c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON, (7 + n) * PAGE), token
    await assert_quiet(rig, vq, "nothing held any more")
    await expect_counters(rig, before, "end", FROMDEVQ_MALFORMED=len(bad) + len(late),
                          MIN_SENT=len(good))


# --- C7 ring faults ----------------------------------------------------------------------

async def _fault_desc_index(rig, vq):
    await vq.publish_avail(vq.num + 3)


async def _fault_desc_index_next(rig, vq):
    buf = await vq.map_raw(cmd(GIVE, page_addr(40)))
    await vq.add_raw_chain([VringDesc(buf, 16, c.VRING_DESC_F_NEXT, vq.num + 1)], "t")


async def _fault_chain_loop(rig, vq):
    buf = await vq.map_raw(cmd(GIVE, page_addr(40)))
    await vq.add_raw_chain([VringDesc(buf, 8, c.VRING_DESC_F_NEXT, 1),
                            VringDesc(buf + 8, 8, c.VRING_DESC_F_NEXT, 0)], "t")


async def _indirect_table(vq, descs, length=None):
    table = await vq.map_raw(b"".join(d.pack() for d in descs))
    await vq.add_raw_chain([VringDesc(table, 16 * len(descs) if length is None else length,
                                      c.VRING_DESC_F_INDIRECT)], "t")


async def _fault_nested_indirect(rig, vq):
    inner = await vq.map_raw(VringDesc(0, 16).pack())
    await _indirect_table(vq, [VringDesc(inner, 16, c.VRING_DESC_F_INDIRECT)])


async def _fault_indirect_length_zero(rig, vq):
    await _indirect_table(vq, [VringDesc(0, 16)], length=0)


async def _fault_indirect_length_odd(rig, vq):
    await _indirect_table(vq, [VringDesc(0, 16), VringDesc(0, 16)], length=24)


async def _fault_indirect_loop(rig, vq):
    buf = await vq.map_raw(cmd(GIVE, page_addr(40)))
    await _indirect_table(vq, [VringDesc(buf, 8, c.VRING_DESC_F_NEXT, 1),
                               VringDesc(buf + 8, 8, c.VRING_DESC_F_NEXT, 0)])


async def _fault_avail_ahead(rig, vq):
    await vq.write_avail_idx(vq.avail_idx_shadow + vq.num + 1)


async def _fault_avail_backwards(rig, vq):
    # One behind the device: 65535 ahead in 16-bit arithmetic.
    await vq.write_avail_idx(vq.avail_idx_shadow - 1 & 0xFFFF)


def _fault_dma_read(how):
    async def inject(rig, vq):
        data = cmd(GIVE, page_addr(40))
        buf = await vq.map_raw(data)
        rig.fail_reads(buf, len(data), how)
        await vq.add_raw_chain([VringDesc(buf, len(data))], "t")
    return inject


async def _fault_dma_write(rig, vq):
    # A GIVE long enough that the device is still busy with it once its data is in.
    data = cmd(GIVE, *(page_addr(1024 + i) for i in range(512)))
    buf = await vq.map_raw(data)
    rig.fail_writes_after(buf, len(data))
    await vq.add_raw_chain([VringDesc(buf, len(data))], "t")


#: C7 fault kinds: (injection, RingFault). The faulting command never changes the balloon
#: (C7: a command is atomic), a 512-page GIVE whose used element cannot be written included.
RING_FAULTS = {
    "desc_index": (_fault_desc_index, c.RingFault.DESC_INDEX),
    "desc_index_next": (_fault_desc_index_next, c.RingFault.DESC_INDEX),
    "chain_loop": (_fault_chain_loop, c.RingFault.CHAIN_LOOP),
    "nested_indirect": (_fault_nested_indirect, c.RingFault.NESTED_INDIRECT),
    "indirect_length_zero": (_fault_indirect_length_zero, c.RingFault.INDIRECT_LENGTH),
    "indirect_length_odd": (_fault_indirect_length_odd, c.RingFault.INDIRECT_LENGTH),
    "indirect_loop": (_fault_indirect_loop, c.RingFault.CHAIN_LOOP),
    "avail_ahead": (_fault_avail_ahead, c.RingFault.AVAIL_AHEAD),
    "avail_backwards": (_fault_avail_backwards, c.RingFault.AVAIL_AHEAD),
    "dma_read_ur": (_fault_dma_read("UR"), c.RingFault.DMA_READ),
    "dma_read_ca": (_fault_dma_read("CA"), c.RingFault.DMA_READ),
    "dma_read_timeout": (_fault_dma_read("timeout"), c.RingFault.DMA_READ),
    "dma_write": (_fault_dma_write, c.RingFault.DMA_WRITE),
}
#: A completion timeout takes the DMA engine's timeout (2**17 user_clk cycles by default).
FAULT_WAIT = {"dma_read_timeout": 4e-3}


async def ring_fault(rig, kind):
    """C7: the faulting queue stops, DEVICE_NEEDS_RESET is set and the configuration
    interrupt arrives; the balloon keeps its pages and the host still reads the bitmap;
    the other queue keeps working; a reset brings the device back."""
    inject, fault = RING_FAULTS[kind]
    vb = await probe(rig, queue_size=8)
    kept = [vb.pool.alloc_page() for _ in range(3)]
    await vb.give_pages(kept)
    before = await read_counters(rig)
    status = await vb.vdev.vp_modern_get_status()
    await inject(rig, vb.todev_vq)
    await vb.todev_vq.virtqueue_notify()
    await rig.settle()
    await rig.clear_faults()
    await wait_irq(rig, CONFIG_VECTOR, FAULT_WAIT.get(kind, WAIT))
    assert await vb.vdev.vp_modern_get_status() == status | c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert await vb.vdev.vp_modern_isr() & c.VIRTIO_PCI_ISR_CONFIG
    assert await rig.mgmt_read(c.MGMT_FAULT_INFO) == c.TODEVQ << 8 | fault.value
    assert await read_bitmap(rig) == pages_of(kept), "C7: nothing is lost, nothing gained"
    assert await read_balloon_pages(rig) == len(kept)
    await expect_counters(rig, before, kind, RING_FAULTS=1)
    # The queue stays stopped: a good command is not used.
    await vb.todev_vq.virtqueue_add_outbuf([cmd(GIVE, page_addr(50))], "after")
    await vb.todev_vq.virtqueue_notify()
    await assert_quiet(rig, vb.todev_vq, "stopped queue")
    # fromdevq still works.
    await set_min_balloon(rig, PAGE)
    assert await vb.wait_for_host(WAIT) == [PAGE]
    # The driver resets; the balloon is empty (C9) and the device works again.
    await vb.reset()
    assert await read_bitmap(rig) == set() and await read_balloon_pages(rig) == 0
    await vb.give_pages([vb.pool.alloc_page()])
    await check_balloon(rig, vb, "after the reset")


#: Where a command's fault hits (C7), per command: inside the code word and inside the
#: address list (reads of its data that fail), the first write after its data (GET's K;
#: the used element of GIVE and EXCHANGE, which write nothing else) and, for GET, the used
#: element after K.
ATOMIC_POINTS = {GIVE: ("code", "addresses", "result"),
                 GET: ("code", "addresses", "result", "used"),
                 EXCHANGE: ("code", "addresses", "result")}


async def atomic_command(rig, code, point):
    """C7: a command whose readable bytes cannot all be read, or whose result or used
    element cannot be written, changes no balloon state: bitmap, balloon_pages, budget
    and every counter read as before it but for the fault; the driver never sees it
    used, and K is not written before its data is all in."""
    vb = await probe(rig, queue_size=8)
    kept = [vb.pool.alloc_page() for _ in range(4)]
    await vb.give_pages(kept)
    await set_return_budget(rig, 10)
    outside = [page_addr(40 + i) for i in range(4)]
    data = cmd(code, *{GIVE: outside, GET: kept, EXCHANGE: kept[:2] + outside[:2]}[code])
    cut = 3 if point == "code" else 24          # into the code word; after two addresses
    vq = vb.todev_vq
    head, tail = await vq.map_raw(data[:cut]), await vq.map_raw(data[cut:])
    result = vq.pool.alloc(GET_RESULT)
    await result.region.write(result.offset, bytes([0xAA] * GET_RESULT))
    descs = [VringDesc(head, cut, c.VRING_DESC_F_NEXT, 1),
             VringDesc(tail, len(data) - cut, c.VRING_DESC_F_NEXT if code == GET else 0, 2)]
    if code == GET:
        descs.append(VringDesc(result.iova, GET_RESULT, c.VRING_DESC_F_WRITE))
    if point in ("code", "addresses"):
        rig.fail_reads(tail, len(data) - cut)
        fault = c.RingFault.DMA_READ
    else:
        rig.fail_writes_after(tail, len(data) - cut, passing=int(point == "used"))
        fault = c.RingFault.DMA_WRITE
    before = await read_counters(rig)
    status = await vb.vdev.vp_modern_get_status()
    await vq.add_raw_chain(descs, "atomic")
    await vq.virtqueue_notify()
    await rig.settle()
    await rig.clear_faults()
    await wait_irq(rig, CONFIG_VECTOR)
    assert await vb.vdev.vp_modern_get_status() == status | c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert await rig.mgmt_read(c.MGMT_FAULT_INFO) == c.TODEVQ << 8 | fault.value
    context = f"C7: {c.GuestCmd(code).name} with a fault at its {point}"
    assert await read_bitmap(rig) == pages_of(kept), context
    assert await read_balloon_pages(rig) == len(kept), context
    assert await rig.mgmt_read(c.MGMT_RETURN_BUDGET) == 10, context
    await expect_counters(rig, before, context, RING_FAULTS=1)
    assert await vq.virtqueue_get_buf() is None, f"{context}: used"
    if point != "used":
        assert await result.region.read(result.offset, GET_RESULT) == \
            bytes([0xAA] * GET_RESULT), f"{context}: K written"
    await vb.reset()
    assert await read_bitmap(rig) == set() and await read_balloon_pages(rig) == 0
    await vb.give_pages([vb.pool.alloc_page()])
    await check_balloon(rig, vb, f"{context}, after the reset")


async def host_reset_request(rig):
    """C10: the host's reset request sets DEVICE_NEEDS_RESET with a configuration
    interrupt; the driver stops sending and resets; the balloon is empty after it."""
    vb = await probe(rig)
    await vb.fill_balloon(4)
    await rig.mgmt_write(c.MGMT_CONTROL, c.MGMT_CONTROL_REQUEST_RESET)
    await wait_irq(rig, CONFIG_VECTOR)
    assert await device_status(rig) & c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert len(await read_bitmap(rig)) == 4
    await vb.reset()
    assert await read_bitmap(rig) == set() and vb.num_pages == 0
    await vb.fill_balloon(2)
    await check_balloon(rig, vb, "after the reset")


# --- C8 extra memory ---------------------------------------------------------------------

async def extra_memory(rig, extra_mem):
    """C8: the host's extra range starts host-owned without counting; with EXTRA_MEM a GET
    of its pages is granted and takes balloon_pages below zero; without, it is never
    granted (nor taken by EXCHANGE). A reset makes the range host-owned again (C9)."""
    first, count = 200, 8
    extra = set(range(first, first + count))
    await set_extra_range(rig, first, count)
    assert await rig.mgmt_read(c.MGMT_EXTRA_FIRST_PAGE) == first
    assert await rig.mgmt_read(c.MGMT_EXTRA_PAGES) == count
    assert await read_bitmap(rig) == extra and await read_balloon_pages(rig) == 0
    vb = await probe(rig, without=() if extra_mem else (EXTRA_MEM,))
    wanted = [page_addr(p) for p in sorted(extra)[:3]]
    before = await read_counters(rig)
    length, result = await raw_command(vb, cmd(GET, *wanted), GET_RESULT)
    granted = int.from_bytes(result, "little")
    if extra_mem:
        assert granted == 3
        assert await read_balloon_pages(rig) == -3
        assert await read_bitmap(rig) == extra - pages_of(wanted)
        await expect_counters(rig, before, "GET extra", CMD_GET=1, PAGES_LEFT=3)
        await raw_command(vb, cmd(GIVE, wanted[0]))
        assert await read_balloon_pages(rig) == -2
    else:
        assert granted == 0
        await raw_command(vb, cmd(EXCHANGE, wanted[0], page_addr(3)))
        assert await read_bitmap(rig) == extra | {3}
        assert await read_balloon_pages(rig) == 1
        await expect_counters(rig, before, "extra without EXTRA_MEM", CMD_GET=1, GET_SHORT=1,
                              CMD_EXCHANGE=1, VIOLATION_NOT_IN_BALLOON=1, PAGES_ENTERED=1)
    await vb.vdev.vp_modern_reset()
    assert await read_bitmap(rig) == extra and await read_balloon_pages(rig) == 0


# --- C9 reset ----------------------------------------------------------------------------

async def wait_reset_done(rig, vb, timeout=WAIT):
    """Poll device_status until it reads 0 (C9: non-zero while the clear runs)."""
    deadline = rig.backend.now() + timeout
    while await vb.vdev.vp_modern_get_status():
        assert rig.backend.now() < deadline, "device_status still non-zero after reset"
        await rig.backend.sleep(0.1e-6)


async def reset_clears(rig):
    """C9: a reset clears the bitmap (extra range back to host-owned), the queues and the
    pending minimum before device_status reads 0."""
    await set_extra_range(rig, 300, 4)
    vb = await probe(rig)
    await vb.fill_balloon(20)
    await set_min_balloon(rig, PAGE)
    [(buf, _)] = await wait_used(rig, vb.fromdev_vq, 1)         # no buffer left
    await set_min_balloon(rig, 2 * PAGE)                         # pending
    before = await read_counters(rig)
    await vb.vdev.vp_modern_set_status(0)
    await wait_reset_done(rig, vb)
    assert await read_bitmap(rig) == set(range(300, 304)), "C9: bitmap not clear at status 0"
    assert await read_balloon_pages(rig) == 0
    assert await rig.mgmt_read(c.MGMT_BUSY) == 0
    await expect_counters(rig, before, "reset")         # counters survive resets
    # The pending minimum went with the reset: a new buffer gets nothing.
    vb2 = await probe(rig)
    await assert_quiet(rig, vb2.fromdev_vq, "pending minimum after reset")
    await vb2.fill_balloon(1)
    await check_balloon(rig, vb2, "after reset", extra_host_owned=range(300, 304))


async def flr_clears(rig):
    """C9: a function-level reset clears the balloon like a virtio reset."""
    vb = await probe(rig)
    await vb.fill_balloon(5)
    await rig.flr()
    await wait_reset_done(rig, vb)
    assert await read_bitmap(rig) == set() and await read_balloon_pages(rig) == 0
    vb2 = await probe(rig)
    await vb2.fill_balloon(2)
    await check_balloon(rig, vb2, "after FLR")


async def reset_under_load(rig):
    """C9: a reset while commands are in flight: once device_status reads 0 the balloon is
    empty, the device touches no memory any more, and a new set-up starts clean."""
    vb = await probe(rig, pool_pages=0, queue_size=64)
    vq = vb.todev_vq
    for i in range(vq.num):
        await vq.virtqueue_add_outbuf(
            [cmd(GIVE, *(page_addr(64 * i + k) for k in range(64)))], i)
    await vq.virtqueue_notify()
    # The reset goes in once the device has published a first command, the others in
    # flight behind it (the model has done them all by then).
    deadline = rig.backend.now() + WAIT
    while not await vq.used.read16(c.VRING_USED_IDX):
        assert rig.backend.now() < deadline, "no command completed"
        await rig.backend.sleep(0.1e-6)
    await vb.vdev.vp_modern_set_status(0)
    await wait_reset_done(rig, vb)
    touched = len(rig.dma_log)
    assert await read_bitmap(rig) == set() and await read_balloon_pages(rig) == 0
    await rig.backend.sleep(QUIET)
    assert rig.dma_log[touched:] == [], "DMA after the reset completed"
    vb2 = await probe(rig, pool_pages=8, queue_size=64)
    await vb2.fill_balloon(8)
    await check_balloon(rig, vb2, "after the reset")
    used = await used_area(vb2.todev_vq)
    assert int.from_bytes(used[c.VRING_USED_IDX:c.VRING_USED_IDX + 2], "little") == 1


# --- C11 notifications -------------------------------------------------------------------

async def notification_suppression(rig, event_idx):
    """C11: without EVENT_IDX the device honours NO_INTERRUPT; with it, used_event, and it
    writes avail_event; interrupts come back when asked for again."""
    without = () if event_idx else (c.VIRTIO_F_RING_EVENT_IDX,)
    vb = await probe(rig, pool_pages=0, without=without)
    vq = vb.todev_vq
    assert vq.event == event_idx
    vector = QUEUE_VECTOR[c.TODEVQ]
    await vq.virtqueue_disable_cb()
    for i in range(3):
        await vq.virtqueue_add_outbuf([cmd(GIVE, page_addr(1 + i))], i)
        await vq.virtqueue_kick()
        await wait_used(rig, vq, 1)
    await rig.backend.sleep(QUIET)
    assert rig.backend.irq_count(vector) == 0, "interrupt while suppressed"
    used = await used_area(vq)
    avail_event = int.from_bytes(used[-2:], "little")
    assert avail_event == (3 if event_idx else 0), f"avail_event {avail_event}"
    assert await vq.virtqueue_enable_cb()
    await vq.virtqueue_add_outbuf([cmd(GIVE, page_addr(9))], "on")
    await vq.virtqueue_kick()
    await wait_irq(rig, vector)
    assert await wait_used(rig, vq, 1) == [("on", 0)]
    if event_idx:
        # used_event one ahead: no interrupt for the next buffer, one for the second.
        await vq.avail.write16(vring_used_event_offset(vq.num), vq.last_used_idx + 1)
        await vq.virtqueue_add_outbuf([cmd(GIVE, page_addr(20))], "e0")
        await vq.virtqueue_notify()
        await wait_used_idx(rig, vq, vq.last_used_idx + 1)
        await rig.backend.sleep(QUIET)
        assert rig.backend.irq_count(vector) == 1, "interrupt before used_event"
        await vq.virtqueue_add_outbuf([cmd(GIVE, page_addr(21))], "e1")
        await vq.virtqueue_notify()
        await wait_irq(rig, vector)
        assert await wait_used(rig, vq, 2) == [("e0", 0), ("e1", 0)]
    assert await read_bitmap(rig, [0]) == {1, 2, 3, 9} | ({20, 21} if event_idx else set())


async def drain_and_spurious(rig):
    """C11: one doorbell makes the device take every available buffer; doorbells with
    nothing to do are counted and harmless (on both queues)."""
    vb = await probe(rig, pool_pages=0, queue_size=16)
    vq = vb.todev_vq
    for i in range(12):
        await vq.virtqueue_add_outbuf([cmd(GIVE, page_addr(1 + i))], i)
    notified = await rig.mgmt_read(c.MGMT_NOTIFY_COUNT_Q1)
    await vq.virtqueue_notify()
    assert await wait_used(rig, vq, 12) == [(i, 0) for i in range(12)]
    assert await rig.mgmt_read(c.MGMT_NOTIFY_COUNT_Q1) == notified + 1
    await wait_irq(rig, QUEUE_VECTOR[c.TODEVQ])
    before = await read_counters(rig)
    fromdev = await rig.mgmt_read(c.MGMT_NOTIFY_COUNT_Q0)
    for _ in range(3):
        await vq.virtqueue_notify()
        await vb.fromdev_vq.virtqueue_notify()
    await assert_quiet(rig, vq, "spurious todevq doorbells")
    await assert_quiet(rig, vb.fromdev_vq, "spurious fromdevq doorbells")
    assert await rig.mgmt_read(c.MGMT_NOTIFY_COUNT_Q1) == notified + 4
    assert await rig.mgmt_read(c.MGMT_NOTIFY_COUNT_Q0) == fromdev + 3
    await expect_counters(rig, before, "spurious doorbells")
    assert await read_bitmap(rig) == set(range(1, 13))
    # The buffer posted at probe is still held: the next minimum goes into it.
    await set_min_balloon(rig, PAGE)
    assert await vb.wait_for_host(WAIT) == [PAGE]


async def index_wrap(rig, buffers, queue_size):
    """virtio 1.2 2.7: the 16-bit avail and used indices wrap; ``buffers`` commands in
    batches of a full queue, then a GIVE and a GET that straddle the wrap."""
    vb = await probe(rig, pool_pages=0, queue_size=queue_size)
    vq = vb.todev_vq
    before = await read_counters(rig)
    noop = cmd(GET, page_addr(1))           # a page not in the balloon: granted 0
    sent = 0
    while sent < buffers:
        batch = min(vq.num, buffers - sent)
        for i in range(batch):
            await vq.virtqueue_add_sgs([(noop, False), (GET_RESULT, True)], sent + i)
        await vq.virtqueue_notify()
        assert [token for token, _ in await wait_used(rig, vq, batch)] == \
            list(range(sent, sent + batch))
        sent += batch
    await vb.give_pages([page_addr(7)])
    length, result = await raw_command(vb, cmd(GET, page_addr(7)), GET_RESULT)
    assert (length, int.from_bytes(result, "little")) == (GET_RESULT, 1)
    used = await used_area(vq)
    assert int.from_bytes(used[c.VRING_USED_IDX:c.VRING_USED_IDX + 2], "little") == \
        buffers + 2 & 0xFFFF
    await expect_counters(rig, before, f"{buffers} buffers", CMD_GET=buffers + 1,
                          CMD_GIVE=1, PAGES_ENTERED=1, PAGES_LEFT=1, GET_SHORT=buffers)


# --- C11 INTx ----------------------------------------------------------------------------

async def interrupt_status(rig):
    """The Status register's Interrupt Status bit: an INTx is pending."""
    return bool(await rig.backend.config_read(c.PCI_STATUS, 2) & c.PCI_STATUS_INTERRUPT)


async def wait_interrupt_status(rig, level, timeout=WAIT, poll=0.2e-6):
    """Poll until :func:`interrupt_status` is ``level``."""
    deadline = rig.backend.now() + timeout
    while await interrupt_status(rig) != level:
        assert rig.backend.now() < deadline, f"Interrupt Status never read {int(level)}"
        await rig.backend.sleep(poll)


async def intx_fallback(rig):
    """C11: with no MSI-X vectors (Linux's ``pci=nomsi``) the driver falls back to INTx
    as ``vp_find_vqs`` does; commands and a host minimum complete on the shared level
    interrupt; a host reset request sets the Interrupt Status bit and reaches the driver
    through the ISR byte's configuration bit; the device works again after the reset.
    MSI-X stays disabled and sends nothing."""
    rig.backend.nomsi = True
    vb = await probe(rig, pool_pages=8)
    vdev = vb.vdev
    assert vdev.intx_enabled
    assert await rig.backend.config_read(c.PCI_INTERRUPT_PIN, 1) == c.PCI_INTERRUPT_PIN_INTA
    assert await vb.fill_balloon(6) == 6
    assert await vb.leak_balloon(2) == 2
    await set_min_balloon(rig, 3 * PAGE)
    assert await vb.wait_for_host(WAIT) == [3 * PAGE]
    await check_balloon(rig, vb, "on INTx")
    # Whatever the driver found by polling: take its interrupt, then nothing is pending.
    await rig.settle()
    await rig.backend.sleep(QUIET)
    await vdev.vp_interrupt()
    await wait_interrupt_status(rig, False)

    await rig.mgmt_write(c.MGMT_CONTROL, c.MGMT_CONTROL_REQUEST_RESET)
    await wait_interrupt_status(rig, True)
    await vdev.vp_wait_interrupt(c.VIRTIO_MSI_NO_VECTOR, WAIT)
    assert vdev.config_changes() == 1
    await wait_interrupt_status(rig, False)
    try:
        await vb.give_pages([page_addr(POOL_FIRST_PAGE - 1)])
    except DeviceNeedsReset:
        pass
    else:
        raise AssertionError("the driver missed the host's reset request")
    await vb.reset()
    assert vb.vdev.intx_enabled and await vb.fill_balloon(2) == 2
    await check_balloon(rig, vb, "after the reset, on INTx")

    msix = await vb.vdev.find_capability(c.PCI_CAP_ID_MSIX)
    control = await rig.backend.config_read(msix + c.PCI_MSIX_FLAGS, 2)
    assert not control & c.PCI_MSIX_FLAGS_ENABLE
    assert await rig.mgmt_read(c.MGMT_MSIX_SENT) == 0


# --- C12 DMA discipline ------------------------------------------------------------------

async def _init_without_driver_ok(vb):
    """The driver's probe, with DRIVER_OK held back (virtio_pci_modern.init adds it last)."""
    add_status = vb.vdev.vp_modern_add_status

    async def without_driver_ok(status):
        await add_status(status & ~c.VIRTIO_CONFIG_S_DRIVER_OK)
    vb.vdev.vp_modern_add_status = without_driver_ok
    try:
        await vb.vdev.init(page_size=PAGE)
    finally:
        del vb.vdev.vp_modern_add_status


async def dma_discipline(rig):
    """C12: no DMA before DRIVER_OK, none while Bus Master Enable is clear (work waits and
    is done once allowed); reads only rings, tables and readable buffers, writes only used
    rings and writable buffers."""
    vb = VirtioMemballoon(rig.backend)
    vb.vdev = VirtioPciModernDevice(rig.backend)
    await _init_without_driver_ok(vb)
    vb.page_size = PAGE
    vb.init_vqs()
    fromdev, todev = vb.fromdev_vq, vb.todev_vq
    await fromdev.virtqueue_add_inbuf([bytearray(16)], "min")
    await fromdev.virtqueue_notify()
    await todev.virtqueue_add_sgs([(cmd(GIVE, page_addr(1), page_addr(2)), False)], "give")
    await todev.virtqueue_notify()
    await set_min_balloon(rig, 3 * PAGE)
    await rig.backend.sleep(QUIET)
    assert rig.dma_log == [], f"DMA before DRIVER_OK: {rig.dma_log[:4]}"
    allowed = [await ring_regions(vq) for vq in (fromdev, todev)]
    await vb.vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_DRIVER_OK)
    # The used interrupts follow the used idx: let them out before bus mastering goes off
    # (a message after that is refused by the hard IP, and the model raises on it). They
    # are awaited before the buffers are taken: a driver that polls a buffer back first
    # moves used_event past it, and the device then rightly sends none (virtio 1.2 2.7.10).
    for vq in (todev, fromdev):
        await wait_irq(rig, QUEUE_VECTOR[vq.index])
    assert await wait_used(rig, todev, 1) == [("give", 0)]
    assert await wait_used(rig, fromdev, 1) == [("min", 16)]

    await rig.backend.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY, 2)
    await rig.settle()
    touched = len(rig.dma_log)
    get = cmd(GET, page_addr(1))
    await todev.virtqueue_add_sgs([(get, False), (bytearray(GET_RESULT), True)], "get")
    await fromdev.virtqueue_add_inbuf([bytearray(16)], "min2")
    allowed += [await ring_regions(vq) for vq in (fromdev, todev)]
    await todev.virtqueue_notify()
    await fromdev.virtqueue_notify()
    await set_min_balloon(rig, 4 * PAGE)
    await rig.backend.sleep(QUIET)
    assert rig.dma_log[touched:] == [], "DMA with Bus Master Enable clear"
    assert await todev.virtqueue_get_buf() is None
    await rig.backend.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER, 2)
    assert await wait_used(rig, todev, 1) == [("get", GET_RESULT)]
    assert await wait_used(rig, fromdev, 1) == [("min2", 16)]
    assert await read_bitmap(rig, [0]) == {2}
    await rig.settle()

    readable = [r for pair in allowed for r in pair[0]]
    writable = [w for pair in allowed for w in pair[1]]
    for kind, addr, length in rig.dma_log:
        ranges = readable if kind == "r" else writable
        assert inside(ranges, addr, length), \
            f"C12: device {'read' if kind == 'r' else 'write'} {addr:#x}+{length} outside " \
            f"what it may touch"
    assert any(kind == "w" for kind, _, _ in rig.dma_log)


# --- C10 management registers ------------------------------------------------------------

async def mgmt_registers(rig):
    """C10: identity, bitmap size, page shift (0 before FEATURES_OK), host controls read
    back, the signed balloon size, and the bitmap word by word."""
    assert await rig.mgmt_read(c.MGMT_ID) == c.MGMT_ID_VALUE
    assert await rig.mgmt_read(c.MGMT_VERSION) == c.MGMT_VERSION_VALUE
    assert await rig.mgmt_read(c.MGMT_BITMAP_PAGES) == rig.params.bitmap_pages
    assert await rig.mgmt_read(c.MGMT_PAGE_SHIFT) == 0
    page_size = c.page_size_of_feature(max(rig.params.page_size_bits))
    vb = await probe(rig, pool_pages=0, page_size=page_size)
    assert await rig.mgmt_read(c.MGMT_PAGE_SHIFT) == page_size.bit_length() - 1
    for offset, value in ((c.MGMT_RETURN_BUDGET, 12345), (c.MGMT_MIN_BALLOON_LO, 0x1234_5000)):
        await rig.mgmt_write(offset, value)
        assert await rig.mgmt_read(offset) == value
    await set_return_budget(rig, c.MGMT_UNLIMITED_BUDGET)
    last = rig.params.bitmap_pages - 1
    pages = [0, 31, 32, 33, 1000, last]
    await raw_command(vb, cmd(GIVE, *(page_addr(p, page_size) for p in pages)))
    assert await read_bitmap(rig) == set(pages)
    assert await read_balloon_pages(rig) == len(pages)
    length, result = await raw_command(vb, cmd(GET, *(page_addr(p, page_size) for p in pages)),
                                       GET_RESULT)
    assert (length, int.from_bytes(result, "little")) == (GET_RESULT, len(pages))
    assert await read_balloon_pages(rig) == 0
    assert await rig.mgmt_read(c.MGMT_PAGES_ENTERED) == len(pages)
    assert await rig.mgmt_read(c.MGMT_PAGES_LEFT) == len(pages)
    assert await rig.mgmt_read(c.MGMT_CMD_GIVE) == await rig.mgmt_read(c.MGMT_CMD_GET) == 1


# --- the story of make sim ----------------------------------------------------------------

MIB = 1 << 20
#: The guest memory the story's driver may give: 16 MiB from 256 MiB up.
STORY_POOL = (256 * MIB, 16 * MIB)
#: Extra memory the host declares (C8): 2 MiB at 3 GiB of the window.
STORY_EXTRA = (3 << 30, 2 * MIB)
STORY_COUNTERS = ("MGMT_CMD_GIVE", "MGMT_CMD_GET", "MGMT_CMD_EXCHANGE", "MGMT_PAGES_ENTERED",
                  "MGMT_PAGES_LEFT", "MGMT_GET_SHORT", "MGMT_MIN_SENT")


async def story(rig):
    """``make sim``'s scenario: the driver inflates, the host raises the minimum and the
    driver follows, the host limits its return budget and the driver deflates with
    partial grants, an exchange, and extra memory takes the balloon below zero. Returns
    the printed lines: after each step the device's balloon size (checked against the
    driver's) and counters."""
    page = PAGE
    pool_base, pool_bytes = STORY_POOL
    extra_base, extra_bytes = STORY_EXTRA
    vb = VirtioMemballoon(rig.backend, pool=PagePool(pool_base, pool_bytes // page, page))
    await vb.virtballoon_probe(page_size=page)
    lines = [f"Balloon story: {c.size_name(page)} pages, features "
             f"{' '.join(c.feature_names(vb.vdev.accepted_features))}",
             f"  {'step':<60} {'balloon pages':>20}  {'GIVE':>4} {'GET':>4} {'XCHG':>4} "
             f"{'entered':>7} {'left':>5} {'short':>5} {'min':>3}  budget"]

    async def step(text):
        pages = await read_balloon_pages(rig)
        assert pages == vb.num_pages, f"{text}: device {pages} pages, driver {vb.num_pages}"
        counts = (await read_counters(rig, STORY_COUNTERS)).values()
        budget = await rig.mgmt_read(c.MGMT_RETURN_BUDGET)
        budget = "unlimited" if budget == c.MGMT_UNLIMITED_BUDGET else str(budget)
        size = f"{pages:>6} ({pages * page / MIB:+g} MiB)"
        lines.append(f"  {text:<60} {size:>20}  " +
                     " ".join(f"{n:>{w}}" for n, w in zip(counts, (4, 4, 4, 7, 5, 5, 3))) +
                     f"  {budget}")

    await vb.fill_balloon(8 * MIB // page)
    await step("driver inflates by 8 MiB")
    await set_min_balloon(rig, 12 * MIB)
    [minimum] = await vb.wait_for_host(WAIT)
    await step(f"host sets the minimum to {minimum // MIB} MiB (mgmt)")
    added = await vb.update_balloon_size()
    await step(f"driver follows: gives {added} pages")

    budget = MIB // page
    await set_return_budget(rig, budget)
    await set_min_balloon(rig, 4 * MIB)
    [minimum] = await vb.wait_for_host(WAIT)
    await step(f"host: return budget {budget} pages, minimum {minimum // MIB} MiB")
    for _ in range(2):
        asked = -vb.towards_target()
        got = -await vb.update_balloon_size()
        await step(f"driver deflates, budget {budget}: asks {asked}, granted {got}")
        budget *= 2
        await set_return_budget(rig, budget)
    await set_return_budget(rig, c.MGMT_UNLIMITED_BUDGET)
    got = -await vb.update_balloon_size()
    await step(f"host lifts the budget: driver granted {got} more")

    wanted = list(vb.pages)[:64]
    await vb.exchange_pages(wanted, [vb.pool.alloc_page() for _ in wanted])
    for addr in wanted:
        vb.pool.free_page(addr)
    await step(f"driver exchanges {len(wanted)} pages (compaction)")

    await set_extra_range(rig, extra_base // page, extra_bytes // page)
    await step(f"host declares {extra_bytes // MIB} MiB of extra memory at "
               f"{extra_base >> 30} GiB (host-owned)")
    await set_min_balloon(rig, -extra_bytes)
    [minimum] = await vb.wait_for_host(WAIT)
    got = -await vb.update_balloon_size()
    await step(f"host: minimum {minimum // MIB} MiB; driver empties the balloon ({got})")
    granted = await vb.get_pages([extra_base + i * page for i in range(extra_bytes // page)])
    await step(f"driver takes {len(granted)} pages of extra memory (EXTRA_MEM)")
    return lines


# --- the list ----------------------------------------------------------------------------

#: name -> (scenario, keyword arguments).
SCENARIOS = {
    "commands": (commands, {}),
    "get_budget": (get_budget, {}),
    "get_limit_and_duplicates": (get_limit_and_duplicates, {}),
    "malformed": (malformed, {}),
    "violations": (violations, {}),
    "window_base": (window_base, {}),
    "framing": (framing, {}),
    "indirect_flag_without_feature": (indirect_flag_without_feature, {}),
    "min_balloon_extra": (min_balloon, {"extra_mem": True}),
    "min_balloon_no_extra": (min_balloon, {"extra_mem": False}),
    "min_balloon_held": (min_balloon_held, {}),
    "fromdevq_malformed": (fromdevq_malformed, {}),
    **{f"fault_{kind}": (ring_fault, {"kind": kind}) for kind in RING_FAULTS},
    **{f"atomic_{c.GuestCmd(code).name.lower()}_{point}": (atomic_command,
                                                           {"code": code, "point": point})
       for code, points in ATOMIC_POINTS.items() for point in points},
    "host_reset_request": (host_reset_request, {}),
    "extra_memory": (extra_memory, {"extra_mem": True}),
    "extra_memory_refused": (extra_memory, {"extra_mem": False}),
    "reset_clears": (reset_clears, {}),
    "flr_clears": (flr_clears, {}),
    "reset_under_load": (reset_under_load, {}),
    "suppression_event_idx": (notification_suppression, {"event_idx": True}),
    "suppression_no_interrupt": (notification_suppression, {"event_idx": False}),
    "drain_and_spurious": (drain_and_spurious, {}),
    "intx_fallback": (intx_fallback, {}),
    "dma_discipline": (dma_discipline, {}),
    "mgmt_registers": (mgmt_registers, {}),
}
