"""Driver model of the memballoon device, structured like Linux ``drivers/virtio/virtio_balloon.c``.

``virtballoon_probe`` negotiates one page size (and EXTRA_MEM when offered and wanted)
through :mod:`memballoon.virtio_pci_modern`, wraps both queues with
:mod:`memballoon.virtio_ring` (``init_vqs``) and keeps one 16-byte buffer posted on
fromdevq (C6). Commands go to todevq through ``tell_host`` (C5): :meth:`give_pages`,
:meth:`get_pages` (returns the granted prefix), :meth:`exchange_pages`. The driver tracks
which pages are in the balloon and its signed size, checks every request against that
before anything reaches the device, and follows the host's MIN_BALLOON with the policy
:meth:`update_balloon_size` (``fill_balloon``/``leak_balloon`` over a :class:`PagePool`).
"""

import struct

from . import constants as c
from .backend import InterruptTimeout
from .virtio_pci_modern import DeviceTimeout, VirtioError, VirtioPciModernDevice
from .virtio_ring import VirtqueueFull, vring_new_virtqueue

__all__ = ["VirtioMemballoon", "PagePool", "BalloonUsageError", "BalloonDeviceError",
           "DeviceNeedsReset", "default_sg_policy", "VIRTIO_MEMBALLOON_ARRAY_PAGES_MAX"]

#: Addresses per GIVE/GET command (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX).
VIRTIO_MEMBALLOON_ARRAY_PAGES_MAX = 256
#: The GET result: one le64 count of granted pages (C5).
GET_RESULT_BYTES = 8


class BalloonUsageError(ValueError):
    """The caller asked for something the driver must not send (draft, C5)."""


class BalloonDeviceError(VirtioError):
    """The device answered something C5/C6 do not allow."""


class DeviceNeedsReset(VirtioError):
    """The device set DEVICE_NEEDS_RESET (C7 fault or host request, C10): reset it."""


class PagePool:
    """The guest pages the policy may give (``balloon_page_alloc``): ``count`` pages of
    ``page_size`` bytes from ``base``; pages taken back from the balloon return here."""

    def __init__(self, base, count, page_size):
        if page_size <= 0 or page_size & (page_size - 1) or base % page_size:
            raise ValueError(f"pool base {base:#x} must be aligned to a power-of-two page "
                             f"size, not {page_size}")
        self.page_size = page_size
        self.free = [base + i * page_size for i in range(count)]

    def alloc_page(self):
        """A free page's address, or None when the guest has none to spare."""
        return self.free.pop() if self.free else None

    def free_page(self, addr):
        self.free.append(addr)

    def forget(self, addrs):
        """Drop ``addrs`` from the free pages (memory that went back to the host)."""
        self.free = [addr for addr in self.free if addr not in addrs]


def default_sg_policy(command, writable):
    """How a command becomes a scatter list: one readable segment with the command, one
    writable segment for a GET's result; the ring decides about indirect tables."""
    sgs = [(command, False)]
    if writable:
        sgs.append((bytearray(writable), True))
    return sgs, None


def _pack(code, addrs):
    return struct.pack(f"<{1 + len(addrs)}Q", code, *addrs)


class VirtioMemballoon:
    """``struct virtio_balloon`` for one memballoon function behind ``backend``.

    ``pool`` supplies pages to the policy; ``sg_policy(command, writable_len) ->
    (scatter list, indirect)`` decides how each command is split into segments (tests
    pass random ones); ``timeout`` bounds each wait for the device (backend seconds);
    ``deflate`` lets the policy shrink the balloon towards the host minimum.
    """

    def __init__(self, backend, pool=None, sg_policy=default_sg_policy, timeout=1e-3,
                 deflate=True, max_pages_per_cmd=VIRTIO_MEMBALLOON_ARRAY_PAGES_MAX):
        if max_pages_per_cmd < 1:
            raise ValueError("max_pages_per_cmd must be at least 1")
        self.backend = backend
        self.pool = pool
        self.sg_policy = sg_policy
        self.timeout = timeout
        self.deflate = deflate
        self.max_pages_per_cmd = max_pages_per_cmd
        self.vdev = None
        self.fromdev_vq = self.todev_vq = None
        self._vectors = {}
        self._probe_args = None
        self._forget_state()

    def _forget_state(self):
        #: Pages in the balloon, oldest first (a dict keeps the order for leak_balloon).
        self.pages = {}
        #: Extra memory the guest holds, got from the host beyond what it gave (C8).
        self.extra_pages = set()
        #: Every page that came from extra memory since probe: a reset gives them back.
        self.extra_origin = set()
        #: Balloon size in pages: +1 per page entering, -1 per page leaving (C8).
        self.num_pages = 0
        #: The host's last MIN_BALLOON (bytes), None before the first.
        self.min_balloon = None
        self.needs_reset = False
        self._config_irqs_seen = 0

    # --- probe and remove ----------------------------------------------------------------

    async def virtballoon_probe(self, page_size=None, without=(), queue_size=None):
        """Initialise the device (virtio 1.2 3.1.1): one page size (``page_size`` bytes,
        or the smallest offered), every offered feature except the bits in ``without``
        (e.g. EXTRA_MEM, INDIRECT_DESC, RING_EVENT_IDX), both queues, one fromdevq buffer."""
        self._probe_args = (page_size, tuple(without), queue_size)
        wanted = (1 << 64) - 1
        for bit in without:
            if not isinstance(bit, int) or not 0 <= bit < 64:
                raise BalloonUsageError(f"{bit!r} is not a feature bit (0..63)")
            if bit == c.VIRTIO_F_VERSION_1 or bit in c.PAGE_SIZE_FEATURE_BITS:
                raise BalloonUsageError(f"feature bit {bit} cannot be left out "
                                        f"(VERSION_1 and the page size are not optional)")
            wanted &= ~(1 << bit)
        self.vdev = VirtioPciModernDevice(self.backend)
        await self.vdev.init(page_size=page_size, wanted=wanted, queue_size=queue_size)
        accepted = self.vdev.accepted_features
        bit = next(b for b in c.PAGE_SIZE_FEATURE_BITS if accepted >> b & 1)
        self.page_size = c.page_size_of_feature(bit)
        self.extra_mem = bool(accepted >> c.VIRTIO_MEMBALLOON_F_EXTRA_MEM & 1)
        if self.pool is not None and self.pool.page_size != self.page_size:
            raise BalloonUsageError(f"page pool holds {c.size_name(self.pool.page_size)} "
                                    f"pages, the device negotiated "
                                    f"{c.size_name(self.page_size)}")
        self.init_vqs()
        await self.send_msg_buf()

    def init_vqs(self):
        """Wrap the queues ``setup_vq`` placed: 0 = fromdevq, 1 = todevq (C2)."""
        vqs = []
        for info in self.vdev.queues:
            async def notify(vq, info=info):
                await self.vdev.vp_notify(info.notify, info.index)
            vq = vring_new_virtqueue(info.index, info.num, self.backend, notify,
                                     self.vdev.accepted_features, info.ring, info.desc_addr,
                                     info.avail_addr, info.used_addr,
                                     name=("fromdevq", "todevq")[info.index])
            self._vectors[vq] = info.vector
            vqs.append(vq)
        self.fromdev_vq, self.todev_vq = vqs

    async def send_msg_buf(self):
        """Post one empty 16-byte buffer on fromdevq and notify (draft: initialisation)."""
        buf = bytearray(c.FROMDEVQ_MIN_BUFFER)
        await self.fromdev_vq.virtqueue_add_inbuf([buf], buf)
        await self.fromdev_vq.virtqueue_kick()

    async def virtballoon_remove(self):
        """Reset the device and take back every buffer. The reset empties the balloon
        (C9), so its pages return to the pool; extra memory returns to the host (C8),
        also where it sits in the pool."""
        await self.vdev.vp_modern_reset()
        for vq in (self.fromdev_vq, self.todev_vq):
            while await vq.virtqueue_detach_unused_buf() is not None:
                pass
        if self.pool is not None:
            for addr in self.pages:
                self.pool.free_page(addr)
            self.pool.forget(self.extra_origin)
        self._forget_state()

    async def reset(self):
        """Remove and probe again with the same choices (after DEVICE_NEEDS_RESET)."""
        await self.virtballoon_remove()
        page_size, without, queue_size = self._probe_args
        await self.virtballoon_probe(page_size, without, queue_size)

    # --- talking to the device -------------------------------------------------------------

    async def virtballoon_changed(self):
        """The configuration interrupt's handler: notice DEVICE_NEEDS_RESET (C7, C10)."""
        count = self.vdev.config_changes()
        if count != self._config_irqs_seen:
            self._config_irqs_seen = count
            if await self.vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET:
                self.needs_reset = True
        if self.needs_reset:
            raise DeviceNeedsReset("the device needs a reset (DEVICE_NEEDS_RESET)")

    async def _wait_used(self, vq):
        """The next used buffer of ``vq``, waiting for its interrupt."""
        deadline = self.backend.now() + self.timeout
        while True:
            got = await vq.virtqueue_get_buf()
            if got is not None:
                return got
            await self.virtballoon_changed()
            remaining = deadline - self.backend.now()
            if remaining <= 0:
                raise DeviceTimeout(f"{vq.name}: no used buffer within {self.timeout:g} s")
            try:
                await self.vdev.vp_wait_interrupt(self._vectors[vq], remaining)
            except InterruptTimeout:
                pass

    async def tell_host(self, commands):
        """Send ``commands`` ((bytes, writable length) each) on todevq, as many at once as
        fit, and return (used.len, written bytes) of each, in order. Nothing is sent once
        the device has asked for a reset."""
        await self.virtballoon_changed()
        vq = self.todev_vq
        results = [None] * len(commands)
        sent = in_flight = 0
        while sent < len(commands) or in_flight:
            posted = False
            while sent < len(commands):
                sgs, indirect = self.sg_policy(*commands[sent])
                sinks = [seg for seg, writable in sgs if writable and isinstance(seg, bytearray)]
                try:
                    await vq.virtqueue_add_sgs(sgs, (sent, sinks), indirect)
                except VirtqueueFull:
                    if not in_flight:
                        raise
                    break
                sent += 1
                in_flight += 1
                posted = True
            if posted:
                await vq.virtqueue_kick()
            (index, sinks), length = await self._wait_used(vq)
            results[index] = (length, b"".join(sinks))
            in_flight -= 1
        return results

    # --- commands (C5) ---------------------------------------------------------------------

    def _check_pages(self, addrs, what):
        addrs = list(addrs)
        if not addrs:
            raise BalloonUsageError(f"{what}: at least one page (draft: one or more)")
        for addr in addrs:
            if not isinstance(addr, int) or not 0 <= addr < 1 << 64:
                raise BalloonUsageError(f"{what}: {addr!r} is not a 64-bit address")
            if addr % self.page_size:
                raise BalloonUsageError(f"{what}: {addr:#x} is not aligned to the "
                                        f"{c.size_name(self.page_size)} page size")
        if len(set(addrs)) != len(addrs):
            raise BalloonUsageError(f"{what}: a page appears twice")
        return addrs

    def _check_wanted(self, addrs, what):
        for addr in addrs:
            if addr in self.pages:
                continue
            if not self.extra_mem:
                raise BalloonUsageError(f"{what}: page {addr:#x} is not in the balloon; "
                                        f"without EXTRA_MEM only pages given can be asked for")
            if addr in self.extra_pages:
                raise BalloonUsageError(f"{what}: page {addr:#x} is already the guest's "
                                        f"(extra memory got before)")

    def _check_not_in_balloon(self, addrs, what, leaving=()):
        for addr in addrs:
            if addr in self.pages and addr not in leaving:
                raise BalloonUsageError(f"{what}: page {addr:#x} is already in the balloon "
                                        f"(a page must not be given twice)")

    def _chunks(self, addrs):
        step = self.max_pages_per_cmd
        return [addrs[i:i + step] for i in range(0, len(addrs), step)]

    def _entered(self, addrs):
        for addr in addrs:
            self.pages[addr] = None
            self.extra_pages.discard(addr)
        self.num_pages += len(addrs)

    def _left(self, addrs):
        for addr in addrs:
            if addr in self.pages:
                del self.pages[addr]
            else:
                self.extra_origin.add(addr)
            if addr in self.extra_origin:
                self.extra_pages.add(addr)
        self.num_pages -= len(addrs)

    def _check_used(self, what, length, expected):
        if length != expected:
            raise BalloonDeviceError(f"{what}: used.len {length}, C5 says {expected}")

    async def give_pages(self, addrs):
        """GIVE_PAGES: put ``addrs`` (page-aligned, not in the balloon) into the balloon."""
        addrs = self._check_pages(addrs, "give_pages")
        self._check_not_in_balloon(addrs, "give_pages")
        chunks = self._chunks(addrs)
        results = await self.tell_host(
            [(_pack(c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES, chunk), 0) for chunk in chunks])
        for chunk, (length, _) in zip(chunks, results):
            self._check_used("GIVE_PAGES", length, 0)
            self._entered(chunk)

    async def get_pages(self, addrs):
        """GET_PAGES: ask for ``addrs`` back (pages in the balloon, or with EXTRA_MEM pages
        the guest does not have); returns the prefix the host granted (C5)."""
        addrs = self._check_pages(addrs, "get_pages")
        self._check_wanted(addrs, "get_pages")
        granted = []
        for chunk in self._chunks(addrs):
            [(length, result)] = await self.tell_host(
                [(_pack(c.VIRTIO_MEMBALLOON_GCMD_GET_PAGES, chunk), GET_RESULT_BYTES)])
            self._check_used("GET_PAGES", length, GET_RESULT_BYTES)
            count = int.from_bytes(result[:GET_RESULT_BYTES], "little")
            if count > len(chunk):
                raise BalloonDeviceError(f"GET_PAGES granted {count} of {len(chunk)} pages")
            self._left(chunk[:count])
            granted += chunk[:count]
            if count < len(chunk):
                break
        return granted

    async def exchange_pages(self, wanted, give):
        """EXCHANGE_PAGES in one command: ``wanted`` leave the balloon, then ``give`` enter
        it (a wanted page may be given back in the same exchange). It cannot be refused."""
        wanted = self._check_pages(wanted, "exchange_pages wanted")
        give = self._check_pages(give, "exchange_pages give")
        if len(wanted) != len(give):
            raise BalloonUsageError(f"exchange_pages: {len(wanted)} wanted but {len(give)} "
                                    f"given; an exchange is pairs")
        self._check_wanted(wanted, "exchange_pages")
        self._check_not_in_balloon(give, "exchange_pages", leaving=set(wanted))
        [(length, _)] = await self.tell_host(
            [(_pack(c.VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES, wanted + give), 0)])
        self._check_used("EXCHANGE_PAGES", length, 0)
        self._left(wanted)
        self._entered(give)

    # --- fromdevq (C6) -----------------------------------------------------------------------

    async def virtballoon_fromdev(self):
        """Take every message the device wrote on fromdevq, refilling the buffer each
        time; the MIN_BALLOON values (bytes) in order."""
        values = []
        while (got := await self.fromdev_vq.virtqueue_get_buf()) is not None:
            buf, length = got
            await self.send_msg_buf()
            if length != c.FROMDEVQ_MIN_BUFFER:
                raise BalloonDeviceError(f"fromdevq message of {length} bytes; MIN_BALLOON "
                                         f"has {c.FROMDEVQ_MIN_BUFFER}")
            code, value = struct.unpack("<Qq", buf)
            if code != c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON:
                raise BalloonDeviceError(f"unknown fromdevq command {code}")
            if value < 0 and not self.extra_mem:
                raise BalloonDeviceError(f"negative minimum {value} without EXTRA_MEM")
            self.min_balloon = value
            values.append(value)
        return values

    async def wait_for_host(self, timeout):
        """Wait up to ``timeout`` for fromdevq messages and handle them (may be none)."""
        deadline = self.backend.now() + timeout
        while not (values := await self.virtballoon_fromdev()):
            remaining = deadline - self.backend.now()
            if remaining <= 0:
                break
            try:
                await self.vdev.vp_wait_interrupt(self._vectors[self.fromdev_vq], remaining)
            except InterruptTimeout:
                pass
        return values

    # --- policy ------------------------------------------------------------------------------

    def towards_target(self):
        """Pages to add (> 0) or take back (< 0) to reach the host minimum: inflate up to
        it, deflate down to it if ``deflate`` allows, never below an empty balloon."""
        if self.min_balloon is None:
            return 0
        target = -(-self.min_balloon // self.page_size)
        diff = target - self.num_pages
        if diff < 0:
            return -min(-diff, len(self.pages)) if self.deflate else 0
        return diff

    async def fill_balloon(self, num):
        """Give up to ``num`` pages from the pool; how many were given."""
        if self.pool is None:
            raise BalloonUsageError("the policy needs a PagePool to take pages from")
        pages = []
        while len(pages) < num and (addr := self.pool.alloc_page()) is not None:
            pages.append(addr)
        if pages:
            try:
                await self.give_pages(pages)
            except Exception:
                for addr in pages:
                    self.pool.free_page(addr)
                raise
        return len(pages)

    async def leak_balloon(self, num):
        """Ask for the ``num`` newest pages back; granted pages return to the pool. How
        many came back (fewer when the host's budget runs out, C10)."""
        if self.pool is None:
            raise BalloonUsageError("the policy needs a PagePool to return pages to")
        pages = list(self.pages)[::-1][:num]
        if not pages:
            return 0
        granted = await self.get_pages(pages)
        for addr in granted:
            self.pool.free_page(addr)
        return len(granted)

    async def update_balloon_size(self):
        """Move the balloon towards the host minimum once; the page change (signed)."""
        diff = self.towards_target()
        if diff > 0:
            return await self.fill_balloon(diff)
        if diff < 0:
            return -await self.leak_balloon(-diff)
        return 0
