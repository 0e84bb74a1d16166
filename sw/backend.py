"""What the driver model needs from the machine it runs on.

The virtio driver model (:mod:`memballoon.virtio_pci_modern`) talks to one PCIe function
only through a :class:`Backend`: configuration space, BAR accesses of exact widths, DMA
memory, MSI-X vectors and INTx. The simulation backend (``backend_sim.py``, over
cocotbext-pcie), the reference-model backend and a VFIO backend implement it, so the same
driver runs against the RTL, the model and the board (Glasgow's one-applet-two-assemblies
idiom).

All time arguments are seconds: simulated time in simulation, wall time on hardware.
"""

import abc

__all__ = ["Backend", "DmaRegion", "BackendError", "InterruptTimeout"]

ACCESS_WIDTHS = (1, 2, 4, 8)


class BackendError(Exception):
    """A backend could not perform an access as asked."""


class InterruptTimeout(BackendError):
    """No MSI-X message arrived on a vector (``vector`` None: INTx was not asserted)
    before the timeout."""

    def __init__(self, vector, timeout):
        what = "INTx interrupt" if vector is None else f"MSI-X interrupt on vector {vector}"
        super().__init__(f"no {what} within {timeout * 1e6:g} us")
        self.vector = vector
        self.timeout = timeout


def check_access(offset, width, widths=ACCESS_WIDTHS):
    """Raise :class:`BackendError` unless ``width`` is allowed and ``offset`` naturally aligned."""
    if width not in widths:
        raise BackendError(f"access width {width} is not one of {widths}")
    if offset % width:
        raise BackendError(f"offset {offset:#x} is not aligned to the {width}-byte access")


class DmaRegion(abc.ABC):
    """Memory the device may reach by DMA: ``iova`` is the address the device uses."""

    def __init__(self, iova, size):
        self.iova = iova
        self.size = size

    def _check(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BackendError(f"DMA region access {offset:#x}+{length} outside {self.size} bytes")

    @abc.abstractmethod
    async def read(self, offset, length) -> bytes:
        """Read ``length`` bytes at ``offset`` inside the region."""

    @abc.abstractmethod
    async def write(self, offset, data):
        """Write ``data`` at ``offset`` inside the region."""


class Backend(abc.ABC):
    """One PCIe function as seen by a driver (the subset of Linux's PCI API it uses)."""

    #: The platform gives no MSI-X vectors (Linux booted with ``pci=nomsi``):
    #: :meth:`alloc_irq_vectors` returns 0 and a driver falls back to INTx.
    nomsi = False

    @abc.abstractmethod
    async def config_read(self, offset, width) -> int:
        """Read a 1-, 2- or 4-byte configuration register (little endian)."""

    @abc.abstractmethod
    async def config_write(self, offset, value, width):
        """Write a 1-, 2- or 4-byte configuration register."""

    @abc.abstractmethod
    async def bar_read(self, bar, offset, width) -> int:
        """One read of exactly ``width`` bytes (1, 2, 4 or 8) at ``offset`` in ``bar``."""

    @abc.abstractmethod
    async def bar_write(self, bar, offset, value, width):
        """One write of exactly ``width`` bytes (1, 2, 4 or 8) at ``offset`` in ``bar``."""

    async def bar_read_block(self, bar, offset, length) -> bytes:
        """Read ``length`` bytes in as few requests as the platform allows (memcpy_fromio):
        here 4-byte reads where aligned and single bytes elsewhere; a backend that can
        issue longer reads overrides it."""
        if offset < 0 or length < 0 or offset + length > self.bar_size(bar):
            raise BackendError(f"BAR{bar} read {offset:#x}+{length} outside its "
                               f"{self.bar_size(bar)} bytes")
        data = bytearray()
        while len(data) < length:
            pos = offset + len(data)
            width = 4 if pos % 4 == 0 and length - len(data) >= 4 else 1
            data += (await self.bar_read(bar, pos, width)).to_bytes(width, "little")
        return bytes(data)

    @abc.abstractmethod
    def bar_size(self, bar) -> int:
        """Aperture of ``bar`` in bytes, 0 when it is not implemented."""

    @abc.abstractmethod
    def dma_alloc(self, size) -> DmaRegion:
        """Allocate zeroed DMA memory, aligned at least to ``size`` rounded to 4 KiB."""

    @abc.abstractmethod
    async def alloc_irq_vectors(self, nvec) -> int:
        """Program and enable ``nvec`` MSI-X vectors; return how many were set up."""

    @abc.abstractmethod
    async def wait_irq(self, vector, timeout):
        """Return once an MSI-X message arrives on ``vector`` after the previous wait
        (a message that came since is not lost); raise :class:`InterruptTimeout`."""

    @abc.abstractmethod
    def irq_count(self, vector) -> int:
        """Messages received on ``vector`` since the vectors were allocated."""

    @abc.abstractmethod
    async def request_intx(self):
        """Take the function's INTx for this driver (``request_irq(pdev->irq)``), with the
        command register's Interrupt Disable clear (``pci_intx(pdev, 1)``); raise
        :class:`BackendError` when the function or the platform has no INTx."""

    @abc.abstractmethod
    async def wait_intx(self, timeout):
        """Return once the function asserts INTx (at once while it is asserted); raise
        :class:`InterruptTimeout` (``vector`` None). INTx is a level: the caller clears
        its cause (the virtio ISR read) before it waits again."""

    @abc.abstractmethod
    async def sleep(self, seconds):
        """Let ``seconds`` pass (simulated or wall time)."""

    @abc.abstractmethod
    def now(self) -> float:
        """Current time in seconds, on the same clock as :meth:`sleep`."""
