"""The driver backend over cocotbext-pcie's root complex (simulation only).

Configuration accesses are type 0 configuration TLPs, BAR accesses memory TLPs of exactly
the asked width, DMA memory comes from the root complex's memory pool and MSI-X vectors
are the root complex's MSI region, counted per vector. INTx is the testbench's virtual
wire of the hard IP (``tb/intx.py``), since the root complex model takes no INTx
messages. Times are simulated seconds.
"""

from cocotb.triggers import Event, First, Timer
from cocotb.utils import get_sim_time

from . import constants as c
from .backend import Backend, BackendError, DmaRegion, InterruptTimeout, check_access

__all__ = ["SimBackend", "SimDmaRegion"]


def _ps(seconds):
    return max(1, round(seconds * 1e12))


class SimDmaRegion(DmaRegion):
    """A region of the root complex's memory pool."""

    def __init__(self, region):
        super().__init__(region.get_absolute_address(0), region.size)
        self.region = region

    async def read(self, offset, length):
        self._check(offset, length)
        return bytes(await self.region.read(offset, length))

    async def write(self, offset, data):
        self._check(offset, len(data))
        await self.region.write(offset, bytes(data))


#: DMA memory sits above 4 GiB, as IOVAs behind an IOMMU may (C3 ACCESS_PLATFORM): every
#: address the device is given has a non-zero upper dword, and none is 0.
DMA_POOL_BASE = 0x10_0000_0000
DMA_POOL_SIZE = 1 << 30


class SimBackend(Backend):
    """One function ``dev`` (a cocotbext-pcie ``PciDevice``) behind root complex ``rc``.

    ``completion_timeout`` bounds every non-posted request (simulated seconds), so a
    device that never answers raises :class:`BackendError` instead of hanging. ``intx``
    is the function's INTA as the root complex sees it (``tb/intx.py``'s ``IntxWire``:
    ``await intx.wait_level(True, timeout)``), None when it has none.
    """

    def __init__(self, rc, dev, completion_timeout=20e-6, intx=None):
        self.rc = rc
        self.dev = dev
        self.completion_timeout = completion_timeout
        self.intx = intx
        self._intx_requested = False
        self.dma_pool = rc.mem_address_space.create_pool(DMA_POOL_BASE, DMA_POOL_SIZE)
        self._irq_counts = []
        self._irq_taken = []
        self._irq_events = []

    def _timeout(self):
        return {"timeout": _ps(self.completion_timeout), "timeout_unit": "ps"}

    async def config_read(self, offset, width):
        check_access(offset, width, (1, 2, 4))
        data = await self.dev.config_read(offset, width, **self._timeout())
        return int.from_bytes(data, "little")

    async def config_write(self, offset, value, width):
        check_access(offset, width, (1, 2, 4))
        await self.dev.config_write(offset, value.to_bytes(width, "little"), **self._timeout())

    def _window(self, bar):
        window = self.dev.bar_window[bar] if 0 <= bar < len(self.dev.bar_window) else None
        if window is None:
            raise BackendError(f"BAR{bar} is not implemented or not assigned")
        return window

    async def bar_read(self, bar, offset, width):
        check_access(offset, width)
        return int.from_bytes(await self.bar_read_block(bar, offset, width), "little")

    async def bar_write(self, bar, offset, value, width):
        check_access(offset, width)
        await self._window(bar).write(offset, value.to_bytes(width, "little"))

    async def bar_read_block(self, bar, offset, length):
        try:
            return bytes(await self._window(bar).read(offset, length, **self._timeout()))
        except BackendError:
            raise
        except Exception as exc:    # cocotbext-pcie raises bare Exception on UR/CA/timeout
            raise BackendError(f"BAR{bar} read {offset:#x}+{length}: {exc}") from exc

    def bar_size(self, bar):
        if not 0 <= bar < len(self.dev.bar_size):
            return 0
        return self.dev.bar_size[bar] or 0

    def dma_alloc(self, size):
        size = max(4096, 1 << (size - 1).bit_length())   # buddy pool: aligned to size
        return SimDmaRegion(self.dma_pool.alloc_region(size))

    async def alloc_irq_vectors(self, nvec):
        if self.nomsi:
            return 0
        if not self.dev.msix_enabled:
            got = await self.dev.alloc_irq_vectors(nvec, nvec)
            if got < nvec:
                return max(got, 0)
            self._irq_counts = [0] * nvec
            self._irq_taken = [0] * nvec
            self._irq_events = [Event() for _ in range(nvec)]
            for vector in range(nvec):
                self.dev.request_irq(vector, self._irq_handler(vector))
        return len(self._irq_counts)

    def _irq_handler(self, vector):
        async def handler():
            self._irq_counts[vector] += 1
            self._irq_events[vector].set()
        return handler

    async def wait_irq(self, vector, timeout):
        deadline = self.now() + timeout
        while self._irq_counts[vector] <= self._irq_taken[vector]:
            remaining = deadline - self.now()
            if remaining <= 0:
                raise InterruptTimeout(vector, timeout)
            event = self._irq_events[vector]
            event.clear()
            await First(event.wait(), Timer(_ps(remaining), "ps"))
        self._irq_taken[vector] += 1

    def irq_count(self, vector):
        return self._irq_counts[vector]

    async def request_intx(self):
        if self.intx is None or not await self.config_read(c.PCI_INTERRUPT_PIN, 1):
            raise BackendError("the function has no INTx")
        command = await self.config_read(c.PCI_COMMAND, 2)
        if command & c.PCI_COMMAND_INTX_DISABLE:
            await self.config_write(c.PCI_COMMAND, command & ~c.PCI_COMMAND_INTX_DISABLE, 2)
        self._intx_requested = True

    async def wait_intx(self, timeout):
        if not self._intx_requested:
            raise BackendError("INTx was not requested")
        if not await self.intx.wait_level(True, timeout):
            raise InterruptTimeout(None, timeout)

    async def sleep(self, seconds):
        await Timer(_ps(seconds), "ps")

    def now(self):
        return get_sim_time("ps") * 1e-12
