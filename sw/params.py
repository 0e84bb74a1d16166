"""Build-time parameters of one memballoon device, shared by gateware, testbench and tools.

One :class:`DeviceParams` instance fixes everything that is chosen at build time: the
AXI-stream width, the BAR layout, the offered page sizes (C3), the largest queue, the
MSI-X table size and where the capability window of the hard IP lies. The hard IP model
in ``tb/`` and (later) the Vivado IP settings are derived from the same instance.
"""

from dataclasses import dataclass, field

from . import constants as c


@dataclass(frozen=True)
class BarLayout:
    """Where each virtio structure lives in BAR0 (one 4 KiB page each, so VFIO can mmap
    them separately and a page of the BAR never mixes two structures)."""
    common_cfg: int = 0x0000
    notify: int = 0x1000
    isr: int = 0x2000
    msix_table: int = 0x3000
    msix_pba: int = 0x3800
    size: int = 0x4000                      # BAR0 aperture in bytes (power of two)
    notify_off_multiplier: int = 4          # queue i notifies at notify + 4 * i


@dataclass(frozen=True)
class DeviceParams:
    #: AXI-stream data width of the hard IP interface: 512 (Gen3 x16) or 256 (Gen3 x8).
    data_width: int = 512
    #: Largest queue size the device accepts (power of two, <= 32768).
    max_queue_size: int = 256
    #: Offered page-size feature bits (C3): default 4K, 2M and 1G.
    page_size_bits: tuple = (c.VIRTIO_MEMBALLOON_F_4K, c.VIRTIO_MEMBALLOON_F_2M,
                             c.VIRTIO_MEMBALLOON_F_1G)
    #: MSI-X vectors: one for configuration changes and one per queue (C11).
    msix_vectors: int = 1 + c.NUM_QUEUES
    #: Pages the balloon bitmap tracks (C8): a power of two, 2**10 .. 2**24.
    bitmap_pages: int = 1 << 20
    #: Pages one GET may take at most (C5's per-command grant limit, at least
    #: ``GET_GRANT_LIMIT_MIN``): a longer GET is a prefix grant.
    get_grant_limit: int = 512
    #: Legacy configuration-space window the PCIE4 block hands to user logic through
    #: cfg_ext (byte offset and size); see README "PG213 finding".
    cfg_ext_base: int = 0xB0
    cfg_ext_size: int = 0x50
    bar: BarLayout = field(default_factory=BarLayout)

    def __post_init__(self):
        if self.data_width not in (256, 512):
            raise ValueError(f"data_width must be 256 or 512, not {self.data_width}")
        q = self.max_queue_size
        if q < 2 or q > 32768 or q & (q - 1):
            raise ValueError(f"max_queue_size must be a power of two in 2..32768, not {q}")
        if not self.page_size_bits or any(b not in c.PAGE_SIZE_FEATURE_BITS
                                          for b in self.page_size_bits):
            raise ValueError("page_size_bits must name at least one bit in 1..23 (C3)")
        b = self.bitmap_pages
        if b < 1 << 10 or b > 1 << 24 or b & (b - 1):
            raise ValueError(f"bitmap_pages must be a power of two in 2**10..2**24, not {b}")
        if not c.GET_GRANT_LIMIT_MIN <= self.get_grant_limit < 1 << 32:
            raise ValueError(f"get_grant_limit must be at least {c.GET_GRANT_LIMIT_MIN} (C5), "
                             f"not {self.get_grant_limit}")
        if not 1 + c.NUM_QUEUES <= self.msix_vectors <= 64:
            raise ValueError(f"msix_vectors must be in {1 + c.NUM_QUEUES}..64")
        if self.cfg_ext_base % 4 or self.cfg_ext_size % 4 or \
                self.cfg_ext_base < 0x40 or self.cfg_ext_base + self.cfg_ext_size > 0x100:
            raise ValueError("cfg_ext window must be dword aligned inside 0x40..0xFF")

    @property
    def offered_features(self):
        """The 64-bit feature set the device offers (C3)."""
        bits = [c.VIRTIO_MEMBALLOON_F_EXTRA_MEM, *self.page_size_bits,
                c.VIRTIO_F_INDIRECT_DESC, c.VIRTIO_F_RING_EVENT_IDX,
                c.VIRTIO_F_VERSION_1, c.VIRTIO_F_ACCESS_PLATFORM, c.VIRTIO_F_ORDER_PLATFORM]
        return sum(1 << b for b in bits)

    @property
    def cfg_ext_dwords(self):
        """First register number and count of the cfg_ext window, in dwords."""
        return self.cfg_ext_base // 4, self.cfg_ext_size // 4
