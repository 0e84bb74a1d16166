"""Every virtio and memballoon number, once.

The gateware (``memballoon.hdl``), the driver model, the reference model and the tests
import these. Names follow the Linux headers (``linux/virtio_pci.h``,
``linux/virtio_config.h``, ``linux/virtio_ring.h``) where Linux has the number; the
memballoon numbers come from ``memballoon-draft.txt`` and ``CONTRACT.md`` (C1..C12).
Enums carry an Amaranth shape so the same class is used in gateware (``m.Case(...)``)
and on the host (``.value``).
"""

from amaranth.lib import enum

# --- C1 identity -------------------------------------------------------------------

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
VIRTIO_ID_MEMORY_BALLOON = 13
#: Devices the VFIO backend is proven against in a VM (tests/test_vm_vfio.py): virtio-rng
#: and virtio-blk (virtio 1.2 5.2: request header, data, status byte).
VIRTIO_ID_ENTROPY = 4
VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_SECTOR_SIZE = 512
VIRTIO_BLK_CFG_CAPACITY = 0                 # le64 sectors, first field of the config
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040
MEMBALLOON_PCI_DEVICE_ID = VIRTIO_PCI_MODERN_DEVICE_ID_BASE + VIRTIO_ID_MEMORY_BALLOON  # 0x104D
MEMBALLOON_PCI_REVISION_ID = 0x01           # >= 1: non-transitional (C1)
MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID = PCI_VENDOR_ID_REDHAT_QUMRANET
MEMBALLOON_PCI_SUBSYSTEM_ID = 0x0040        # >= 0x40 (C1)
PCI_CLASS_MEMORY_OTHER = 0x058000           # memory controller, other (C1)

# --- PCI configuration space (linux/pci_regs.h names) --------------------------------

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS = 0x06
PCI_STATUS_INTERRUPT = 0x08                 # INTx pending in the function (C11)
PCI_STATUS_CAP_LIST = 0x10
PCI_REVISION_ID = 0x08
PCI_CLASS_REVISION = 0x08
PCI_CLASS_PROG = 0x09
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
#: Interrupt Pin value of INTA (PCI 3.0 6.2.4: 1..4 = INTA..INTD, 0 = none).
PCI_INTERRUPT_PIN_INTA = 1
PCI_STD_NUM_BARS = 6
PCI_CFG_SPACE_EXP_SIZE = 4096
#: Linux's PCI_FIND_CAP_TTL: a capability list longer than this is a loop.
PCI_FIND_CAP_TTL = 48
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_VNDR = 0x09
PCI_MSIX_FLAGS = 2                          # offset of Message Control in the MSI-X cap
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0
PCI_MSIX_ENTRY_UPPER_ADDR = 4
PCI_MSIX_ENTRY_DATA = 8
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1


# --- virtio device status (virtio 1.2 2.1) -------------------------------------------

class DeviceStatus(enum.IntFlag, shape=8):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


VIRTIO_CONFIG_S_ACKNOWLEDGE = DeviceStatus.ACKNOWLEDGE.value
VIRTIO_CONFIG_S_DRIVER = DeviceStatus.DRIVER.value
VIRTIO_CONFIG_S_DRIVER_OK = DeviceStatus.DRIVER_OK.value
VIRTIO_CONFIG_S_FEATURES_OK = DeviceStatus.FEATURES_OK.value
VIRTIO_CONFIG_S_NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET.value
VIRTIO_CONFIG_S_FAILED = DeviceStatus.FAILED.value

# --- Feature bits (bit numbers) --------------------------------------------------------

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40

VIRTIO_MEMBALLOON_F_EXTRA_MEM = 0
#: Page-size feature bits 1..23: bit n accepts pages of 2**(n + 11) bytes (4K .. 16G).
VIRTIO_MEMBALLOON_F_PAGE_FIRST = 1
VIRTIO_MEMBALLOON_F_PAGE_LAST = 23
VIRTIO_MEMBALLOON_F_4K = 1
VIRTIO_MEMBALLOON_F_2M = 10
VIRTIO_MEMBALLOON_F_1G = 19
VIRTIO_MEMBALLOON_F_16G = 23
PAGE_SIZE_FEATURE_BITS = range(VIRTIO_MEMBALLOON_F_PAGE_FIRST, VIRTIO_MEMBALLOON_F_PAGE_LAST + 1)
PAGE_SIZE_FEATURE_MASK = sum(1 << b for b in PAGE_SIZE_FEATURE_BITS)


def page_size_of_feature(bit):
    """Page size in bytes accepted by page-size feature ``bit`` (1 -> 4 KiB .. 23 -> 16 GiB)."""
    if bit not in PAGE_SIZE_FEATURE_BITS:
        raise ValueError(f"feature bit {bit} is not a memballoon page-size bit (1..23)")
    return 1 << (bit + 11)


def page_shift_of_feature(bit):
    return page_size_of_feature(bit).bit_length() - 1


def feature_of_page_size(size):
    """Inverse of :func:`page_size_of_feature`."""
    if size <= 0 or size & (size - 1):
        raise ValueError(f"page size {size} is not a power of two")
    bit = size.bit_length() - 1 - 11
    if bit not in PAGE_SIZE_FEATURE_BITS:
        raise ValueError(f"page size {size} is outside 4 KiB .. 16 GiB")
    return bit


def size_name(size):
    """``4096`` -> ``"4K"``, ``1 << 30`` -> ``"1G"``."""
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if size >= 1 << shift:
            return f"{size >> shift}{unit}"
    return str(size)


FEATURE_NAMES = {
    VIRTIO_MEMBALLOON_F_EXTRA_MEM: "EXTRA_MEM",
    **{b: "PAGE_" + size_name(page_size_of_feature(b)) for b in PAGE_SIZE_FEATURE_BITS},
    VIRTIO_F_INDIRECT_DESC: "INDIRECT_DESC",
    VIRTIO_F_RING_EVENT_IDX: "RING_EVENT_IDX",
    VIRTIO_F_VERSION_1: "VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    VIRTIO_F_RING_PACKED: "RING_PACKED",
    VIRTIO_F_IN_ORDER: "IN_ORDER",
    VIRTIO_F_ORDER_PLATFORM: "ORDER_PLATFORM",
    VIRTIO_F_SR_IOV: "SR_IOV",
    VIRTIO_F_NOTIFICATION_DATA: "NOTIFICATION_DATA",
    VIRTIO_F_NOTIF_CONFIG_DATA: "NOTIF_CONFIG_DATA",
    VIRTIO_F_RING_RESET: "RING_RESET",
}


def feature_names(bits):
    """Readable names of the set bits of a 64-bit feature word."""
    return [FEATURE_NAMES.get(b, f"bit{b}") for b in range(64) if bits >> b & 1]


# --- virtio PCI capabilities (virtio 1.2 4.1.4) ----------------------------------------

class PciCapType(enum.Enum, shape=8):
    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5
    SHARED_MEMORY_CFG = 8
    VENDOR_CFG = 9


VIRTIO_PCI_CAP_COMMON_CFG = PciCapType.COMMON_CFG.value
VIRTIO_PCI_CAP_NOTIFY_CFG = PciCapType.NOTIFY_CFG.value
VIRTIO_PCI_CAP_ISR_CFG = PciCapType.ISR_CFG.value
VIRTIO_PCI_CAP_DEVICE_CFG = PciCapType.DEVICE_CFG.value
VIRTIO_PCI_CAP_PCI_CFG = PciCapType.PCI_CFG.value

# struct virtio_pci_cap field offsets
VIRTIO_PCI_CAP_VNDR = 0
VIRTIO_PCI_CAP_NEXT = 1
VIRTIO_PCI_CAP_LEN = 2
VIRTIO_PCI_CAP_CFG_TYPE = 3
VIRTIO_PCI_CAP_BAR = 4
VIRTIO_PCI_CAP_ID = 5
VIRTIO_PCI_CAP_OFFSET = 8
VIRTIO_PCI_CAP_LENGTH = 12
VIRTIO_PCI_CAP_SIZE = 16                    # sizeof(struct virtio_pci_cap)
VIRTIO_PCI_NOTIFY_CAP_MULT = 16             # offset of notify_off_multiplier
VIRTIO_PCI_NOTIFY_CAP_SIZE = 20
VIRTIO_PCI_CFG_CAP_DATA = 16                # offset of pci_cfg_data
VIRTIO_PCI_CFG_CAP_SIZE = 20

# struct virtio_pci_common_cfg field offsets (virtio 1.2 4.1.4.3)
VIRTIO_PCI_COMMON_DFSELECT = 0x00
VIRTIO_PCI_COMMON_DF = 0x04
VIRTIO_PCI_COMMON_GFSELECT = 0x08
VIRTIO_PCI_COMMON_GF = 0x0C
VIRTIO_PCI_COMMON_MSIX = 0x10
VIRTIO_PCI_COMMON_NUMQ = 0x12
VIRTIO_PCI_COMMON_STATUS = 0x14
VIRTIO_PCI_COMMON_CFGGENERATION = 0x15
VIRTIO_PCI_COMMON_Q_SELECT = 0x16
VIRTIO_PCI_COMMON_Q_SIZE = 0x18
VIRTIO_PCI_COMMON_Q_MSIX = 0x1A
VIRTIO_PCI_COMMON_Q_ENABLE = 0x1C
VIRTIO_PCI_COMMON_Q_NOFF = 0x1E
VIRTIO_PCI_COMMON_Q_DESCLO = 0x20
VIRTIO_PCI_COMMON_Q_DESCHI = 0x24
VIRTIO_PCI_COMMON_Q_AVAILLO = 0x28
VIRTIO_PCI_COMMON_Q_AVAILHI = 0x2C
VIRTIO_PCI_COMMON_Q_USEDLO = 0x30
VIRTIO_PCI_COMMON_Q_USEDHI = 0x34
VIRTIO_PCI_COMMON_Q_NDATA = 0x38
VIRTIO_PCI_COMMON_Q_RESET = 0x3A
VIRTIO_PCI_COMMON_CFG_SIZE = 0x3C           # through queue_reset (virtio 1.2)

VIRTIO_MSI_NO_VECTOR = 0xFFFF

# ISR status bits (virtio 1.2 4.1.4.5)
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

# --- Virtqueues (C2) -------------------------------------------------------------------

FROMDEVQ = 0
TODEVQ = 1
NUM_QUEUES = 2

#: Linux accepts modern virtio devices with PCI device IDs 0x1000..0x107F.
VIRTIO_PCI_DEVICE_ID_MIN = 0x1000
VIRTIO_PCI_DEVICE_ID_MAX = 0x107F

# Split ring (virtio 1.2 2.7), for the virtqueue engine, virtio_ring and the model
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VRING_DESC_SIZE = 16
VRING_USED_ELEM_SIZE = 8
#: Part alignments (virtio 1.2 2.7, "Virtqueue Alignment").
VRING_DESC_ALIGN = 16
VRING_AVAIL_ALIGN = 2
VRING_USED_ALIGN = 4
#: Byte offsets inside the driver area (avail) and device area (used), 2.7.6 and 2.7.8.
VRING_AVAIL_FLAGS = 0
VRING_AVAIL_IDX = 2
VRING_AVAIL_RING = 4
VRING_USED_FLAGS = 0
VRING_USED_IDX = 2
VRING_USED_RING = 4
#: A descriptor's length field is 32 bits (2.7.5).
VRING_DESC_MAX_LEN = (1 << 32) - 1


def vring_desc_size(num):
    return VRING_DESC_SIZE * num


def vring_avail_size(num):
    return 6 + 2 * num          # flags, idx, ring[num], used_event


def vring_used_size(num):
    return 6 + VRING_USED_ELEM_SIZE * num     # flags, idx, ring[num], avail_event


# --- memballoon commands (draft, C5, C6) -------------------------------------------------

class GuestCmd(enum.Enum, shape=64):
    """Command codes the driver puts first in a todevq buffer (le64)."""
    GET_PAGES = 0
    GIVE_PAGES = 1
    EXCHANGE_PAGES = 2


class HostCmd(enum.Enum, shape=64):
    """Command codes the device writes into a fromdevq buffer (le64)."""
    MIN_BALLOON = 32768


VIRTIO_MEMBALLOON_GCMD_GET_PAGES = GuestCmd.GET_PAGES.value
VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES = GuestCmd.GIVE_PAGES.value
VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES = GuestCmd.EXCHANGE_PAGES.value
VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON = HostCmd.MIN_BALLOON.value
FROMDEVQ_MIN_BUFFER = 16                    # C6: two le64
GET_GRANT_LIMIT_MIN = 512                   # C5: the smallest per-command grant limit


# --- Host management port (C10): AXI4-Lite register offsets ------------------------------
# Never visible through the virtio function's BARs: a separate AXI4-Lite slave on the top
# level, for the hypervisor or board manager. All registers are 32 bits; counters wrap.

MGMT_ADDR_WIDTH = 12

MGMT_ID = 0x000                             # reads MGMT_ID_VALUE
MGMT_VERSION = 0x004                        # major << 16 | minor
MGMT_DEVICE_STATUS = 0x008                  # the driver's device_status, read-only
MGMT_CONTROL = 0x00C                        # write 1s to act, see MGMT_CONTROL_*
MGMT_DRIVER_FEATURES_LO = 0x010             # accepted features, valid with FEATURES_OK
MGMT_DRIVER_FEATURES_HI = 0x014
MGMT_NOTIFY_COUNT_Q0 = 0x018                # doorbells received per queue
MGMT_NOTIFY_COUNT_Q1 = 0x01C
MGMT_MSIX_SENT = 0x020                      # MSI-X messages the hard IP sent
MGMT_MSIX_FAILED = 0x024                    # ... and reported as failed

# Balloon state (C8)
MGMT_BALLOON_PAGES = 0x040                  # signed: +1 per page entering, -1 leaving
MGMT_BITMAP_PAGES = 0x044                   # pages the bitmap tracks (build parameter)
MGMT_PAGE_SHIFT = 0x048                     # log2 of the negotiated page size, 0 before
MGMT_WINDOW_BASE_LO = 0x050                 # tracked window base address (bytes); writes
MGMT_WINDOW_BASE_HI = 0x054                 # only take effect while DRIVER_OK is clear
# Host controls (C6, C10)
MGMT_MIN_BALLOON_LO = 0x060                 # signed bytes; writing HI commits the value
MGMT_MIN_BALLOON_HI = 0x064                 # and sends it on fromdevq (C6)
MGMT_RETURN_BUDGET = 0x068                  # pages GET may still grant; all-ones = unlimited
MGMT_EXTRA_FIRST_PAGE = 0x070               # extra-memory range (C8), page index in the
MGMT_EXTRA_PAGES = 0x074                    # window; writing EXTRA_PAGES commits the range
MGMT_BITMAP_INDEX = 0x080                   # bitmap read: 32-bit word index ...
MGMT_BITMAP_DATA = 0x084                    # ... its bits (bit i = page 32 * index + i)
MGMT_BUSY = 0x088                           # 1 while a bitmap clear/fill is running
# Counters (C5, C6, C7)
MGMT_CMD_GIVE = 0x100                       # well-formed commands completed, per kind
MGMT_CMD_GET = 0x104
MGMT_CMD_EXCHANGE = 0x108
MGMT_CMD_MALFORMED = 0x10C                  # todevq commands rejected as malformed (C5)
MGMT_VIOLATION_MISALIGNED = 0x110           # addresses not aligned to the page size
MGMT_VIOLATION_OUT_OF_WINDOW = 0x114        # addresses outside the tracked window
MGMT_VIOLATION_DOUBLE_GIVE = 0x118          # pages given that were already in the balloon
MGMT_VIOLATION_NOT_IN_BALLOON = 0x11C       # EXCHANGE wanted pages the balloon did not hold
MGMT_GET_SHORT = 0x120                      # GET commands granted fewer pages than asked
MGMT_PAGES_ENTERED = 0x124
MGMT_PAGES_LEFT = 0x128
MGMT_FROMDEVQ_MALFORMED = 0x130             # fromdevq buffers rejected (C6)
MGMT_MIN_SENT = 0x134                       # MIN_BALLOON messages written
MGMT_MIN_DROPPED = 0x138                    # values replaced before they could be sent
MGMT_RING_FAULTS = 0x140                    # C7 faults
MGMT_FAULT_INFO = 0x144                     # last fault: queue << 8 | RingFault

MGMT_ID_VALUE = 0x4D424C4E                  # "MBLN"
MGMT_VERSION_VALUE = 0x00010000
#: Host asks the driver to reset the device: sets DEVICE_NEEDS_RESET and raises the
#: configuration-change interrupt, the same path a C7 ring fault takes.
MGMT_CONTROL_REQUEST_RESET = 0x1
MGMT_UNLIMITED_BUDGET = 0xFFFF_FFFF


class RingFault(enum.Enum, shape=4):
    """Kinds of C7 ring faults, as MGMT_FAULT_INFO reports them."""
    NONE = 0
    DESC_INDEX = 1          # descriptor index >= queue size
    CHAIN_LOOP = 2          # chain longer than the queue size
    NESTED_INDIRECT = 3     # indirect descriptor inside an indirect table
    INDIRECT_LENGTH = 4     # indirect table length 0 or not a multiple of 16
    AVAIL_AHEAD = 5         # avail index more than queue size ahead
    DMA_READ = 6            # a read failed: UR, CA, completion timeout
    DMA_WRITE = 7           # a write could not be issued
