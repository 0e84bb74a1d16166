"""Driver model of a modern virtio-pci function (virtio 1.2 4.1), backend-neutral.

Function names mirror Linux ``drivers/virtio/virtio_pci_modern_dev.c`` (``vp_modern_*``)
so a reader can hold the two side by side; :meth:`VirtioPciModernDevice.init` is the
driver initialisation of virtio 1.2 3.1.1 as ``virtio_dev_probe`` and ``vp_find_vqs`` run
it. Every access goes through a :class:`~memballoon.backend.Backend`; nothing here imports
cocotb. Contract sections (C1..C12) are cited where a check comes from them.

Interrupts as ``vp_find_vqs`` sets them up (``virtio_pci_common.c``): MSI-X, one vector
for configuration changes and one per queue; when the platform gives no MSI-X vectors,
INTx (``vp_request_intx``), one shared level interrupt whose handler
(:meth:`VirtioPciModernDevice.vp_interrupt`) reads the ISR byte.
"""

from dataclasses import dataclass, field

from . import constants as c
from .backend import BackendError

#: The device-independent features this model implements (virtio 1.2 6): what it
#: accepts from a device that is not a memballoon.
TRANSPORT_FEATURES = (1 << c.VIRTIO_F_INDIRECT_DESC | 1 << c.VIRTIO_F_RING_EVENT_IDX |
                      1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_F_ACCESS_PLATFORM)
#: MSI-X vector of configuration changes, and of queue 0 (the next queues follow), as
#: Linux's ``virtio_pci_common.h`` numbers them.
VP_MSIX_CONFIG_VECTOR = 0
VP_MSIX_VQ_VECTOR = 1


def _align_up(value, align):
    return -(-value // align) * align


class VirtioError(Exception):
    """The device did not behave as the virtio driver requires."""


class ProbeError(VirtioError):
    """The function is not a usable modern virtio device."""


class FeaturesNotAccepted(VirtioError):
    """The device cleared FEATURES_OK after the driver set it (virtio 1.2 3.1.1 step 6)."""

    def __init__(self, features, status):
        super().__init__(f"device refused features {features:#018x} "
                         f"({', '.join(c.feature_names(features))}): status reads {status:#04x}")
        self.features = features
        self.status = status


class VectorNotAccepted(VirtioError):
    """An MSI-X vector written to ``msix_config``/``queue_msix_vector`` read back different."""

    def __init__(self, what, vector, got):
        super().__init__(f"{what}: wrote MSI-X vector {vector:#06x}, read back {got:#06x}")
        self.vector = vector
        self.got = got


class DeviceTimeout(VirtioError):
    """The device did not reach a state in time."""


@dataclass(frozen=True)
class IoRegion:
    """A mapped window of a BAR (what ``vp_modern_map_capability`` returns as ``__iomem``)."""
    backend: object
    bar: int
    offset: int
    length: int

    def _check(self, off, width):
        if off < 0 or off + width > self.length:
            raise VirtioError(f"access {off:#x}+{width} outside mapped BAR{self.bar} window "
                              f"{self.offset:#x}+{self.length:#x}")

    async def ioread(self, off, width):
        self._check(off, width)
        return await self.backend.bar_read(self.bar, self.offset + off, width)

    async def iowrite(self, off, value, width):
        self._check(off, width)
        await self.backend.bar_write(self.bar, self.offset + off, value, width)


@dataclass(frozen=True)
class VirtioPciCap:
    """One ``struct virtio_pci_cap`` as found in configuration space at ``pos``."""
    pos: int
    cap_len: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    #: ``notify_off_multiplier`` of a NOTIFY_CFG capability, else None.
    notify_off_multiplier: int = None


@dataclass
class VirtQueueInfo:
    """What the driver set up for one split virtqueue."""
    index: int
    num: int
    vector: int
    notify_off: int
    ring: object                  # DmaRegion holding desc, avail and used
    desc_addr: int
    avail_addr: int
    used_addr: int
    notify: IoRegion = field(repr=False)


class VirtioPciModernDevice:
    """``struct virtio_pci_modern_device`` with the ``vp_modern_*`` operations."""

    def __init__(self, backend, device_id=c.VIRTIO_ID_MEMORY_BALLOON):
        self.backend = backend
        #: The virtio device ID the driver binds to (``id_table``).
        self.expected_device_id = device_id
        self.vendor_id = None
        self.device_id = None
        self.id_device = None       # mdev->id.device, the virtio device ID
        self.id_vendor = None       # mdev->id.vendor (subsystem vendor)
        self.caps = {}              # cfg_type -> VirtioPciCap chosen by probe
        self.common = None
        self.isr = None
        self.notify_base = None
        self.notify_offset_multiplier = None
        self.device = None
        self.pci_cfg = None         # VirtioPciCap of VIRTIO_PCI_CAP_PCI_CFG, if any
        self.modern_bars = 0
        self.queues = []
        self.offered_features = None
        self.accepted_features = None
        self.intx_enabled = False   # vp_dev->intx_enabled: INTx instead of MSI-X
        self.intx_config_changes = 0    # configuration changes vp_interrupt read

    # --- configuration space -------------------------------------------------------------

    async def capabilities(self):
        """Walk the legacy capability list: a list of ``(cap_id, pos)`` in list order."""
        if not await self.backend.config_read(c.PCI_STATUS, 2) & c.PCI_STATUS_CAP_LIST:
            return []
        caps = []
        pos = await self.backend.config_read(c.PCI_CAPABILITY_LIST, 1) & ~3
        for _ in range(c.PCI_FIND_CAP_TTL):
            if pos < 0x40:
                return caps
            header = await self.backend.config_read(pos, 2)
            caps.append((header & 0xFF, pos))
            pos = (header >> 8) & ~3
        raise ProbeError(f"capability list longer than {c.PCI_FIND_CAP_TTL} entries (a loop?)")

    async def find_capability(self, cap_id, start=None):
        """``pci_find_capability``/``pci_find_next_capability``: first ``cap_id`` after
        ``start`` (a position), or None."""
        seen_start = start is None
        for cid, pos in await self.capabilities():
            if seen_start and cid == cap_id:
                return pos
            seen_start = seen_start or pos == start
        return None

    async def read_virtio_cap(self, pos):
        """Decode the ``struct virtio_pci_cap`` at ``pos``."""
        rd = self.backend.config_read
        cfg_type = await rd(pos + c.VIRTIO_PCI_CAP_CFG_TYPE, 1)
        mult = None
        if cfg_type == c.VIRTIO_PCI_CAP_NOTIFY_CFG:
            mult = await rd(pos + c.VIRTIO_PCI_NOTIFY_CAP_MULT, 4)
        return VirtioPciCap(
            pos=pos,
            cap_len=await rd(pos + c.VIRTIO_PCI_CAP_LEN, 1),
            cfg_type=cfg_type,
            bar=await rd(pos + c.VIRTIO_PCI_CAP_BAR, 1),
            id=await rd(pos + c.VIRTIO_PCI_CAP_ID, 1),
            offset=await rd(pos + c.VIRTIO_PCI_CAP_OFFSET, 4),
            length=await rd(pos + c.VIRTIO_PCI_CAP_LENGTH, 4),
            notify_off_multiplier=mult)

    async def virtio_caps(self):
        """Every vendor-specific capability in list order, decoded."""
        return [await self.read_virtio_cap(pos)
                for cid, pos in await self.capabilities() if cid == c.PCI_CAP_ID_VNDR]

    async def virtio_pci_find_capability(self, cfg_type):
        """First virtio capability of ``cfg_type`` whose BAR is implemented, or None; as
        Linux does, records the BAR in ``modern_bars``."""
        for cap in await self.virtio_caps():
            if cap.bar >= c.PCI_STD_NUM_BARS:
                continue            # reserved BAR values are ignored (virtio 1.2 4.1.4)
            if cap.cfg_type == cfg_type and self.backend.bar_size(cap.bar):
                self.modern_bars |= 1 << cap.bar
                return cap
        return None

    def vp_modern_map_capability(self, cap, minlen, align, start, size):
        """Map ``size`` bytes from ``start`` of the structure ``cap`` describes, after the
        checks Linux makes (length, alignment, inside the BAR)."""
        length = cap.length
        if length <= start:
            raise ProbeError(f"cap {cap.cfg_type} at {cap.pos:#x}: length {length} <= start {start}")
        length -= start
        if length < minlen:
            raise ProbeError(f"cap {cap.cfg_type} at {cap.pos:#x}: length {length} < {minlen}")
        offset = cap.offset + start
        if offset & (align - 1):
            raise ProbeError(f"cap {cap.cfg_type} at {cap.pos:#x}: offset {offset:#x} "
                             f"not aligned to {align}")
        length = min(length, size)
        if offset + minlen > self.backend.bar_size(cap.bar):
            raise ProbeError(f"cap {cap.cfg_type} at {cap.pos:#x}: {offset:#x}+{minlen} "
                             f"outside BAR{cap.bar} ({self.backend.bar_size(cap.bar):#x})")
        return IoRegion(self.backend, cap.bar, offset, length)

    async def vp_modern_probe(self):
        """Check IDs (C1), find COMMON/NOTIFY/ISR (and DEVICE, PCI_CFG) and map them (C2)."""
        rd = self.backend.config_read
        self.vendor_id = await rd(c.PCI_VENDOR_ID, 2)
        self.device_id = await rd(c.PCI_DEVICE_ID, 2)
        if self.vendor_id != c.PCI_VENDOR_ID_REDHAT_QUMRANET:
            raise ProbeError(f"vendor {self.vendor_id:#06x} is not virtio's "
                             f"{c.PCI_VENDOR_ID_REDHAT_QUMRANET:#06x}")
        if not c.VIRTIO_PCI_DEVICE_ID_MIN <= self.device_id <= c.VIRTIO_PCI_DEVICE_ID_MAX:
            raise ProbeError(f"device ID {self.device_id:#06x} outside the virtio range")
        if self.device_id < c.VIRTIO_PCI_MODERN_DEVICE_ID_BASE:
            self.id_device = await rd(c.PCI_SUBSYSTEM_ID, 2)      # transitional device
        else:
            self.id_device = self.device_id - c.VIRTIO_PCI_MODERN_DEVICE_ID_BASE
        self.id_vendor = await rd(c.PCI_SUBSYSTEM_VENDOR_ID, 2)
        if self.id_device != self.expected_device_id:
            raise ProbeError(f"virtio device ID {self.id_device}, "
                             f"driver binds to {self.expected_device_id}")

        common = await self.virtio_pci_find_capability(c.VIRTIO_PCI_CAP_COMMON_CFG)
        if common is None:
            raise ProbeError("no COMMON_CFG capability: not a modern virtio device")
        isr = await self.virtio_pci_find_capability(c.VIRTIO_PCI_CAP_ISR_CFG)
        notify = await self.virtio_pci_find_capability(c.VIRTIO_PCI_CAP_NOTIFY_CFG)
        if isr is None or notify is None:
            raise ProbeError(f"missing capabilities: isr={isr}, notify={notify}")
        device = await self.virtio_pci_find_capability(c.VIRTIO_PCI_CAP_DEVICE_CFG)
        self.pci_cfg = await self.virtio_pci_find_capability(c.VIRTIO_PCI_CAP_PCI_CFG)
        self.caps = {cap.cfg_type: cap for cap in (common, isr, notify, device, self.pci_cfg)
                     if cap is not None}

        self.common = self.vp_modern_map_capability(
            common, c.VIRTIO_PCI_COMMON_Q_NDATA, 4, 0, c.VIRTIO_PCI_COMMON_CFG_SIZE)
        self.isr = self.vp_modern_map_capability(isr, 1, 1, 0, 1)
        self.notify_offset_multiplier = notify.notify_off_multiplier
        self.notify_base = self.vp_modern_map_capability(notify, 2, 2, 0, notify.length)
        if device is not None:
            self.device = self.vp_modern_map_capability(device, 0, 4, 0, device.length)

    # --- common configuration (virtio 1.2 4.1.4.3) ---------------------------------------

    async def vp_modern_get_features(self):
        """The 64-bit feature set the device offers."""
        cfg = self.common
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_DFSELECT, 0, 4)
        lo = await cfg.ioread(c.VIRTIO_PCI_COMMON_DF, 4)
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_DFSELECT, 1, 4)
        hi = await cfg.ioread(c.VIRTIO_PCI_COMMON_DF, 4)
        return hi << 32 | lo

    async def vp_modern_get_driver_features(self):
        """The 64-bit feature set the driver wrote (read back)."""
        cfg = self.common
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_GFSELECT, 0, 4)
        lo = await cfg.ioread(c.VIRTIO_PCI_COMMON_GF, 4)
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_GFSELECT, 1, 4)
        hi = await cfg.ioread(c.VIRTIO_PCI_COMMON_GF, 4)
        return hi << 32 | lo

    async def vp_modern_set_features(self, features):
        cfg = self.common
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_GFSELECT, 0, 4)
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_GF, features & 0xFFFFFFFF, 4)
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_GFSELECT, 1, 4)
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_GF, features >> 32, 4)

    async def vp_modern_generation(self):
        return await self.common.ioread(c.VIRTIO_PCI_COMMON_CFGGENERATION, 1)

    async def vp_modern_get_status(self):
        return await self.common.ioread(c.VIRTIO_PCI_COMMON_STATUS, 1)

    async def vp_modern_set_status(self, status):
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_STATUS, status, 1)

    async def vp_modern_add_status(self, status):
        """``virtio_add_status``: OR ``status`` into device_status."""
        await self.vp_modern_set_status(await self.vp_modern_get_status() | status)

    async def vp_modern_reset(self, timeout=100e-6, poll=0.5e-6):
        """Write 0 to device_status and wait until it reads 0 (C9, virtio 1.2 4.1.4.3.2)."""
        await self.vp_modern_set_status(0)
        deadline = self.backend.now() + timeout
        while (status := await self.vp_modern_get_status()) != 0:
            if self.backend.now() > deadline:
                raise DeviceTimeout(f"device_status still reads {status:#04x} "
                                    f"{timeout * 1e6:g} us after reset")
            await self.backend.sleep(poll)

    async def vp_modern_config_vector(self, vector):
        """Write ``msix_config`` and return what the device kept."""
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_MSIX, vector, 2)
        return await self.common.ioread(c.VIRTIO_PCI_COMMON_MSIX, 2)

    async def vp_modern_queue_vector(self, index, vector):
        """Write ``queue_msix_vector`` of queue ``index`` and return what the device kept."""
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, index, 2)
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_MSIX, vector, 2)
        return await self.common.ioread(c.VIRTIO_PCI_COMMON_Q_MSIX, 2)

    async def vp_modern_queue_address(self, index, desc_addr, driver_addr, device_addr):
        cfg = self.common
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, index, 2)
        for lo, addr in ((c.VIRTIO_PCI_COMMON_Q_DESCLO, desc_addr),
                         (c.VIRTIO_PCI_COMMON_Q_AVAILLO, driver_addr),
                         (c.VIRTIO_PCI_COMMON_Q_USEDLO, device_addr)):
            await cfg.iowrite(lo, addr & 0xFFFFFFFF, 4)
            await cfg.iowrite(lo + 4, addr >> 32, 4)

    async def vp_modern_set_queue_enable(self, index, enable):
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, index, 2)
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_ENABLE, int(enable), 2)

    async def vp_modern_get_queue_enable(self, index):
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, index, 2)
        return bool(await self.common.ioread(c.VIRTIO_PCI_COMMON_Q_ENABLE, 2))

    async def vp_modern_set_queue_size(self, index, size):
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, index, 2)
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SIZE, size, 2)

    async def vp_modern_get_queue_size(self, index):
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, index, 2)
        return await self.common.ioread(c.VIRTIO_PCI_COMMON_Q_SIZE, 2)

    async def vp_modern_get_num_queues(self):
        return await self.common.ioread(c.VIRTIO_PCI_COMMON_NUMQ, 2)

    async def vp_modern_get_queue_notify_off(self, index):
        await self.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, index, 2)
        return await self.common.ioread(c.VIRTIO_PCI_COMMON_Q_NOFF, 2)

    async def vp_modern_map_vq_notify(self, index):
        """The 2-byte doorbell of queue ``index`` inside the notify structure."""
        off = await self.vp_modern_get_queue_notify_off(index) * self.notify_offset_multiplier
        if off + 2 > self.notify_base.length:
            raise ProbeError(f"queue {index}: notify offset {off:#x} outside the notify "
                             f"structure ({self.notify_base.length:#x} bytes)")
        return IoRegion(self.backend, self.notify_base.bar, self.notify_base.offset + off, 2)

    @staticmethod
    async def vp_notify(notify, index):
        """Ring the doorbell: write the queue index (no NOTIFICATION_DATA)."""
        await notify.iowrite(0, index, 2)

    async def vp_modern_isr(self):
        """Read (and so clear) the ISR status byte (virtio 1.2 4.1.4.5)."""
        return await self.isr.ioread(0, 1)

    # --- interrupts (virtio 1.2 4.1.5.3, 4.1.5.4; C11) -------------------------------------

    async def vp_request_intx(self):
        """``vp_request_intx``: the function's INTx for the configuration and every queue,
        handled by :meth:`vp_interrupt`. As ``vp_find_vqs`` does, give up when the
        function has no interrupt pin (Linux: ``pci_dev->irq`` is 0)."""
        if not await self.backend.config_read(c.PCI_INTERRUPT_PIN, 1):
            raise VirtioError("no MSI-X vectors, and no INTx: the interrupt pin reads 0")
        await self.backend.request_intx()
        self.intx_enabled = True

    async def vp_interrupt(self):
        """The INTx handler (``vp_interrupt``): read the ISR byte, which clears it and so
        deasserts INTx; a configuration change (bit 1) counts for :meth:`config_changes`
        (``vp_config_changed``); any bit set means every queue may have used buffers for
        its driver (``vp_vring_interrupt``). Returns the byte, 0 when the interrupt was
        not this function's (IRQ_NONE)."""
        isr = await self.vp_modern_isr()
        if isr & c.VIRTIO_PCI_ISR_CONFIG:
            self.intx_config_changes += 1
        return isr

    async def vp_wait_interrupt(self, vector, timeout):
        """Wait for the interrupt of MSI-X ``vector``; with INTx for the shared line, then
        run :meth:`vp_interrupt`. Raises :class:`~memballoon.backend.InterruptTimeout`."""
        if self.intx_enabled:
            await self.backend.wait_intx(timeout)
            await self.vp_interrupt()
        else:
            await self.backend.wait_irq(vector, timeout)

    def config_changes(self):
        """Configuration-change interrupts so far: messages on the configuration vector,
        or with INTx the ISR configuration bits :meth:`vp_interrupt` read."""
        if self.intx_enabled:
            return self.intx_config_changes
        return self.backend.irq_count(VP_MSIX_CONFIG_VECTOR)

    # --- PCI configuration access capability (virtio 1.2 4.1.4.9) ------------------------

    async def _vp_pci_cfg_select(self, bar, offset, width):
        if self.pci_cfg is None:
            raise ProbeError("device has no PCI_CFG capability")
        if width not in (1, 2, 4) or offset % width:
            raise VirtioError(f"PCI_CFG access must be 1, 2 or 4 bytes, aligned: "
                              f"{offset:#x}+{width}")
        pos, wr = self.pci_cfg.pos, self.backend.config_write
        await wr(pos + c.VIRTIO_PCI_CAP_BAR, bar, 1)
        await wr(pos + c.VIRTIO_PCI_CAP_OFFSET, offset, 4)
        await wr(pos + c.VIRTIO_PCI_CAP_LENGTH, width, 4)
        return pos + c.VIRTIO_PCI_CFG_CAP_DATA

    async def vp_pci_cfg_read(self, bar, offset, width):
        """A BAR read of ``width`` bytes done through ``pci_cfg_data``."""
        data = await self._vp_pci_cfg_select(bar, offset, width)
        return await self.backend.config_read(data, width)

    async def vp_pci_cfg_write(self, bar, offset, value, width):
        """A BAR write of ``width`` bytes done through ``pci_cfg_data`` (C2)."""
        data = await self._vp_pci_cfg_select(bar, offset, width)
        await self.backend.config_write(data, value, width)

    # --- driver initialisation (virtio 1.2 3.1.1) ----------------------------------------

    def choose_features(self, offered, page_size=None, wanted=None):
        """The feature set a memballoon driver accepts from ``offered``: the ``wanted``
        bits (default: everything offered) with exactly one page size, the requested one
        or else the smallest offered (C4). Bound to another virtio device ID (bring-up
        against any virtio device), the driver knows only the transport: it accepts the
        ``wanted`` bits of :data:`TRANSPORT_FEATURES` and ``page_size`` must be None."""
        if not offered >> c.VIRTIO_F_VERSION_1 & 1:
            raise ProbeError("device does not offer VIRTIO_F_VERSION_1")
        if self.expected_device_id != c.VIRTIO_ID_MEMORY_BALLOON:
            if page_size is not None:
                raise VirtioError("a page size is a memballoon feature")
            wanted = offered if wanted is None else wanted
            return (wanted & offered & TRANSPORT_FEATURES) | 1 << c.VIRTIO_F_VERSION_1
        pages = [b for b in c.PAGE_SIZE_FEATURE_BITS if offered >> b & 1]
        if not pages:
            raise ProbeError("device offers no page size (C3)")
        if page_size is None:
            page_bit = pages[0]
        else:
            page_bit = c.feature_of_page_size(page_size)
            if page_bit not in pages:
                raise VirtioError(f"page size {c.size_name(page_size)} not offered "
                                  f"(offered: {', '.join(c.feature_names(offered))})")
        wanted = offered if wanted is None else wanted
        accepted = (wanted & offered & ~c.PAGE_SIZE_FEATURE_MASK) | 1 << page_bit
        return accepted | 1 << c.VIRTIO_F_VERSION_1

    async def vp_finalize_features(self, features):
        """Write ``features``, set FEATURES_OK and check the device kept it; on refusal set
        FAILED, as ``virtio_features_ok`` does, and raise :class:`FeaturesNotAccepted`."""
        await self.vp_modern_set_features(features)
        await self.vp_modern_add_status(c.VIRTIO_CONFIG_S_FEATURES_OK)
        status = await self.vp_modern_get_status()
        if not status & c.VIRTIO_CONFIG_S_FEATURES_OK:
            await self.vp_modern_add_status(c.VIRTIO_CONFIG_S_FAILED)
            raise FeaturesNotAccepted(features, status)
        self.accepted_features = features

    async def setup_vq(self, index, num, vector):
        """Size, place, vector and enable queue ``index`` (``vp_modern``'s ``setup_vq``)."""
        max_num = await self.vp_modern_get_queue_size(index)
        if max_num == 0:
            raise VirtioError(f"queue {index} is not available (queue_size reads 0)")
        if await self.vp_modern_get_queue_enable(index):
            raise VirtioError(f"queue {index} is already enabled")
        num = min(num or max_num, max_num)
        if num & (num - 1):
            raise VirtioError(f"queue {index}: size {num} is not a power of two")
        await self.vp_modern_set_queue_size(index, num)

        avail_off = _align_up(c.vring_desc_size(num), c.VRING_AVAIL_ALIGN)
        used_off = _align_up(avail_off + c.vring_avail_size(num), c.VRING_USED_ALIGN)
        ring = self.backend.dma_alloc(used_off + c.vring_used_size(num))
        if ring.iova % c.VRING_DESC_ALIGN:
            raise BackendError(f"DMA region at {ring.iova:#x} not {c.VRING_DESC_ALIGN}-aligned")
        desc, avail, used = ring.iova, ring.iova + avail_off, ring.iova + used_off
        await self.vp_modern_queue_address(index, desc, avail, used)

        notify = await self.vp_modern_map_vq_notify(index)
        notify_off = await self.vp_modern_get_queue_notify_off(index)
        if vector != c.VIRTIO_MSI_NO_VECTOR:        # INTx: nothing to write
            got = await self.vp_modern_queue_vector(index, vector)
            if got != vector:
                raise VectorNotAccepted(f"queue {index} queue_msix_vector", vector, got)
        await self.vp_modern_set_queue_enable(index, True)
        info = VirtQueueInfo(index=index, num=num, vector=vector, notify_off=notify_off,
                             ring=ring, desc_addr=desc, avail_addr=avail, used_addr=used,
                             notify=notify)
        self.queues.append(info)
        return info

    async def init(self, page_size=None, wanted=None, queue_size=None, reset_timeout=100e-6):
        """Bring the device to DRIVER_OK with both queues live: reset handshake (C9),
        ACKNOWLEDGE, DRIVER, negotiation with exactly one page size (C4), MSI-X vectors
        config 0 and queue i -> i + 1, or INTx when the platform gives no vectors (C11),
        queues, DRIVER_OK."""
        if self.common is None:
            await self.vp_modern_probe()
        await self.vp_modern_reset(reset_timeout)
        self.queues = []
        await self.vp_modern_add_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        await self.vp_modern_add_status(c.VIRTIO_CONFIG_S_DRIVER)

        self.offered_features = await self.vp_modern_get_features()
        await self.vp_finalize_features(
            self.choose_features(self.offered_features, page_size, wanted))

        nvec = await self.vp_modern_get_num_queues() + 1
        got_vec = await self.backend.alloc_irq_vectors(nvec)
        self.intx_enabled = False
        if got_vec == 0:
            await self.vp_request_intx()        # vp_find_vqs' last resort
        elif got_vec < nvec:
            raise VirtioError(f"need {nvec} MSI-X vectors, platform gave {got_vec}")
        else:
            got = await self.vp_modern_config_vector(VP_MSIX_CONFIG_VECTOR)
            if got != VP_MSIX_CONFIG_VECTOR:
                raise VectorNotAccepted("msix_config", VP_MSIX_CONFIG_VECTOR, got)
        for index in range(nvec - 1):
            vector = VP_MSIX_VQ_VECTOR + index
            await self.setup_vq(index, queue_size,
                                c.VIRTIO_MSI_NO_VECTOR if self.intx_enabled else vector)

        await self.vp_modern_add_status(c.VIRTIO_CONFIG_S_DRIVER_OK)
        return self.queues
