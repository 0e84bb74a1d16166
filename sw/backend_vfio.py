"""The driver backend over Linux VFIO: the same driver model on a real PCIe function.

:meth:`VfioBackend.open` follows ``Documentation/driver-api/vfio.rst``: a type1v2
container, the function's group (checked viable) attached to it, the device fd. Then:

- configuration space: ``pread``/``pwrite`` of exactly the asked width on the config
  region (vfio-pci virtualises what it must, e.g. the MSI-X capability);
- BARs: the region is ``mmap``-ed and every access is one load or store of exactly 1, 2, 4
  or 8 bytes (``ctypes`` integers at the mapped address); a region vfio-pci does not let
  us map is accessed with ``pread``/``pwrite`` of the same width instead;
- DMA memory: 2 MiB chunks of anonymous memory (huge pages when some are reserved,
  ``MAP_HUGETLB``), each mapped once with ``VFIO_IOMMU_MAP_DMA`` at an IOVA from
  :class:`IovaAllocator` (above 4 GiB when the IOMMU allows, so the upper address dword is
  exercised) and carved into naturally aligned regions; unmapped on close;
- MSI-X: one ``eventfd`` per vector given to ``VFIO_DEVICE_SET_IRQS``, watched by the
  running asyncio loop, so the async driver waits for interrupts unchanged;
- INTx: an ``eventfd`` on ``VFIO_PCI_INTX_IRQ_INDEX``. vfio-pci masks the level
  interrupt each time it fires (with the command register's Interrupt Disable, or at the
  interrupt controller); the next :meth:`VfioBackend.wait_intx` unmasks it
  (``VFIO_IRQ_SET_ACTION_UNMASK``) once the driver has read the cause away, and vfio-pci
  fires again at once if the function still asserts it.

:meth:`VfioBackend.close` (also the context manager's exit, so on errors and Ctrl-C)
disables the vectors, resets the function, unmaps and frees DMA memory and BARs and closes
every fd; the kernel would do the same when the process dies, but not while it lives.
Times are wall-clock seconds.
"""

import asyncio
import ctypes
import ctypes.util
import errno
import mmap
import os
import time

from . import constants as c
from . import vfio
from .backend import Backend, BackendError, DmaRegion, InterruptTimeout, check_access
from .pci_sysfs import (BarMissing, DeviceBusy, GroupNotViable, NoIommu, NotBoundToVfio,
                        PciFunction, VFIO_DRIVER, require_root)

__all__ = ["VfioBackend", "VfioDmaRegion", "IovaAllocator", "DMA_CHUNK"]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_HUGETLB = 0x40000                           # linux/mman.h; Python's mmap lacks it

#: DMA memory is mapped in chunks of one x86 huge page.
DMA_CHUNK = 2 << 20
#: Preferred lowest IOVA: 4 GiB.
IOVA_BASE = 1 << 32
_INT_TYPES = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}


def _mmap(length, prot, flags, fd=-1, offset=0):
    addr = _libc.mmap(None, length, prot, flags, fd, offset)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return addr


class IovaAllocator:
    """Hands out naturally aligned IOVA ranges from the IOMMU's usable ranges (inclusive
    ``(start, end)`` pairs), lowest first above :data:`IOVA_BASE` where possible. Ranges are
    not reused: the backend maps a few chunks and frees them all at close."""

    def __init__(self, ranges=None):
        ranges = sorted(ranges or [(0, (1 << 48) - 1)])
        above = [(max(start, IOVA_BASE), end) for start, end in ranges if end >= IOVA_BASE]
        self.ranges = above or ranges
        self.next = self.ranges[0][0]

    def alloc(self, size, align):
        for start, end in self.ranges:
            base = -(-max(self.next, start) // align) * align
            if base + size - 1 <= end:
                self.next = base + size
                return base
        raise BackendError(f"no IOVA space left for {size:#x} bytes")


class VfioDmaRegion(DmaRegion):
    """DMA memory at host address ``addr``, seen by the device at ``iova``."""

    def __init__(self, addr, iova, size):
        super().__init__(iova, size)
        self.addr = addr

    async def read(self, offset, length):
        self._check(offset, length)
        return ctypes.string_at(self.addr + offset, length)

    async def write(self, offset, data):
        data = bytes(data)
        self._check(offset, len(data))
        ctypes.memmove(self.addr + offset, data, len(data))


class _Bar:
    """One BAR region: its size, file offset and (when mappable) mapped address."""

    def __init__(self, device_fd, info, use_mmap):
        self.size = info.size
        self.offset = info.offset
        self.addr = None
        if use_mmap and info.flags & vfio.VFIO_REGION_INFO_FLAG_MMAP \
                and info.size >= mmap.PAGESIZE:
            try:
                self.addr = _mmap(info.size, mmap.PROT_READ | mmap.PROT_WRITE,
                                  mmap.MAP_SHARED, device_fd, info.offset)
            except OSError:
                self.addr = None        # e.g. an MSI-X table vfio-pci keeps to itself

    def close(self):
        if self.addr is not None:
            _libc.munmap(self.addr, self.size)
            self.addr = None


class VfioBackend(Backend):
    """One PCI function bound to vfio-pci. Use :meth:`open` (a context manager).
    ``mmap_bars=False`` makes every BAR access a ``pread``/``pwrite`` (the path taken for
    a region vfio-pci does not let us map)."""

    def __init__(self, bdf, sysfs="/sys", mmap_bars=True):
        self.bdf = bdf
        self.sysfs = sysfs
        self.mmap_bars = mmap_bars
        self.container = self.group = self.device = None
        self.bars = []
        self.config_offset = None
        self.iova = None
        #: Mapped DMA chunks: (addr, iova, size, huge).
        self.chunks = []
        self._chunk_used = DMA_CHUNK
        self.huge_pages = None
        self.msix_count = 0
        self._eventfds = []
        self._loop = None
        self._irq_counts = []
        self._irq_taken = []
        self._irq_events = []
        self._intx_fd = None
        self._intx_count = 0
        self._intx_taken = 0
        self._intx_event = None
        self._intx_masked = False

    @classmethod
    def open(cls, bdf, sysfs="/sys", mmap_bars=True):
        """Open ``bdf`` (bound to vfio-pci) with memory decoding and bus mastering on."""
        backend = cls(bdf, sysfs, mmap_bars)
        try:
            backend._open()
        except BaseException:
            backend.close()
            raise
        return backend

    def _open(self):
        require_root()
        function = PciFunction(self.bdf, self.sysfs)
        group = function.iommu_group
        if function.driver != VFIO_DRIVER:
            raise NotBoundToVfio(f"{self.bdf} is bound to {function.driver or 'no driver'}, "
                                 f"not {VFIO_DRIVER}: run `memballoon vfio bind {self.bdf}`")
        try:
            self.container = vfio.VfioContainer()
        except FileNotFoundError:
            raise NoIommu("/dev/vfio/vfio missing: load vfio-pci (modprobe vfio-pci)") from None
        try:
            self.group = vfio.VfioGroup(group)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceBusy(f"IOMMU group {group} of {self.bdf} is open in another "
                                 f"process (another driver run, QEMU?)") from None
            raise
        if not self.group.status() & vfio.VFIO_GROUP_FLAGS_VIABLE:
            function.check_group_viable()
            raise GroupNotViable(f"IOMMU group {group} of {self.bdf} is not viable")
        self.group.set_container(self.container)
        self.container.set_iommu()
        try:
            device_fd = self.group.device_fd(self.bdf)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceBusy(f"{self.bdf} is open in another process") from None
            raise
        try:
            self.device = vfio.VfioDevice(device_fd)
        except BaseException:
            os.close(device_fd)         # no VfioDevice owns it yet, so close() would not
            raise
        self.iova = IovaAllocator(self.container.iova_ranges())
        self.config_offset = self.device.region_info(vfio.VFIO_PCI_CONFIG_REGION_INDEX).offset
        self.bars = [_Bar(self.device.fd, self.device.region_info(index), self.mmap_bars)
                     for index in range(vfio.VFIO_PCI_BAR0_REGION_INDEX,
                                        vfio.VFIO_PCI_BAR5_REGION_INDEX + 1)]
        self.msix_count = self.device.irq_info(vfio.VFIO_PCI_MSIX_IRQ_INDEX).count
        command = self._config_read(c.PCI_COMMAND, 2)
        self._config_write(c.PCI_COMMAND,
                           command | c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER, 2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release everything :meth:`open` and the driver's run took; safe to call twice."""
        if self.device is not None:
            self._free_irqs()
            if self.device.flags & vfio.VFIO_DEVICE_FLAGS_RESET:
                try:
                    self.device.reset()
                except OSError:
                    pass                # the reset is a courtesy; the fds still close
        for bar in self.bars:
            bar.close()
        self.bars = []
        for addr, iova, size, _ in self.chunks:
            try:
                self.container.unmap_dma(iova, size)
            except OSError:
                pass                    # closing the container unmaps it all the same
            _libc.munmap(addr, size)
        self.chunks = []
        if self.device is not None:
            self.device.close()
            self.device = None
        if self.group is not None:
            self.group.close()
            self.group = None
        if self.container is not None:
            self.container.close()
            self.container = None

    # --- configuration space ---------------------------------------------------------------

    def _config_read(self, offset, width):
        data = os.pread(self.device.fd, width, self.config_offset + offset)
        if len(data) != width:
            raise BackendError(f"config read {offset:#x}+{width} returned {len(data)} bytes")
        return int.from_bytes(data, "little")

    def _config_write(self, offset, value, width):
        os.pwrite(self.device.fd, value.to_bytes(width, "little"), self.config_offset + offset)

    async def config_read(self, offset, width):
        check_access(offset, width, (1, 2, 4))
        return self._config_read(offset, width)

    async def config_write(self, offset, value, width):
        check_access(offset, width, (1, 2, 4))
        self._config_write(offset, value, width)

    # --- BARs --------------------------------------------------------------------------------

    def _bar(self, bar, offset, width):
        if not 0 <= bar < len(self.bars) or not self.bars[bar].size:
            raise BarMissing(f"{self.bdf}: BAR{bar} is not implemented (region size 0)")
        region = self.bars[bar]
        if offset < 0 or offset + width > region.size:
            raise BackendError(f"BAR{bar} access {offset:#x}+{width} outside its "
                               f"{region.size:#x} bytes")
        return region

    async def bar_read(self, bar, offset, width):
        check_access(offset, width)
        region = self._bar(bar, offset, width)
        if region.addr is not None:
            return _INT_TYPES[width].from_address(region.addr + offset).value
        data = os.pread(self.device.fd, width, region.offset + offset)
        return int.from_bytes(data, "little")

    async def bar_write(self, bar, offset, value, width):
        check_access(offset, width)
        region = self._bar(bar, offset, width)
        if region.addr is not None:
            _INT_TYPES[width].from_address(region.addr + offset).value = value
        else:
            os.pwrite(self.device.fd, value.to_bytes(width, "little"), region.offset + offset)

    def bar_size(self, bar):
        return self.bars[bar].size if 0 <= bar < len(self.bars) else 0

    # --- DMA memory --------------------------------------------------------------------------

    def _map_chunk(self, size):
        """Anonymous memory of ``size`` bytes (huge pages if possible), IOMMU-mapped."""
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        try:
            addr, huge = _mmap(size, prot, flags | MAP_HUGETLB), True
        except OSError:
            addr, huge = _mmap(size, prot, flags), False    # no huge pages reserved
        try:
            iova = self.iova.alloc(size, DMA_CHUNK)
            self.container.map_dma(addr, iova, size)
        except BaseException:
            _libc.munmap(addr, size)
            raise
        self.chunks.append((addr, iova, size, huge))
        self.huge_pages = huge if self.huge_pages is None else self.huge_pages and huge
        return addr, iova

    def dma_alloc(self, size):
        if size <= 0:
            raise BackendError(f"cannot allocate {size} bytes of DMA memory")
        align = max(mmap.PAGESIZE, 1 << (size - 1).bit_length())
        if align >= DMA_CHUNK:
            length = -(-size // DMA_CHUNK) * DMA_CHUNK
            addr, iova = self._map_chunk(length)
            return VfioDmaRegion(addr, iova, size)
        offset = -(-self._chunk_used // align) * align
        if offset + size > DMA_CHUNK:
            self._map_chunk(DMA_CHUNK)
            offset = 0
        addr, iova, _, _ = self.chunks[-1]
        self._chunk_used = offset + size
        return VfioDmaRegion(addr + offset, iova + offset, size)

    # --- MSI-X ---------------------------------------------------------------------------------

    async def alloc_irq_vectors(self, nvec):
        if self._eventfds:
            return len(self._eventfds)
        count = 0 if self.nomsi else min(nvec, self.msix_count)
        if count == 0:
            return 0
        self._loop = asyncio.get_running_loop()
        try:
            for vector in range(count):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._eventfds.append(fd)
                self._loop.add_reader(fd, self._irq_ready, vector)
            self.device.set_irq_eventfds(vfio.VFIO_PCI_MSIX_IRQ_INDEX, self._eventfds)
        except BaseException:
            self._free_irqs()
            raise
        self._irq_counts = [0] * count
        self._irq_taken = [0] * count
        self._irq_events = [asyncio.Event() for _ in range(count)]
        return count

    def _irq_ready(self, vector):
        """The eventfd of ``vector`` is readable: count the messages it accumulated."""
        try:
            self._irq_counts[vector] += os.eventfd_read(self._eventfds[vector])
        except BlockingIOError:
            return
        self._irq_events[vector].set()

    def _free_irqs(self):
        intx = [self._intx_fd] if self._intx_fd is not None else []
        for index, fds in ((vfio.VFIO_PCI_MSIX_IRQ_INDEX, self._eventfds),
                           (vfio.VFIO_PCI_INTX_IRQ_INDEX, intx)):
            if fds:
                try:
                    self.device.set_irq_eventfds(index, [])
                except OSError:
                    pass                # never enabled: nothing to disable
            for fd in fds:
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.remove_reader(fd)
                os.close(fd)
        self._eventfds = []
        self._intx_fd = None
        self._intx_masked = False

    def _check_vector(self, vector):
        if not 0 <= vector < len(self._irq_counts):
            raise BackendError(f"vector {vector} was not allocated "
                               f"({len(self._irq_counts)} vectors)")

    async def wait_irq(self, vector, timeout):
        self._check_vector(vector)
        deadline = self.now() + timeout
        while self._irq_counts[vector] <= self._irq_taken[vector]:
            remaining = deadline - self.now()
            if remaining <= 0:
                raise InterruptTimeout(vector, timeout)
            event = self._irq_events[vector]
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        self._irq_taken[vector] += 1

    def irq_count(self, vector):
        self._check_vector(vector)
        return self._irq_counts[vector]

    # --- INTx ----------------------------------------------------------------------------------

    async def request_intx(self):
        if self._intx_fd is not None:
            return
        if not self.device.irq_info(vfio.VFIO_PCI_INTX_IRQ_INDEX).count:
            raise BackendError(f"{self.bdf} has no INTx (interrupt pin 0, or no IRQ routed)")
        self._loop = asyncio.get_running_loop()
        self._intx_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._intx_event = asyncio.Event()
        self._loop.add_reader(self._intx_fd, self._intx_ready)
        try:
            self.device.set_irq_eventfds(vfio.VFIO_PCI_INTX_IRQ_INDEX, [self._intx_fd])
        except BaseException:
            self._free_irqs()
            raise
        self._intx_count = self._intx_taken = 0
        self._intx_masked = False

    def _intx_ready(self):
        try:
            self._intx_count += os.eventfd_read(self._intx_fd)
        except BlockingIOError:
            return
        self._intx_event.set()

    async def wait_intx(self, timeout):
        if self._intx_fd is None:
            raise BackendError("INTx was not requested")
        if self._intx_masked:
            self.device.unmask_irq(vfio.VFIO_PCI_INTX_IRQ_INDEX)
            self._intx_masked = False
        deadline = self.now() + timeout
        while self._intx_count <= self._intx_taken:
            remaining = deadline - self.now()
            if remaining <= 0:
                raise InterruptTimeout(None, timeout)
            self._intx_event.clear()
            try:
                await asyncio.wait_for(self._intx_event.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        self._intx_taken = self._intx_count
        self._intx_masked = True

    # --- wall time -----------------------------------------------------------------------------

    async def sleep(self, seconds):
        await asyncio.sleep(seconds)

    def now(self):
        return time.monotonic()
