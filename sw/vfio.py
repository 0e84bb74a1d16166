"""The Linux VFIO user ABI (``linux/vfio.h``), stdlib only: ioctl numbers, structures,
flags and the thin calls the VFIO backend makes.

Names are the C header's, so this module reads side by side with
``Documentation/driver-api/vfio.rst``. Structures are ``ctypes.Structure`` subclasses with
the C field names; ``tests/test_vfio_abi.py`` compiles a C program against the system
header and checks every number, size and offset listed in :data:`ABI_STRUCTS`,
:data:`IOCTLS` and :data:`CONSTANTS`. Every call raises :class:`OSError` as the kernel
answers; the backend turns those into messages a person can act on.
"""

import ctypes
import fcntl
import os

__all__ = ["VfioContainer", "VfioGroup", "VfioDevice", "ABI_STRUCTS", "IOCTLS", "CONSTANTS"]

# --- ioctl numbers: _IO(VFIO_TYPE, VFIO_BASE + n), no size encoded --------------------

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _vfio_io(n):
    """``_IO(VFIO_TYPE, VFIO_BASE + n)`` (direction and size bits are 0)."""
    return VFIO_TYPE << 8 | (VFIO_BASE + n)


VFIO_GET_API_VERSION = _vfio_io(0)
VFIO_CHECK_EXTENSION = _vfio_io(1)
VFIO_SET_IOMMU = _vfio_io(2)
VFIO_GROUP_GET_STATUS = _vfio_io(3)
VFIO_GROUP_SET_CONTAINER = _vfio_io(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio_io(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio_io(6)
VFIO_DEVICE_GET_INFO = _vfio_io(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio_io(8)
VFIO_DEVICE_GET_IRQ_INFO = _vfio_io(9)
VFIO_DEVICE_SET_IRQS = _vfio_io(10)
VFIO_DEVICE_RESET = _vfio_io(11)
VFIO_IOMMU_GET_INFO = _vfio_io(12)
VFIO_IOMMU_MAP_DMA = _vfio_io(13)
VFIO_IOMMU_UNMAP_DMA = _vfio_io(14)

#: Every ioctl the backend issues, for the ABI test.
IOCTLS = {name: globals()[name] for name in (
    "VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU", "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_UNSET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD",
    "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO", "VFIO_DEVICE_GET_IRQ_INFO",
    "VFIO_DEVICE_SET_IRQS", "VFIO_DEVICE_RESET", "VFIO_IOMMU_GET_INFO", "VFIO_IOMMU_MAP_DMA",
    "VFIO_IOMMU_UNMAP_DMA")}

# --- constants ---------------------------------------------------------------------------

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2

VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_CONFIG_REGION_INDEX = 7

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSIX_IRQ_INDEX = 2

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1

#: Every other number of the header used here (macros of the same name), for the ABI test.
CONSTANTS = {name: value for name, value in globals().items()
             if name.startswith("VFIO_") and name not in IOCTLS and isinstance(value, int)}

# --- structures ----------------------------------------------------------------------------


class _Struct(ctypes.Structure):
    """A VFIO argument structure: ``argsz`` is filled in with its own size."""

    def __init__(self, **fields):
        super().__init__(argsz=ctypes.sizeof(self), **fields)


class vfio_group_status(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_device_info(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("num_regions", ctypes.c_uint32), ("num_irqs", ctypes.c_uint32),
                ("cap_offset", ctypes.c_uint32)]


class vfio_region_info(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("cap_offset", ctypes.c_uint32),
                ("size", ctypes.c_uint64), ("offset", ctypes.c_uint64)]


class vfio_irq_info(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("count", ctypes.c_uint32)]


class vfio_irq_set(_Struct):
    """Header of ``struct vfio_irq_set``; its ``data[]`` follows (here: int32 eventfds)."""
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("start", ctypes.c_uint32),
                ("count", ctypes.c_uint32)]


class vfio_iommu_type1_info(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("iova_pgsizes", ctypes.c_uint64), ("cap_offset", ctypes.c_uint32)]


class vfio_info_cap_header(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("version", ctypes.c_uint16),
                ("next", ctypes.c_uint32)]


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    """Header of the IOVA range capability; ``nr_iovas`` :class:`vfio_iova_range` follow."""
    _fields_ = [("header", vfio_info_cap_header), ("nr_iovas", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32)]


class vfio_iova_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]


class vfio_iommu_type1_dma_map(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("vaddr", ctypes.c_uint64), ("iova", ctypes.c_uint64),
                ("size", ctypes.c_uint64)]


class vfio_iommu_type1_dma_unmap(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("iova", ctypes.c_uint64), ("size", ctypes.c_uint64)]


#: Every structure used, for the ABI test: C name -> ctypes class. Flexible array members
#: (``data``, ``iova_ranges``) start at ``sizeof`` of the class (checked there too).
ABI_STRUCTS = {cls.__name__: cls for cls in (
    vfio_group_status, vfio_device_info, vfio_region_info, vfio_irq_info, vfio_irq_set,
    vfio_iommu_type1_info, vfio_info_cap_header, vfio_iommu_type1_info_cap_iova_range,
    vfio_iova_range, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap)}
#: Flexible array members: struct -> member that starts right after the fixed part.
FLEXIBLE_MEMBERS = {"vfio_irq_set": "data", "vfio_iommu_type1_info_cap_iova_range": "iova_ranges"}


def _ioctl(fd, request, arg=0):
    """``ioctl(fd, request, arg)``: ``arg`` an int or a ctypes object updated in place."""
    if isinstance(arg, int):
        return fcntl.ioctl(fd, request, arg)
    buf = bytearray(arg)
    ret = fcntl.ioctl(fd, request, buf, True)
    ctypes.memmove(ctypes.addressof(arg), bytes(buf), len(buf))
    return ret


# --- objects ---------------------------------------------------------------------------------


class VfioContainer:
    """``/dev/vfio/vfio``: one IOMMU context (type1v2), its DMA mappings."""

    def __init__(self, path="/dev/vfio/vfio"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = _ioctl(self.fd, VFIO_GET_API_VERSION)
            if version != VFIO_API_VERSION:
                raise OSError(f"VFIO API version {version}, this module speaks "
                              f"{VFIO_API_VERSION}")
            if not _ioctl(self.fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU):
                raise OSError("the VFIO container does not support the type1v2 IOMMU")
        except BaseException:
            os.close(self.fd)
            raise

    def set_iommu(self):
        """``VFIO_SET_IOMMU`` type1v2 (needs a group attached first)."""
        _ioctl(self.fd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)

    def iova_ranges(self):
        """``VFIO_IOMMU_GET_INFO``: the usable IOVA ranges as ``[(start, end), ...]``
        (inclusive ends), or None when the kernel does not report them."""
        info = vfio_iommu_type1_info()
        _ioctl(self.fd, VFIO_IOMMU_GET_INFO, info)
        if not info.flags & VFIO_IOMMU_INFO_CAPS or info.argsz <= ctypes.sizeof(info):
            return None
        raw = bytearray(info.argsz)
        ctypes.c_uint32.from_buffer(raw).value = info.argsz
        fcntl.ioctl(self.fd, VFIO_IOMMU_GET_INFO, raw, True)
        offset = vfio_iommu_type1_info.from_buffer(raw).cap_offset
        while offset:
            header = vfio_info_cap_header.from_buffer(raw, offset)
            if header.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                cap = vfio_iommu_type1_info_cap_iova_range.from_buffer(raw, offset)
                first = offset + ctypes.sizeof(cap)
                ranges = (vfio_iova_range * cap.nr_iovas).from_buffer(raw, first)
                return [(r.start, r.end) for r in ranges]
            offset = header.next
        return None

    def map_dma(self, vaddr, iova, size):
        """``VFIO_IOMMU_MAP_DMA``: the device may read and write ``size`` bytes at ``iova``."""
        _ioctl(self.fd, VFIO_IOMMU_MAP_DMA, vfio_iommu_type1_dma_map(
            flags=VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr=vaddr, iova=iova, size=size))

    def unmap_dma(self, iova, size):
        """``VFIO_IOMMU_UNMAP_DMA``; returns the bytes the kernel unmapped."""
        unmap = vfio_iommu_type1_dma_unmap(iova=iova, size=size)
        _ioctl(self.fd, VFIO_IOMMU_UNMAP_DMA, unmap)
        return unmap.size

    def close(self):
        os.close(self.fd)


class VfioGroup:
    """``/dev/vfio/<group>``: opened, checked viable and attached to ``container``."""

    def __init__(self, number):
        self.number = number
        self.fd = os.open(f"/dev/vfio/{number}", os.O_RDWR | os.O_CLOEXEC)
        self.container = None

    def status(self):
        """``VFIO_GROUP_GET_STATUS`` flags."""
        status = vfio_group_status()
        _ioctl(self.fd, VFIO_GROUP_GET_STATUS, status)
        return status.flags

    def set_container(self, container):
        fd = ctypes.c_int32(container.fd)
        _ioctl(self.fd, VFIO_GROUP_SET_CONTAINER, fd)
        self.container = container

    def device_fd(self, bdf):
        """``VFIO_GROUP_GET_DEVICE_FD`` for the PCI function ``bdf``."""
        name = ctypes.create_string_buffer(bdf.encode())
        return _ioctl(self.fd, VFIO_GROUP_GET_DEVICE_FD, name)

    def close(self):
        if self.container is not None:
            _ioctl(self.fd, VFIO_GROUP_UNSET_CONTAINER)
            self.container = None
        os.close(self.fd)


class VfioDevice:
    """A device fd: info, regions (read/write at an offset, or mmap), IRQs, reset."""

    def __init__(self, fd):
        self.fd = fd
        info = vfio_device_info()
        _ioctl(fd, VFIO_DEVICE_GET_INFO, info)
        self.flags = info.flags
        self.num_regions = info.num_regions
        self.num_irqs = info.num_irqs

    def region_info(self, index):
        """``VFIO_DEVICE_GET_REGION_INFO`` for region ``index``."""
        info = vfio_region_info(index=index)
        _ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, info)
        return info

    def irq_info(self, index):
        """``VFIO_DEVICE_GET_IRQ_INFO`` for IRQ index ``index``."""
        info = vfio_irq_info(index=index)
        _ioctl(self.fd, VFIO_DEVICE_GET_IRQ_INFO, info)
        return info

    def set_irq_eventfds(self, index, eventfds):
        """``VFIO_DEVICE_SET_IRQS``: trigger ``eventfds[i]`` on vector i of ``index``;
        an empty list disables every vector of ``index``."""
        header = vfio_irq_set(index=index, start=0, count=len(eventfds),
                              flags=VFIO_IRQ_SET_ACTION_TRIGGER |
                              (VFIO_IRQ_SET_DATA_EVENTFD if eventfds else VFIO_IRQ_SET_DATA_NONE))
        data = (ctypes.c_int32 * len(eventfds))(*eventfds)
        header.argsz = ctypes.sizeof(header) + ctypes.sizeof(data)
        fcntl.ioctl(self.fd, VFIO_DEVICE_SET_IRQS, bytes(header) + bytes(data))

    def unmask_irq(self, index):
        """``VFIO_DEVICE_SET_IRQS`` unmask of vector 0 of ``index``: INTx, which vfio-pci
        masks at each interrupt (it is level triggered), may fire again."""
        header = vfio_irq_set(index=index, start=0, count=1,
                              flags=VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_NONE)
        fcntl.ioctl(self.fd, VFIO_DEVICE_SET_IRQS, bytes(header))

    def reset(self):
        """``VFIO_DEVICE_RESET`` (function level reset or what the device supports)."""
        _ioctl(self.fd, VFIO_DEVICE_RESET)

    def close(self):
        os.close(self.fd)
