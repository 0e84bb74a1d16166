"""Reference model of the whole memballoon function (C1..C12), in pure Python.

Written from ``CONTRACT.md`` and virtio 1.2, not from the RTL, so that it can be the RTL's
scoreboard. It holds what the function holds: configuration space with the capability
chain (C2), BAR0 (common configuration with negotiation and reset, notify, ISR, MSI-X
table and PBA), the two virtqueues walked in host memory on notification, the balloon
(C5, C6, C8) and the host management registers (C10). Everything it does is synchronous:
an access returns once the device has reacted to it (a doorbell drains the queue before
``bar_write`` returns). Time is virtual (:meth:`MemballoonRef.advance`); only the reset
handshake (C9) takes time.

The scoreboard view: ``bitmap`` (set of page indices), :meth:`bitmap_bytes`,
``balloon_pages``, ``counters`` (by ``MGMT_*`` name), ``used[q]`` (every used element),
``min_messages`` (every MIN_BALLOON value written), ``get_grants`` (requested, granted)
per GET, ``faults`` ((queue, RingFault) per C7 fault), ``malformed`` (C5 rejects by
reason), and :class:`HostMemory`'s ``dma_log`` of every device access (C12).

Decisions where the contract leaves room (tell the RTL team; tests pin them)
------------------------------------------------------------------------------
- C9, as README "Contract points": during a reset ``device_status`` reads its value from
  before the reset, or DEVICE_NEEDS_RESET if that was 0; writes to the common
  configuration are ignored meanwhile. All state is cleared when the reset starts;
  the handshake lasts ``reset_time`` virtual seconds (power-on included); ``MGMT_BUSY``
  reads 1 meanwhile. Management counters survive resets.
- C12: a doorbell for an enabled queue is remembered until the queue can be served
  (DRIVER_OK, Bus Master Enable, not stopped); a doorbell for a disabled queue is only
  counted, and so is one for a stopped queue. MSI-X messages wait in the PBA while Bus
  Master Enable is clear. The device never sets ``used.flags`` (it never asks the driver
  to skip doorbells); with EVENT_IDX it writes ``avail_event`` = its next avail index
  after each drain. Used notifications are decided once per drain (one message for a
  batch), from the used idx before and after it.
- C7: a chain's descriptors are all checked before any of its data is read, and a
  command is executed only once all its readable bytes were read; a command is atomic:
  when its data cannot be read, or its result or used element cannot be written, the
  bitmap, ``balloon_pages``, the budget and the counters are as before it (only the
  fault is counted). Elements used before a fault are still published and notified.
  (The RTL publishes used elements in batches; a failed write there also undoes the
  batch's unpublished commands before the faulting one, which the driver never saw.) In an indirect table,
  "queue size" is the table's entry count. A descriptor with INDIRECT ends its chain
  (NEXT is ignored on it, virtio 1.2 2.7.5.3.1) and its WRITE flag is ignored. Without
  VIRTIO_F_INDIRECT_DESC negotiated the flag means nothing: the descriptor is an ordinary
  buffer (the driver must not set it then; the RTL reads it the same way). Readable and writable descriptors may interleave: each kind is taken in chain
  order.
- C5: an address is checked for alignment before the window (a misaligned address
  outside the window counts as misaligned). A GET counts a violation only for an
  invalid address that stops it; a valid page it cannot grant counts nothing but
  ``MGMT_GET_SHORT``. An EXCHANGE wanted page that is not grantable (not in the balloon,
  or extra memory without EXTRA_MEM) counts ``MGMT_VIOLATION_NOT_IN_BALLOON``.
  Malformed checks, in order: length 0 or not a multiple of 8, unknown code, N = 0,
  EXCHANGE odd count, writable bytes wrong for the code.
- C6: every fromdevq buffer is looked at when it is taken: a malformed one is used at
  once with len 0, also behind held good ones (used elements leave ring order); a good
  one is held by its head. Each minimum goes to the oldest held buffer, whose chain is
  walked again then, as the RTL does: a C7 fault found on that walk stops the queue, and
  a buffer the driver made malformed meanwhile is used with len 0 and counted, the
  minimum going on to the next held one. The negative-to-0 rule is applied when the
  value is sent.
- C8/C10: the window base is used rounded down to the negotiated page size. A page is
  granted by GET when its bit is set and it is outside the committed extra range, or
  EXTRA_MEM was negotiated. Committing an extra range sets the bits of the new range
  (clipped to the window) and leaves the others; a reset clears the bitmap and sets the
  committed range again. The management request-reset (MGMT_CONTROL) and C7 faults set
  DEVICE_NEEDS_RESET and raise the configuration interrupt each time, except during a
  reset, when they do nothing.
- Configuration space holds, besides the virtio chain, one MSI-X capability at
  ``MSIX_CAP_POS`` (where the PCIE4 block has it) whose next pointer is the chain.
- C11 INTx (virtio 1.2 4.1.4.5): Interrupt Pin reads INTA. With MSI-X disabled a
  non-zero ISR byte is a pending INTx: the Status register's Interrupt Status bit, which
  Interrupt Disable does not affect (PCI); INTA is asserted while it is pending and the
  command register's Interrupt Disable is clear (``intx_asserted``), and each change
  goes to ``intx_sink`` as the Assert_INTA/Deassert_INTA message. The MSI-X message of an
  event while MSI-X is disabled is dropped, not held: INTx carries it.
"""

import struct
from bisect import bisect_right
from collections import Counter

from . import constants as c
from .params import DeviceParams
from .virtio_ring import (VringDesc, vring_avail_event_offset, vring_need_event,
                          vring_used_event_offset)

__all__ = ["MemballoonRef", "HostMemory", "DmaError", "Malformed", "MSIX_CAP_POS",
           "COUNTER_NAMES", "DEFAULT_RING_FEATURES"]

#: Where the MSI-X capability sits (the PCIE4 block's position, README "Architecture").
MSIX_CAP_POS = 0x60

#: Ring features this milestone's virtqueue engine implements (C3).
DEFAULT_RING_FEATURES = (c.VIRTIO_F_INDIRECT_DESC, c.VIRTIO_F_RING_EVENT_IDX)

#: Every counter register of C10, by name; they are 32 bits and wrap.
COUNTER_NAMES = (
    "MGMT_NOTIFY_COUNT_Q0", "MGMT_NOTIFY_COUNT_Q1", "MGMT_MSIX_SENT", "MGMT_MSIX_FAILED",
    "MGMT_CMD_GIVE", "MGMT_CMD_GET", "MGMT_CMD_EXCHANGE", "MGMT_CMD_MALFORMED",
    "MGMT_VIOLATION_MISALIGNED", "MGMT_VIOLATION_OUT_OF_WINDOW", "MGMT_VIOLATION_DOUBLE_GIVE",
    "MGMT_VIOLATION_NOT_IN_BALLOON", "MGMT_GET_SHORT", "MGMT_PAGES_ENTERED",
    "MGMT_PAGES_LEFT", "MGMT_FROMDEVQ_MALFORMED", "MGMT_MIN_SENT", "MGMT_MIN_DROPPED",
    "MGMT_RING_FAULTS",
)

_U32 = 0xFFFF_FFFF
_DRIVER_STATUS_BITS = (c.DeviceStatus.ACKNOWLEDGE | c.DeviceStatus.DRIVER |
                       c.DeviceStatus.DRIVER_OK | c.DeviceStatus.FAILED).value


class Malformed:
    """Why a todevq command was rejected (C5); keys of ``MemballoonRef.malformed``."""
    LENGTH = "length"               # no bytes, or not a multiple of 8
    UNKNOWN = "unknown code"
    EMPTY = "no addresses"          # N = 0
    ODD_EXCHANGE = "odd exchange"
    WRITABLE = "writable bytes"     # GET without exactly 8, GIVE/EXCHANGE with any


class DmaError(Exception):
    """A device access to host memory failed (unsupported request, abort, timeout)."""


def _check_range(name, value, bits, signed=False):
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    if not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, not {value!r}")


class HostMemory:
    """Host physical memory as the device reaches it: allocated regions only; a device
    access anywhere else fails like an unsupported request. Tests mark ranges whose device
    reads or writes fail (:meth:`inject_fault`). CPU accesses (the driver's) never fail
    and are not logged; device accesses are logged in ``dma_log`` as (kind, address,
    length) with kind "r" or "w"."""

    def __init__(self, base=1 << 32):
        self._starts = []
        self._regions = {}
        self._next = base
        self._faults = []
        self.dma_log = []

    def alloc(self, size, align=4096):
        """Zeroed memory of ``size`` bytes aligned to ``align`` (a power of two); its address."""
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"allocation size must be a positive integer, not {size!r}")
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, not {align!r}")
        start = -(-self._next // align) * align
        self._regions[start] = bytearray(size)
        self._starts.append(start)
        self._next = start + size
        return start

    def _locate(self, addr, length):
        i = bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start = self._starts[i]
        buf = self._regions[start]
        if addr + length > start + len(buf):
            return None
        return buf, addr - start

    def _cpu(self, addr, length):
        where = self._locate(addr, length)
        if where is None:
            raise ValueError(f"host memory {addr:#x}+{length} is not allocated")
        return where

    def read(self, addr, length):
        """CPU read (the driver's side)."""
        buf, off = self._cpu(addr, length)
        return bytes(buf[off:off + length])

    def write(self, addr, data):
        """CPU write (the driver's side)."""
        buf, off = self._cpu(addr, len(data))
        buf[off:off + len(data)] = data

    def inject_fault(self, addr, length, read=True, write=True, passing=0):
        """Make device reads and/or writes touching ``addr``..``addr + length`` fail, after
        the first ``passing`` such accesses."""
        self._faults.append([addr, addr + length, read, write, passing])

    def clear_faults(self):
        self._faults = []

    def _device(self, kind, addr, length):
        self.dma_log.append((kind, addr, length))
        for fault in self._faults:
            start, end, read, write, passing = fault
            if addr < end and start < addr + length and (read if kind == "r" else write):
                if passing:
                    fault[4] -= 1
                    continue
                raise DmaError(f"injected {kind} fault at {addr:#x}+{length}")
        where = self._locate(addr, length)
        if where is None:
            raise DmaError(f"device access {addr:#x}+{length}: no memory there")
        return where

    def dma_read(self, addr, length):
        buf, off = self._device("r", addr, length)
        return bytes(buf[off:off + length])

    def dma_write(self, addr, data):
        buf, off = self._device("w", addr, len(data))
        buf[off:off + len(data)] = data


class _Fault(Exception):
    """A C7 ring fault inside queue processing."""

    def __init__(self, kind):
        super().__init__(kind.name)
        self.kind = kind


class _Queue:
    """One virtqueue: what the driver configured (virtio 1.2 4.1.4.3) and the device's
    ring position, plus held fromdevq buffers."""

    def __init__(self, max_size):
        self.size = max_size
        self.vector = c.VIRTIO_MSI_NO_VECTOR
        self.enable = False
        self.desc = self.driver = self.device = 0
        self.last_avail = 0
        self.used_idx = 0
        self.stopped = False
        self.kick = False
        #: Heads of good fromdevq buffers taken from the ring and not used yet, oldest first.
        self.held = []


class MemballoonRef:
    """The reference model of one memballoon function.

    ``params`` fixes the build (C3 page sizes, BAR layout, queue and vector counts);
    ``ring_features`` the ring feature bits offered (by default every one the engine
    implements, as ``params.offered_features`` has them; a test may leave some out);
    ``bitmap_pages`` the pages the
    bitmap tracks (C8); ``reset_time`` how long a reset's clear takes (C9);
    ``memory`` the host memory (a new :class:`HostMemory` by default); ``msix_sink``
    a callable ``(address, data) -> bool`` receiving MSI-X messages (False: the hard IP
    reported the message as failed); ``intx_sink`` a callable ``(asserted)`` receiving
    each change of INTA (the Assert_INTA and Deassert_INTA messages).
    """

    def __init__(self, params=DeviceParams(), ring_features=DEFAULT_RING_FEATURES,
                 bitmap_pages=1 << 16, reset_time=1e-6, memory=None, msix_sink=None,
                 intx_sink=None):
        ring_features = tuple(ring_features)
        if any(bit not in DEFAULT_RING_FEATURES for bit in ring_features):
            raise ValueError(f"ring features {ring_features} outside what the engine "
                             f"implements {DEFAULT_RING_FEATURES}")
        _check_range("bitmap_pages", bitmap_pages, 32)
        if bitmap_pages == 0:
            raise ValueError("bitmap_pages must be at least 1")
        if not reset_time >= 0:
            raise ValueError(f"reset_time must be >= 0, not {reset_time!r}")
        self.params = params
        ring_mask = sum(1 << b for b in DEFAULT_RING_FEATURES)
        self.offered_features = ((params.offered_features & ~ring_mask) |
                                 sum(1 << b for b in ring_features))
        self.bitmap_pages = bitmap_pages
        self.reset_time = reset_time
        self.memory = HostMemory() if memory is None else memory
        self.msix_sink = msix_sink
        self.intx_sink = intx_sink
        self._intx_level = False
        self.now = 0.0

        self._config = self._config_image()
        self._config_writable = self._config_write_masks()
        vectors = params.msix_vectors
        self._msix_entries = [bytearray(12) for _ in range(vectors)]    # RAM: never reset
        self._msix_masked = [True] * vectors
        self._msix_pending = [False] * vectors

        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.fault_info = 0
        self.used = [[] for _ in range(c.NUM_QUEUES)]
        self.min_messages = []
        self.get_grants = []
        self.faults = []
        self.malformed = Counter()

        # Host controls (C10): survive virtio resets.
        self._window_base = 0
        self.return_budget = c.MGMT_UNLIMITED_BUDGET
        self._min_regs = [0, 0]
        self._extra_first_reg = 0
        self.extra_range = (0, 0)
        self._bitmap_index = 0

        self.status = 0
        self._virtio_reset()        # power-on is a reset that began with status 0

    # --- configuration space (C1, C2) ------------------------------------------------------

    def _virtio_chain(self):
        """(cfg_type, struct size, BAR offset, length, extra bytes) of the four virtio
        capabilities, in chain order (C2)."""
        bar = self.params.bar
        notify_length = (c.NUM_QUEUES - 1) * bar.notify_off_multiplier + 2  # le16 doorbell
        mult = bar.notify_off_multiplier.to_bytes(4, "little")
        return [
            (c.VIRTIO_PCI_CAP_COMMON_CFG, c.VIRTIO_PCI_CAP_SIZE, bar.common_cfg,
             c.VIRTIO_PCI_COMMON_CFG_SIZE, b""),
            (c.VIRTIO_PCI_CAP_NOTIFY_CFG, c.VIRTIO_PCI_NOTIFY_CAP_SIZE, bar.notify,
             notify_length, mult),
            (c.VIRTIO_PCI_CAP_ISR_CFG, c.VIRTIO_PCI_CAP_SIZE, bar.isr, 1, b""),   # one byte
            (c.VIRTIO_PCI_CAP_PCI_CFG, c.VIRTIO_PCI_CFG_CAP_SIZE, 0, 0, bytes(4)),
        ]

    def _config_image(self):
        p = self.params
        image = bytearray(c.PCI_CFG_SPACE_EXP_SIZE)
        struct.pack_into("<HH", image, c.PCI_VENDOR_ID, c.PCI_VENDOR_ID_REDHAT_QUMRANET,
                         c.MEMBALLOON_PCI_DEVICE_ID)            # vendor, then device ID
        struct.pack_into("<H", image, c.PCI_STATUS, c.PCI_STATUS_CAP_LIST)
        image[c.PCI_REVISION_ID] = c.MEMBALLOON_PCI_REVISION_ID
        image[c.PCI_CLASS_PROG:c.PCI_CLASS_PROG + 3] = c.PCI_CLASS_MEMORY_OTHER.to_bytes(3, "little")
        image[c.PCI_HEADER_TYPE] = 0
        image[c.PCI_BASE_ADDRESS_0] = c.PCI_BASE_ADDRESS_MEM_TYPE_64
        struct.pack_into("<HH", image, c.PCI_SUBSYSTEM_VENDOR_ID,    # then subsystem ID
                         c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID, c.MEMBALLOON_PCI_SUBSYSTEM_ID)
        image[c.PCI_CAPABILITY_LIST] = MSIX_CAP_POS
        image[c.PCI_INTERRUPT_PIN] = c.PCI_INTERRUPT_PIN_INTA
        struct.pack_into("<BBHII", image, MSIX_CAP_POS, c.PCI_CAP_ID_MSIX, p.cfg_ext_base,
                         p.msix_vectors - 1, p.bar.msix_table, p.bar.msix_pba)   # BIR 0

        chain = self._virtio_chain()
        if sum(size for _, size, *_ in chain) > p.cfg_ext_size:
            raise ValueError(f"the virtio capabilities do not fit the cfg_ext window of "
                             f"{p.cfg_ext_size} bytes")
        pos = p.cfg_ext_base
        for i, (cfg_type, size, offset, length, extra) in enumerate(chain):
            nxt = pos + size if i + 1 < len(chain) else 0
            struct.pack_into("<BBBBBB2xII", image, pos, c.PCI_CAP_ID_VNDR, nxt, size, cfg_type,
                             0, 0, offset, length)
            image[pos + c.VIRTIO_PCI_CAP_SIZE:pos + size] = extra
            if cfg_type == c.VIRTIO_PCI_CAP_PCI_CFG:
                self._pci_cfg_pos = pos
            pos = nxt
        return image

    def _config_write_masks(self):
        """Byte offset -> writable bits."""
        masks = {c.PCI_COMMAND: c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER,
                 c.PCI_COMMAND + 1: c.PCI_COMMAND_INTX_DISABLE >> 8,
                 c.PCI_INTERRUPT_LINE: 0xFF}
        bar_mask = ~(self.params.bar.size - 1) & 0xFFFF_FFFF_FFFF_FFFF
        for i in range(8):
            masks[c.PCI_BASE_ADDRESS_0 + i] = bar_mask >> 8 * i & 0xFF
        control = (c.PCI_MSIX_FLAGS_ENABLE | c.PCI_MSIX_FLAGS_MASKALL) >> 8
        masks[MSIX_CAP_POS + c.PCI_MSIX_FLAGS + 1] = control
        pos = self._pci_cfg_pos
        for field, size in ((c.VIRTIO_PCI_CAP_BAR, 1), (c.VIRTIO_PCI_CAP_OFFSET, 4),
                            (c.VIRTIO_PCI_CAP_LENGTH, 4), (c.VIRTIO_PCI_CFG_CAP_DATA, 4)):
            for i in range(size):
                masks[pos + field + i] = 0xFF
        return masks

    @staticmethod
    def _check_access(what, offset, width, widths, limit):
        if width not in widths:
            raise ValueError(f"{what} access width {width} is not one of {widths}")
        if not isinstance(offset, int) or offset < 0 or offset % width or offset + width > limit:
            raise ValueError(f"{what} offset {offset!r} is not a {width}-byte aligned offset "
                             f"below {limit:#x}")

    def _config_field(self, offset, width):
        return int.from_bytes(self._config[offset:offset + width], "little")

    @property
    def bus_master(self):
        return bool(self._config[c.PCI_COMMAND] & c.PCI_COMMAND_MASTER)

    @property
    def msix_enabled(self):
        return bool(self._config_field(MSIX_CAP_POS + c.PCI_MSIX_FLAGS, 2)
                    & c.PCI_MSIX_FLAGS_ENABLE)

    @property
    def msix_function_masked(self):
        return bool(self._config_field(MSIX_CAP_POS + c.PCI_MSIX_FLAGS, 2)
                    & c.PCI_MSIX_FLAGS_MASKALL)

    @property
    def isr(self):
        """The ISR status byte (virtio 1.2 4.1.4.5)."""
        return self._isr

    @isr.setter
    def isr(self, value):
        self._isr = value
        self._update_intx()

    @property
    def intx_pending(self):
        """C11: an INTx is pending (the Status register's Interrupt Status bit)."""
        return bool(self.isr) and not self.msix_enabled

    @property
    def intx_asserted(self):
        """INTA as the root complex sees it: pending, and Interrupt Disable clear."""
        disabled = self._config_field(c.PCI_COMMAND, 2) & c.PCI_COMMAND_INTX_DISABLE
        return self.intx_pending and not disabled

    def _update_intx(self):
        """Send Assert_INTA or Deassert_INTA when the level changed."""
        level = self.intx_asserted
        if level != self._intx_level:
            self._intx_level = level
            if self.intx_sink is not None:
                self.intx_sink(level)

    def _pci_cfg_access(self):
        """The BAR access the PCI_CFG capability describes, or None when it names another
        BAR, a length other than 1, 2 or 4, or an unaligned or out-of-BAR offset."""
        pos = self._pci_cfg_pos
        bar = self._config[pos + c.VIRTIO_PCI_CAP_BAR]
        offset = self._config_field(pos + c.VIRTIO_PCI_CAP_OFFSET, 4)
        length = self._config_field(pos + c.VIRTIO_PCI_CAP_LENGTH, 4)
        if bar != 0 or length not in (1, 2, 4) or offset % length or \
                offset + length > self.params.bar.size:
            return None
        return offset, length

    def config_read(self, offset, width):
        """A configuration read (1, 2 or 4 bytes). Reading ``pci_cfg_data`` performs the
        BAR read the PCI_CFG capability describes (virtio 1.2 4.1.4.9)."""
        self._check_access("configuration", offset, width, (1, 2, 4), c.PCI_CFG_SPACE_EXP_SIZE)
        data = self._pci_cfg_pos + c.VIRTIO_PCI_CFG_CAP_DATA
        if offset < data + 4 and data < offset + width and (access := self._pci_cfg_access()):
            bar_offset, length = access
            value = self.bar_read(0, bar_offset, length)
            self._config[data:data + 4] = value.to_bytes(4, "little")
        self._config[c.PCI_STATUS] &= ~c.PCI_STATUS_INTERRUPT
        if self.intx_pending:
            self._config[c.PCI_STATUS] |= c.PCI_STATUS_INTERRUPT
        return self._config_field(offset, width)

    def config_write(self, offset, value, width):
        """A configuration write; only writable bits change. A write to any byte of
        ``pci_cfg_data`` performs the BAR write it describes (C2)."""
        self._check_access("configuration", offset, width, (1, 2, 4), c.PCI_CFG_SPACE_EXP_SIZE)
        _check_range("configuration write value", value, 8 * width)
        data = self._pci_cfg_pos + c.VIRTIO_PCI_CFG_CAP_DATA
        for i in range(width):
            mask = self._config_writable.get(offset + i, 0)
            byte = value >> 8 * i & 0xFF
            self._config[offset + i] = self._config[offset + i] & ~mask | byte & mask
        if offset < data + 4 and data < offset + width and (access := self._pci_cfg_access()):
            bar_offset, length = access
            self.bar_write(0, bar_offset,
                           self._config_field(data, 4) & (1 << 8 * length) - 1, length)
        self._msix_deliver()
        self._update_intx()         # MSI-X Enable or Interrupt Disable may have changed
        self._service()

    def flr(self):
        """Function-level reset: PCI state (command, BAR, MSI-X control, table masks and
        PBA; not the table RAM) and a virtio reset (C9)."""
        fresh = self._config_image()
        for offset in self._config_writable:
            self._config[offset] = fresh[offset]
        self._msix_masked = [True] * self.params.msix_vectors
        self._msix_pending = [False] * self.params.msix_vectors
        self._virtio_reset()

    # --- time and reset (C9) ----------------------------------------------------------------

    def advance(self, seconds):
        """Let ``seconds`` of virtual time pass."""
        if not seconds >= 0:
            raise ValueError(f"time only advances: {seconds!r}")
        self.now += seconds

    @property
    def resetting(self):
        return self.now < self._reset_done_at

    def _virtio_reset(self):
        self._status_in_reset = self.status or c.VIRTIO_CONFIG_S_NEEDS_RESET
        self._reset_done_at = self.now + self.reset_time
        self.status = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self._features_failed = False
        self.config_vector = c.VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.queues = [_Queue(self.params.max_queue_size) for _ in range(c.NUM_QUEUES)]
        self.isr = 0
        self.min_pending = None
        self.bitmap = set(self._extra_indices())
        self.balloon_pages = 0

    @property
    def device_status(self):
        """What ``device_status`` reads (C9: non-zero until the reset is complete)."""
        return self._status_in_reset if self.resetting else self.status

    # --- negotiation state (C3, C4) ----------------------------------------------------------

    @property
    def features_ok(self):
        return not self.resetting and bool(self.status & c.VIRTIO_CONFIG_S_FEATURES_OK)

    @property
    def driver_ok(self):
        """DRIVER_OK and FEATURES_OK set, FAILED clear, not resetting."""
        return (self.features_ok and bool(self.status & c.VIRTIO_CONFIG_S_DRIVER_OK)
                and not self.status & c.VIRTIO_CONFIG_S_FAILED)

    def negotiated(self, bit):
        return self.features_ok and bool(self.driver_features >> bit & 1)

    @property
    def page_shift(self):
        """log2 of the negotiated page size (C4), 0 before FEATURES_OK."""
        if not self.features_ok:
            return 0
        bit = next(b for b in c.PAGE_SIZE_FEATURE_BITS if self.driver_features >> b & 1)
        return c.page_shift_of_feature(bit)

    def _features_acceptable(self):
        accepted = self.driver_features
        pages = accepted & c.PAGE_SIZE_FEATURE_MASK
        return (accepted & ~self.offered_features == 0 and accepted >> c.VIRTIO_F_VERSION_1 & 1
                and pages != 0 and pages & (pages - 1) == 0)

    # --- BAR0 --------------------------------------------------------------------------------

    def _check_bar(self, bar, offset, width):
        if bar != 0:
            raise ValueError(f"BAR{bar} is not implemented (the function has BAR0 only)")
        self._check_access("BAR0", offset, width, (1, 2, 4, 8), self.params.bar.size)

    @staticmethod
    def _dwords(offset, width):
        """(dword byte address, byte strobe, shift of the access inside the dword) of each
        register-bus access an access of ``width`` bytes at ``offset`` makes."""
        if width == 8:
            return [(offset, 0xF, 0), (offset + 4, 0xF, 0)]
        lane = offset % 4
        return [(offset - lane, ((1 << width) - 1) << lane, lane)]

    def bar_read(self, bar, offset, width):
        """One read of ``width`` bytes (1, 2, 4, 8) of BAR0, made of dword accesses with
        byte strobes as the register bus makes them (read side effects per dword)."""
        self._check_bar(bar, offset, width)
        value = 0
        for i, (dword, strobe, lane) in enumerate(self._dwords(offset, width)):
            data = self._bar_dword(dword, strobe, None)
            value |= (data >> 8 * lane) << 32 * i
        return value & (1 << 8 * width) - 1

    def bar_write(self, bar, offset, value, width):
        """One write of ``width`` bytes of BAR0; the device reacts before it returns (a
        doorbell drains its queue)."""
        self._check_bar(bar, offset, width)
        _check_range("BAR write value", value, 8 * width)
        for i, (dword, strobe, lane) in enumerate(self._dwords(offset, width)):
            self._bar_dword(dword, strobe, (value >> 32 * i << 8 * lane) & _U32)
        self._service()

    def _bar_dword(self, addr, strobe, data):
        """Read (``data`` None) or write one dword of BAR0; returns what a read returns."""
        bar = self.params.bar
        # Each structure's window reaches to the next one; its unused dwords read 0.
        starts = sorted((bar.common_cfg, bar.notify, bar.isr, bar.msix_table))
        i = bisect_right(starts, addr) - 1
        if i < 0:
            return 0
        base = starts[i]
        local = addr - base
        if base == bar.common_cfg:
            return self._common_dword(local, strobe, data)
        if base == bar.notify:
            if data is not None:
                self._notify_dword(local, strobe)
            return 0
        if base == bar.isr:
            if data is None and local == 0 and strobe & 1:
                value, self.isr = self.isr, 0
                return value
            return 0
        return self._msix_dword(local, strobe, data)

    # --- common configuration (virtio 1.2 4.1.4.3; C2, C3, C4, C9, C11) ----------------------

    def _selected(self):
        return self.queues[self.queue_select] if self.queue_select < c.NUM_QUEUES else None

    def _common_fields(self):
        """Field offset -> (size, value) of ``struct virtio_pci_common_cfg``."""
        q = self._selected()
        offered = self.offered_features
        dfs, gfs = self.device_feature_select, self.driver_feature_select
        fields = {
            c.VIRTIO_PCI_COMMON_DFSELECT: (4, dfs),
            c.VIRTIO_PCI_COMMON_DF: (4, offered >> 32 * dfs & _U32 if dfs < 2 else 0),
            c.VIRTIO_PCI_COMMON_GFSELECT: (4, gfs),
            c.VIRTIO_PCI_COMMON_GF: (4, self.driver_features >> 32 * gfs & _U32 if gfs < 2 else 0),
            c.VIRTIO_PCI_COMMON_MSIX: (2, self.config_vector),
            c.VIRTIO_PCI_COMMON_NUMQ: (2, c.NUM_QUEUES),
            c.VIRTIO_PCI_COMMON_STATUS: (1, self.device_status),
            c.VIRTIO_PCI_COMMON_CFGGENERATION: (1, 0),      # no device configuration (C2)
            c.VIRTIO_PCI_COMMON_Q_SELECT: (2, self.queue_select),
            c.VIRTIO_PCI_COMMON_Q_SIZE: (2, q.size if q else 0),
            c.VIRTIO_PCI_COMMON_Q_MSIX: (2, q.vector if q else 0),
            c.VIRTIO_PCI_COMMON_Q_ENABLE: (2, int(q.enable) if q else 0),
            c.VIRTIO_PCI_COMMON_Q_NOFF: (2, self.queue_select if q else 0),
            c.VIRTIO_PCI_COMMON_Q_NDATA: (2, 0),
            c.VIRTIO_PCI_COMMON_Q_RESET: (2, 0),
        }
        for lo, area in ((c.VIRTIO_PCI_COMMON_Q_DESCLO, "desc"),
                         (c.VIRTIO_PCI_COMMON_Q_AVAILLO, "driver"),
                         (c.VIRTIO_PCI_COMMON_Q_USEDLO, "device")):
            addr = getattr(q, area) if q else 0
            fields[lo] = (4, addr & _U32)
            fields[lo + 4] = (4, addr >> 32)
        return fields

    def _common_dword(self, local, strobe, data):
        fields = {off: f for off, f in self._common_fields().items() if off // 4 == local // 4}
        if data is None:
            return sum(value << 8 * (off % 4) for off, (_, value) in fields.items())
        if self.resetting:
            return 0                # every write is ignored while resetting (C9)
        # Strobed bytes from the write, the others as they are; each touched field gets
        # its merged value (several fields share a dword).
        lanes = sum(0xFF << 8 * lane for lane in range(4) if strobe >> lane & 1)
        current = sum(value << 8 * (off % 4) for off, (_, value) in fields.items())
        merged = data & lanes | current & ~lanes
        written = {off: merged >> 8 * (off % 4) & (1 << 8 * size) - 1
                   for off, (size, _) in fields.items()
                   if strobe >> (off % 4) & (1 << size) - 1}
        status = written.pop(c.VIRTIO_PCI_COMMON_STATUS, None)
        if status == 0:
            self._virtio_reset()    # the reset wins over the other fields of the dword
            return 0
        if status is not None:
            self._write_status(status)
        for off, value in written.items():
            self._write_common_field(off, value)
        return 0

    def _write_status(self, value):
        status = self.status | value & _DRIVER_STATUS_BITS
        requested = value & c.VIRTIO_CONFIG_S_FEATURES_OK
        if requested and not self.status & c.VIRTIO_CONFIG_S_FEATURES_OK:
            if not self._features_failed and self._features_acceptable():
                status |= c.VIRTIO_CONFIG_S_FEATURES_OK
            else:
                self._features_failed = True    # C4: unusable until reset
        self.status = status

    def _mappable(self, vector):
        """virtio 1.2 4.1.5.1.2: a vector the table does not have reads back NO_VECTOR."""
        return vector if vector < self.params.msix_vectors else c.VIRTIO_MSI_NO_VECTOR

    def _write_common_field(self, off, value):
        q = self._selected()
        if off == c.VIRTIO_PCI_COMMON_DFSELECT:
            self.device_feature_select = value
        elif off == c.VIRTIO_PCI_COMMON_GFSELECT:
            self.driver_feature_select = value
        elif off == c.VIRTIO_PCI_COMMON_GF:
            if self.driver_feature_select < 2 and not self.status & c.VIRTIO_CONFIG_S_FEATURES_OK:
                shift = 32 * self.driver_feature_select
                self.driver_features = self.driver_features & ~(_U32 << shift) | value << shift
        elif off == c.VIRTIO_PCI_COMMON_MSIX:
            self.config_vector = self._mappable(value)
        elif off == c.VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_select = value
        elif q is None:
            return
        elif off == c.VIRTIO_PCI_COMMON_Q_SIZE:
            if not q.enable and value and not value & (value - 1) and \
                    value <= self.params.max_queue_size:
                q.size = value
        elif off == c.VIRTIO_PCI_COMMON_Q_MSIX:
            q.vector = self._mappable(value)
        elif off == c.VIRTIO_PCI_COMMON_Q_ENABLE:
            if value == 1:          # 0 is ignored: no RING_RESET
                q.enable = True
        else:
            for lo, area in ((c.VIRTIO_PCI_COMMON_Q_DESCLO, "desc"),
                             (c.VIRTIO_PCI_COMMON_Q_AVAILLO, "driver"),
                             (c.VIRTIO_PCI_COMMON_Q_USEDLO, "device")):
                if off in (lo, lo + 4) and not q.enable:
                    shift = 8 * (off - lo)
                    setattr(q, area, getattr(q, area) & ~(_U32 << shift) | value << shift)

    # --- notifications (virtio 1.2 4.1.4.4; C11) ---------------------------------------------

    def _notify_dword(self, local, strobe):
        mult = self.params.bar.notify_off_multiplier
        for index, q in enumerate(self.queues):
            byte = index * mult
            if local == byte - byte % 4 and strobe & (0b11 << byte % 4):
                name = f"MGMT_NOTIFY_COUNT_Q{index}"
                self.counters[name] = self.counters[name] + 1 & _U32
                if q.enable and not self.resetting:
                    q.kick = True

    # --- MSI-X (C11) -------------------------------------------------------------------------

    def _msix_dword(self, local, strobe, data):
        vectors = self.params.msix_vectors
        entry, word = divmod(local, c.PCI_MSIX_ENTRY_SIZE)
        pba = self.params.bar.msix_pba - self.params.bar.msix_table
        if entry < vectors and word == c.PCI_MSIX_ENTRY_VECTOR_CTRL:
            if data is None:
                return c.PCI_MSIX_ENTRY_CTRL_MASKBIT if self._msix_masked[entry] else 0
            if strobe & 1:
                self._msix_masked[entry] = bool(data & c.PCI_MSIX_ENTRY_CTRL_MASKBIT)
                self._msix_deliver()
            return 0
        if entry < vectors:
            raw = self._msix_entries[entry]
            if data is None:
                return int.from_bytes(raw[word:word + 4], "little")
            for lane in range(4):
                if strobe >> lane & 1:
                    raw[word + lane] = data >> 8 * lane & 0xFF
            return 0
        if data is None and pba <= local < pba + 4 * -(-vectors // 32):
            first = 8 * (local - pba)
            return sum(1 << i for i in range(32)
                       if first + i < vectors and self._msix_pending[first + i])
        return 0

    def _msix_request(self, vector):
        if self.msix_enabled:       # without MSI-X the ISR byte's INTx carries the event
            self._msix_pending[vector] = True
            self._msix_deliver()

    def _msix_deliver(self):
        """Send every pending, unmasked vector once, if MSI-X may send now."""
        if not (self.msix_enabled and not self.msix_function_masked and self.bus_master):
            return
        for vector in range(self.params.msix_vectors):
            if self._msix_pending[vector] and not self._msix_masked[vector]:
                self._msix_pending[vector] = False
                raw = self._msix_entries[vector]
                address = int.from_bytes(raw[0:8], "little")
                data = int.from_bytes(raw[8:12], "little")
                if self.msix_sink is None or self.msix_sink(address, data):
                    self.counters["MGMT_MSIX_SENT"] = self.counters["MGMT_MSIX_SENT"] + 1 & _U32
                else:
                    self.counters["MGMT_MSIX_FAILED"] = \
                        self.counters["MGMT_MSIX_FAILED"] + 1 & _U32
                    self._msix_pending[vector] = True

    def _raise(self, isr_bit, vector):
        """An event of the interrupt router (C11): ISR bit, then the vector's message."""
        self.isr |= isr_bit
        if vector < self.params.msix_vectors:
            self._msix_request(vector)

    def _config_interrupt(self):
        self._raise(c.VIRTIO_PCI_ISR_CONFIG, self.config_vector)

    def _needs_reset(self):
        """Set DEVICE_NEEDS_RESET and raise the configuration interrupt (C7, C10)."""
        if not self.resetting:
            self.status |= c.VIRTIO_CONFIG_S_NEEDS_RESET
            self._config_interrupt()

    # --- virtqueues (virtio 1.2 2.7; C5, C6, C7, C11, C12) -----------------------------------

    def _count(self, name):
        self.counters[name] = self.counters[name] + 1 & _U32

    def _dma_allowed(self):
        """C12: no DMA before DRIVER_OK or while Bus Master Enable is clear."""
        return self.driver_ok and self.bus_master

    def _rd(self, addr, length):
        try:
            return self.memory.dma_read(addr, length)
        except DmaError:
            raise _Fault(c.RingFault.DMA_READ) from None

    def _wr(self, addr, data):
        try:
            self.memory.dma_write(addr, data)
        except DmaError:
            raise _Fault(c.RingFault.DMA_WRITE) from None

    def _rd16(self, addr):
        return int.from_bytes(self._rd(addr, 2), "little")

    def _service(self):
        """Serve every queue that has work and may run: kicked queues drain, a pending
        minimum goes into a held fromdevq buffer."""
        if not self._dma_allowed():
            return
        for index, q in enumerate(self.queues):
            if not q.enable or q.stopped:
                continue
            kicked, q.kick = q.kick, False
            sends_min = index == c.FROMDEVQ and self.min_pending is not None
            if kicked or sends_min and q.held:
                self._queue_work(index, kicked)

    def _queue_work(self, index, kicked):
        q = self.queues[index]
        old_used = q.used_idx
        try:
            if kicked:
                self._drain(index)
            if index == c.FROMDEVQ:
                self._send_min()
        except _Fault as fault:
            self._ring_fault(index, fault.kind)
        if q.used_idx != old_used:
            try:
                self._used_notification(index, old_used)
            except _Fault as fault:
                self._ring_fault(index, fault.kind)

    def _ring_fault(self, index, kind):
        """C7: stop the queue, DEVICE_NEEDS_RESET, configuration interrupt."""
        self.queues[index].stopped = True
        self._count("MGMT_RING_FAULTS")
        self.fault_info = index << 8 | kind.value
        self.faults.append((index, kind))
        self._needs_reset()

    def _drain(self, index):
        """Take every available buffer (C11), re-reading avail idx until none is left."""
        q = self.queues[index]
        while True:
            avail_idx = self._rd16(q.driver + c.VRING_AVAIL_IDX)
            pending = avail_idx - q.last_avail & 0xFFFF
            if pending > q.size:
                raise _Fault(c.RingFault.AVAIL_AHEAD)
            if not pending:
                break
            for _ in range(pending):
                slot = q.driver + c.VRING_AVAIL_RING + 2 * (q.last_avail % q.size)
                head = self._rd16(slot)
                readable, writable = self._walk(q, head)
                q.last_avail = q.last_avail + 1 & 0xFFFF
                if index == c.TODEVQ:
                    try:
                        self._command(index, head, readable, writable)
                    except _Fault as fault:
                        # The chain was taken: avail_event counts it (as the RTL's ring
                        # fetch writes it) before its data fault stops the queue.
                        if fault.kind == c.RingFault.DMA_READ:
                            self._write_avail_event(q)
                        raise
                elif self._fromdevq_malformed(readable, writable):
                    self._count("MGMT_FROMDEVQ_MALFORMED")      # C6, at once
                    self._publish(index, head, 0)
                else:
                    q.held.append(head)
        self._write_avail_event(q)

    def _write_avail_event(self, q):
        """With EVENT_IDX, ``avail_event`` = the next avail index the device takes."""
        if self.negotiated(c.VIRTIO_F_RING_EVENT_IDX):
            self._wr(q.device + vring_avail_event_offset(q.size),
                     q.last_avail.to_bytes(2, "little"))

    def _walk(self, q, head):
        """The chain at ``head``: device-readable and device-writable (address, length)
        segments with non-zero length, in chain order; raises C7 faults."""
        readable, writable = [], []
        table, entries = q.desc, q.size
        index, count, indirect = head, 0, False
        follows_indirect = self.negotiated(c.VIRTIO_F_INDIRECT_DESC)
        while True:
            if index >= entries:
                raise _Fault(c.RingFault.DESC_INDEX)
            count += 1
            if count > entries:
                raise _Fault(c.RingFault.CHAIN_LOOP)
            desc = VringDesc.unpack(self._rd(table + c.VRING_DESC_SIZE * index, c.VRING_DESC_SIZE))
            if desc.flags & c.VRING_DESC_F_INDIRECT and follows_indirect:
                if indirect:
                    raise _Fault(c.RingFault.NESTED_INDIRECT)
                if desc.len == 0 or desc.len % c.VRING_DESC_SIZE:
                    raise _Fault(c.RingFault.INDIRECT_LENGTH)
                table, entries = desc.addr, desc.len // c.VRING_DESC_SIZE
                index, count, indirect = 0, 0, True
                continue
            if desc.len:
                segments = writable if desc.flags & c.VRING_DESC_F_WRITE else readable
                segments.append((desc.addr, desc.len))
            if not desc.flags & c.VRING_DESC_F_NEXT:
                return readable, writable
            index = desc.next

    def _publish(self, index, head, length):
        """Write one used element, then the used idx."""
        q = self.queues[index]
        slot = q.device + c.VRING_USED_RING + c.VRING_USED_ELEM_SIZE * (q.used_idx % q.size)
        self._wr(slot, struct.pack("<II", head, length))
        q.used_idx = q.used_idx + 1 & 0xFFFF
        self._wr(q.device + c.VRING_USED_IDX, q.used_idx.to_bytes(2, "little"))
        self.used[index].append((head, length))

    def _write_segments(self, segments, data):
        """Write ``data`` at the start of the writable bytes, across segment boundaries."""
        done = 0
        for addr, length in segments:
            if done == len(data):
                break
            piece = data[done:done + length]
            self._wr(addr, piece)
            done += len(piece)

    def _used_notification(self, index, old_used):
        """C11: with EVENT_IDX, notify when used idx crossed ``used_event``; otherwise unless
        the driver set NO_INTERRUPT."""
        q = self.queues[index]
        if self.negotiated(c.VIRTIO_F_RING_EVENT_IDX):
            event = self._rd16(q.driver + vring_used_event_offset(q.size))
            notify = vring_need_event(event, q.used_idx, old_used)
        else:
            notify = not self._rd16(q.driver + c.VRING_AVAIL_FLAGS) & c.VRING_AVAIL_F_NO_INTERRUPT
        if notify:
            self._raise(c.VIRTIO_PCI_ISR_QUEUE, q.vector)

    # --- balloon commands (C5, C8) -----------------------------------------------------------

    def _command(self, index, head, readable, writable):
        data = b"".join(self._rd(addr, length) for addr, length in readable)
        before = self._balloon_state()
        used_len, result = self._execute(data, sum(length for _, length in writable))
        try:
            self._write_segments(writable, result)
            self._publish(index, head, used_len)
        except _Fault:
            self._restore_balloon_state(before)     # C7: atomic
            raise

    def _balloon_state(self):
        """What a command may change (C7), to undo it."""
        return (set(self.bitmap), self.balloon_pages, self.return_budget, dict(self.counters),
                len(self.get_grants), Counter(self.malformed))

    def _restore_balloon_state(self, state):
        (self.bitmap, self.balloon_pages, self.return_budget, self.counters, grants,
         self.malformed) = state
        del self.get_grants[grants:]

    def _reject(self, reason):
        self._count("MGMT_CMD_MALFORMED")
        self.malformed[reason] += 1
        return 0, b""

    def _execute(self, data, writable):
        """One todevq command (C5): (used.len, bytes for the writable part)."""
        if not data or len(data) % 8:
            return self._reject(Malformed.LENGTH)
        code, *addrs = struct.unpack(f"<{len(data) // 8}Q", data)
        if code not in {cmd.value for cmd in c.GuestCmd}:
            return self._reject(Malformed.UNKNOWN)
        if not addrs:
            return self._reject(Malformed.EMPTY)
        if code == c.VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES and len(addrs) % 2:
            return self._reject(Malformed.ODD_EXCHANGE)
        if writable != (8 if code == c.VIRTIO_MEMBALLOON_GCMD_GET_PAGES else 0):
            return self._reject(Malformed.WRITABLE)
        if code == c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES:
            self._count("MGMT_CMD_GIVE")
            for addr in addrs:
                self._enter(addr)
            return 0, b""
        if code == c.VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES:
            self._count("MGMT_CMD_EXCHANGE")
            half = len(addrs) // 2
            for addr in addrs[:half]:
                page = self._page(addr)
                if page is None:
                    continue
                if self._grantable(page):
                    self._leave(page)
                else:
                    self._count("MGMT_VIOLATION_NOT_IN_BALLOON")
            for addr in addrs[half:]:
                self._enter(addr)
            return 0, b""
        self._count("MGMT_CMD_GET")
        granted = 0
        for addr in addrs:
            if granted == self.params.get_grant_limit:
                break                       # C5: the device's per-command grant limit
            page = self._page(addr)
            if page is None or not self._grantable(page) or self.return_budget == 0:
                break
            self._leave(page)
            if self.return_budget != c.MGMT_UNLIMITED_BUDGET:
                self.return_budget -= 1
            granted += 1
        if granted < len(addrs):
            self._count("MGMT_GET_SHORT")
        self.get_grants.append((len(addrs), granted))
        return 8, granted.to_bytes(8, "little")

    @property
    def window_base(self):
        """The tracked window's base as used: rounded down to the page size (C8)."""
        return self._window_base & ~((1 << self.page_shift) - 1)

    def _page(self, addr):
        """Bitmap index of a valid page address, or None after counting its violation."""
        shift = self.page_shift
        if addr & (1 << shift) - 1:
            self._count("MGMT_VIOLATION_MISALIGNED")
            return None
        page = addr - self.window_base >> shift
        if addr < self.window_base or page >= self.bitmap_pages:
            self._count("MGMT_VIOLATION_OUT_OF_WINDOW")
            return None
        return page

    def _extra_indices(self):
        first, count = self.extra_range
        return range(min(first, self.bitmap_pages), min(first + count, self.bitmap_pages))

    def _grantable(self, page):
        return page in self.bitmap and (page not in self._extra_indices()
                                        or self.negotiated(c.VIRTIO_MEMBALLOON_F_EXTRA_MEM))

    def _enter(self, addr):
        page = self._page(addr)
        if page is None:
            return
        if page in self.bitmap:
            self._count("MGMT_VIOLATION_DOUBLE_GIVE")
            return
        self.bitmap.add(page)
        self.balloon_pages += 1
        self._count("MGMT_PAGES_ENTERED")

    def _leave(self, page):
        self.bitmap.discard(page)
        self.balloon_pages -= 1
        self._count("MGMT_PAGES_LEFT")

    # --- fromdevq (C6) -----------------------------------------------------------------------

    @staticmethod
    def _fromdevq_malformed(readable, writable):
        """C6: readable bytes, or fewer than 16 writable bytes."""
        return bool(readable) or sum(length for _, length in writable) < c.FROMDEVQ_MIN_BUFFER

    def _send_min(self):
        """Write the pending minimum into the oldest held fromdevq buffer, its chain walked
        again (C7 faults raise); one made malformed meanwhile is used with len 0 and
        counted, and the next one is tried. True if one was sent."""
        q = self.queues[c.FROMDEVQ]
        while self.min_pending is not None and q.held:
            head = q.held.pop(0)
            readable, writable = self._walk(q, head)
            if self._fromdevq_malformed(readable, writable):
                self._count("MGMT_FROMDEVQ_MALFORMED")
                self._publish(c.FROMDEVQ, head, 0)
                continue
            value = self.min_pending
            if not self.negotiated(c.VIRTIO_MEMBALLOON_F_EXTRA_MEM):
                value = max(value, 0)   # the draft: never negative without EXTRA_MEM
            self._write_segments(writable, struct.pack(
                "<Qq", c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON, value))
            self._publish(c.FROMDEVQ, head, c.FROMDEVQ_MIN_BUFFER)
            self.min_pending = None
            self._count("MGMT_MIN_SENT")
            self.min_messages.append(value)
            return True
        return False

    def _set_min(self, value):
        if self.min_pending is not None:
            self._count("MGMT_MIN_DROPPED")     # hold the newest, drop the older (C6)
        self.min_pending = value

    # --- scoreboard --------------------------------------------------------------------------

    @property
    def page_size(self):
        """The negotiated page size in bytes, None before FEATURES_OK."""
        return 1 << self.page_shift if self.features_ok else None

    def bitmap_bytes(self):
        """The bitmap as bytes, bit ``i`` (LSB first) = page ``i`` of the window."""
        bits = sum(1 << page for page in self.bitmap)
        return bits.to_bytes(-(-self.bitmap_pages // 8), "little")

    def balloon_addresses(self):
        """Addresses of the host-owned pages (set bits), at the negotiated page size."""
        return {self.window_base + (page << self.page_shift) for page in self.bitmap}

    # --- management port (C10) ---------------------------------------------------------------

    def _mgmt_registers(self):
        regs = {
            c.MGMT_ID: c.MGMT_ID_VALUE,
            c.MGMT_VERSION: c.MGMT_VERSION_VALUE,
            c.MGMT_DEVICE_STATUS: self.device_status,
            c.MGMT_DRIVER_FEATURES_LO: self.driver_features & _U32,
            c.MGMT_DRIVER_FEATURES_HI: self.driver_features >> 32,
            c.MGMT_BALLOON_PAGES: self.balloon_pages & _U32,
            c.MGMT_BITMAP_PAGES: self.bitmap_pages,
            c.MGMT_PAGE_SHIFT: self.page_shift,
            c.MGMT_WINDOW_BASE_LO: self._window_base & _U32,
            c.MGMT_WINDOW_BASE_HI: self._window_base >> 32,
            c.MGMT_MIN_BALLOON_LO: self._min_regs[0],
            c.MGMT_MIN_BALLOON_HI: self._min_regs[1],
            c.MGMT_RETURN_BUDGET: self.return_budget,
            c.MGMT_EXTRA_FIRST_PAGE: self._extra_first_reg,
            c.MGMT_EXTRA_PAGES: self.extra_range[1],
            c.MGMT_BITMAP_INDEX: self._bitmap_index,
            c.MGMT_BITMAP_DATA: sum(1 << i for i in range(32)
                                    if 32 * self._bitmap_index + i in self.bitmap),
            c.MGMT_BUSY: int(self.resetting),
            c.MGMT_FAULT_INFO: self.fault_info,
        }
        regs.update((getattr(c, name), value) for name, value in self.counters.items())
        return regs

    @staticmethod
    def _check_mgmt(offset):
        if not isinstance(offset, int) or offset < 0 or offset % 4 or \
                offset >= 1 << c.MGMT_ADDR_WIDTH:
            raise ValueError(f"management offset {offset!r} is not a dword offset below "
                             f"{1 << c.MGMT_ADDR_WIDTH:#x}")

    def mgmt_read(self, offset):
        """A 32-bit management register (``MGMT_*``); unassigned offsets read 0."""
        self._check_mgmt(offset)
        return self._mgmt_registers().get(offset, 0)

    def mgmt_write(self, offset, value):
        """A 32-bit management register write; read-only and unassigned offsets ignore it."""
        self._check_mgmt(offset)
        _check_range("management write value", value, 32)
        if offset == c.MGMT_CONTROL and value & c.MGMT_CONTROL_REQUEST_RESET:
            self._needs_reset()
        elif offset in (c.MGMT_WINDOW_BASE_LO, c.MGMT_WINDOW_BASE_HI) and not self.driver_ok:
            shift = 32 * (offset - c.MGMT_WINDOW_BASE_LO) // 4
            self._window_base = self._window_base & ~(_U32 << shift) | value << shift
        elif offset == c.MGMT_MIN_BALLOON_LO:
            self._min_regs[0] = value
        elif offset == c.MGMT_MIN_BALLOON_HI:
            self._min_regs[1] = value
            raw = value << 32 | self._min_regs[0]
            self._set_min(raw - (1 << 64) if raw >> 63 else raw)
        elif offset == c.MGMT_RETURN_BUDGET:
            self.return_budget = value
        elif offset == c.MGMT_EXTRA_FIRST_PAGE:
            self._extra_first_reg = value
        elif offset == c.MGMT_EXTRA_PAGES:
            self.extra_range = (self._extra_first_reg, value)
            self.bitmap.update(self._extra_indices())
        elif offset == c.MGMT_BITMAP_INDEX:
            self._bitmap_index = value
        self._service()

    # Host conveniences over the registers (what a board manager's tool would do).

    def set_min_balloon(self, nbytes):
        """C6/C10: commit a signed minimum in bytes; it goes to the driver on fromdevq."""
        _check_range("minimum balloon size", nbytes, 64, signed=True)
        raw = nbytes & (1 << 64) - 1
        self.mgmt_write(c.MGMT_MIN_BALLOON_LO, raw & _U32)
        self.mgmt_write(c.MGMT_MIN_BALLOON_HI, raw >> 32)

    def set_return_budget(self, pages):
        """C10: pages GET may still grant (``MGMT_UNLIMITED_BUDGET``: no limit)."""
        _check_range("return budget", pages, 32)
        self.mgmt_write(c.MGMT_RETURN_BUDGET, pages)

    def set_extra_range(self, first, count):
        """C8: the extra-memory range, in window pages."""
        _check_range("extra range first page", first, 32)
        _check_range("extra range page count", count, 32)
        self.mgmt_write(c.MGMT_EXTRA_FIRST_PAGE, first)
        self.mgmt_write(c.MGMT_EXTRA_PAGES, count)

    def set_window_base(self, addr):
        """C8: the tracked window's base address (takes effect only while DRIVER_OK is
        clear)."""
        _check_range("window base", addr, 64)
        self.mgmt_write(c.MGMT_WINDOW_BASE_LO, addr & _U32)
        self.mgmt_write(c.MGMT_WINDOW_BASE_HI, addr >> 32)

    def request_reset(self):
        """C10: ask the driver to reset the device."""
        self.mgmt_write(c.MGMT_CONTROL, c.MGMT_CONTROL_REQUEST_RESET)

    def bitmap_word(self, index):
        """C10: read bitmap word ``index`` through the registers."""
        _check_range("bitmap word index", index, 32)
        self.mgmt_write(c.MGMT_BITMAP_INDEX, index)
        return self.mgmt_read(c.MGMT_BITMAP_DATA)
