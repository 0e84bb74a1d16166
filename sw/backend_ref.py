"""The driver backend over the reference model (:mod:`memballoon.refmodel`).

The same driver that runs against the RTL (``backend_sim``) or the board runs unchanged
against the model: configuration and BAR accesses go to the model, DMA memory is the
model's host memory, MSI-X messages arrive as the model sends them (``alloc_irq_vectors``
programs the table the way Linux's ``msix_capability_init`` does), INTx is the model's
INTA level, and time is the model's virtual clock. :meth:`RefBackend.schedule` runs host
actions (C10) at a virtual time, so a driver waiting for an interrupt sees them happen.
"""

import heapq
import itertools

from . import constants as c
from .backend import Backend, BackendError, DmaRegion, InterruptTimeout, check_access
from .refmodel import MemballoonRef

__all__ = ["RefBackend", "RefDmaRegion", "MSI_ADDRESS"]

#: Where the vectors' messages go (x86's MSI window; any fixed address would do).
MSI_ADDRESS = 0xFEE0_0000


class RefDmaRegion(DmaRegion):
    """A region of the model's host memory, accessed by the CPU (never faults)."""

    def __init__(self, memory, iova, size):
        super().__init__(iova, size)
        self.memory = memory

    async def read(self, offset, length):
        self._check(offset, length)
        return self.memory.read(self.iova + offset, length)

    async def write(self, offset, data):
        self._check(offset, len(data))
        self.memory.write(self.iova + offset, bytes(data))


class RefBackend(Backend):
    """One :class:`~memballoon.refmodel.MemballoonRef` (a new default one unless given)
    as a PCIe function. ``bus_master`` sets Memory Space and Bus Master Enable at once,
    as enumeration and ``pci_set_master`` would."""

    def __init__(self, model=None, bus_master=True):
        self.model = MemballoonRef() if model is None else model
        self.model.msix_sink = self._msix_message
        #: Every MSI-X message received: (address, data).
        self.messages = []
        #: Every change of INTA: True for Assert_INTA, False for Deassert_INTA.
        self.intx_messages = []
        self.model.intx_sink = self.intx_messages.append
        self._intx_requested = False
        self._irq_counts = []
        self._irq_taken = []
        self._events = []
        self._sequence = itertools.count()
        if bus_master:
            self.model.config_write(c.PCI_COMMAND,
                                    c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER, 2)

    # --- configuration space and BAR0 --------------------------------------------------------

    async def config_read(self, offset, width):
        check_access(offset, width, (1, 2, 4))
        return self.model.config_read(offset, width)

    async def config_write(self, offset, value, width):
        check_access(offset, width, (1, 2, 4))
        self.model.config_write(offset, value, width)

    def _check_bar(self, bar, offset, length):
        if offset < 0 or offset + length > self.bar_size(bar):
            raise BackendError(f"BAR{bar} access {offset:#x}+{length} outside its "
                               f"{self.bar_size(bar):#x} bytes")

    async def bar_read(self, bar, offset, width):
        check_access(offset, width)
        self._check_bar(bar, offset, width)
        return self.model.bar_read(bar, offset, width)

    async def bar_write(self, bar, offset, value, width):
        check_access(offset, width)
        self._check_bar(bar, offset, width)
        self.model.bar_write(bar, offset, value, width)

    def bar_size(self, bar):
        return self.model.params.bar.size if bar == 0 else 0

    # --- DMA memory --------------------------------------------------------------------------

    def dma_alloc(self, size):
        align = max(4096, 1 << (size - 1).bit_length())
        return RefDmaRegion(self.model.memory, self.model.memory.alloc(size, align), size)

    # --- MSI-X -------------------------------------------------------------------------------

    async def _find_msix(self):
        pos = await self.config_read(c.PCI_CAPABILITY_LIST, 1)
        while pos:
            if await self.config_read(pos, 1) == c.PCI_CAP_ID_MSIX:
                return pos
            pos = await self.config_read(pos + 1, 1)
        raise BackendError("the function has no MSI-X capability")

    async def alloc_irq_vectors(self, nvec):
        if self.nomsi:
            return 0
        pos = await self._find_msix()
        flags = pos + c.PCI_MSIX_FLAGS
        control = await self.config_read(flags, 2)
        count = min(nvec, (control & c.PCI_MSIX_FLAGS_QSIZE) + 1)
        table = await self.config_read(pos + c.PCI_MSIX_TABLE, 4)
        bar, base = table & 7, table & ~7
        # Enabled but masked while the entries are written, then unmasked.
        await self.config_write(flags, control | c.PCI_MSIX_FLAGS_ENABLE |
                                c.PCI_MSIX_FLAGS_MASKALL, 2)
        for vector in range(count):
            entry = base + c.PCI_MSIX_ENTRY_SIZE * vector
            await self.bar_write(bar, entry + c.PCI_MSIX_ENTRY_LOWER_ADDR, MSI_ADDRESS, 4)
            await self.bar_write(bar, entry + c.PCI_MSIX_ENTRY_UPPER_ADDR, 0, 4)
            await self.bar_write(bar, entry + c.PCI_MSIX_ENTRY_DATA, vector, 4)
            await self.bar_write(bar, entry + c.PCI_MSIX_ENTRY_VECTOR_CTRL, 0, 4)
        self._irq_counts = [0] * count
        self._irq_taken = [0] * count
        await self.config_write(flags, (control | c.PCI_MSIX_FLAGS_ENABLE) &
                                ~c.PCI_MSIX_FLAGS_MASKALL, 2)
        return count

    def _msix_message(self, address, data):
        """The model's MSI-X sink: a memory write of ``data`` to ``address``."""
        self.messages.append((address, data))
        if address == MSI_ADDRESS and data < len(self._irq_counts):
            self._irq_counts[data] += 1
        return True

    def _check_vector(self, vector):
        if not 0 <= vector < len(self._irq_counts):
            raise BackendError(f"vector {vector} was not allocated "
                               f"({len(self._irq_counts)} vectors)")

    async def wait_irq(self, vector, timeout):
        self._check_vector(vector)
        self._run_until(lambda: self._irq_counts[vector] > self._irq_taken[vector],
                        vector, timeout)
        self._irq_taken[vector] += 1

    def irq_count(self, vector):
        self._check_vector(vector)
        return self._irq_counts[vector]

    # --- INTx --------------------------------------------------------------------------------

    async def request_intx(self):
        if not await self.config_read(c.PCI_INTERRUPT_PIN, 1):
            raise BackendError("the function has no INTx")
        command = await self.config_read(c.PCI_COMMAND, 2)
        await self.config_write(c.PCI_COMMAND, command & ~c.PCI_COMMAND_INTX_DISABLE, 2)
        self._intx_requested = True

    async def wait_intx(self, timeout):
        if not self._intx_requested:
            raise BackendError("INTx was not requested")
        self._run_until(lambda: self.model.intx_asserted, None, timeout)

    # --- virtual time ------------------------------------------------------------------------

    def schedule(self, delay, action):
        """Run ``action()`` (a plain callable, e.g. a host register write on the model)
        once ``delay`` seconds of virtual time have passed."""
        if not delay >= 0:
            raise ValueError(f"delay must be >= 0, not {delay!r}")
        heapq.heappush(self._events, (self.now() + delay, next(self._sequence), action))

    def _run_until(self, condition, vector, timeout):
        """Run scheduled host actions until ``condition()`` holds; past ``timeout`` let the
        time pass and raise :class:`InterruptTimeout` for ``vector``."""
        deadline = self.now() + timeout
        while not condition():
            if self._events and self._events[0][0] <= deadline:
                self._run_next_event()
            else:
                self.model.advance(max(0.0, deadline - self.now()))
                raise InterruptTimeout(vector, timeout)

    def _run_next_event(self):
        when, _, action = heapq.heappop(self._events)
        self.model.advance(max(0.0, when - self.now()))
        action()

    async def sleep(self, seconds):
        if not seconds >= 0:
            raise ValueError(f"cannot sleep {seconds!r} seconds")
        deadline = self.now() + seconds
        while self._events and self._events[0][0] <= deadline:
            self._run_next_event()
        self.model.advance(deadline - self.now())

    def now(self):
        return self.model.now
