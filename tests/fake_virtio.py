"""A tiny in-memory virtio-pci function behind the driver's Backend interface.

Only what the driver model's unit tests need: a configuration space with the four
virtio capabilities, a common configuration structure that follows C4/C9 (or misbehaves
on request: refuse FEATURES_OK, refuse vectors, never finish a reset), a notify area and
an ISR byte. Time is a counter advanced by ``sleep``.
"""

import struct

from memballoon import constants as c
from memballoon.backend import (Backend, BackendError, DmaRegion, InterruptTimeout,
                               check_access)
from memballoon.params import DeviceParams

CAP_POS = {c.VIRTIO_PCI_CAP_COMMON_CFG: 0x40, c.VIRTIO_PCI_CAP_NOTIFY_CFG: 0x50,
           c.VIRTIO_PCI_CAP_ISR_CFG: 0x64, c.VIRTIO_PCI_CAP_PCI_CFG: 0x74}


class FakeDma(DmaRegion):
    def __init__(self, iova, size):
        super().__init__(iova, size)
        self.mem = bytearray(size)

    async def read(self, offset, length):
        self._check(offset, length)
        return bytes(self.mem[offset:offset + length])

    async def write(self, offset, data):
        self._check(offset, len(data))
        self.mem[offset:offset + len(data)] = data


class FakeVirtioBackend(Backend):
    def __init__(self, params=DeviceParams(), refuse_features=False, refuse_vectors=False,
                 stuck_reset=False, device_id=c.MEMBALLOON_PCI_DEVICE_ID):
        self.params = params
        self.refuse_features = refuse_features
        self.refuse_vectors = refuse_vectors
        self.stuck_reset = stuck_reset
        self.time = 0.0
        self.next_iova = 0x1000_0000
        self.bar_accesses = []
        self.config = bytearray(256)
        struct.pack_into("<HHHH", self.config, 0, c.PCI_VENDOR_ID_REDHAT_QUMRANET, device_id,
                         0, 0x0010)
        self.config[0x08] = c.MEMBALLOON_PCI_REVISION_ID
        self.config[0x09:0x0C] = c.PCI_CLASS_MEMORY_OTHER.to_bytes(3, "little")
        struct.pack_into("<HH", self.config, 0x2C, c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID,
                         c.MEMBALLOON_PCI_SUBSYSTEM_ID)
        self.config[c.PCI_CAPABILITY_LIST] = CAP_POS[c.VIRTIO_PCI_CAP_COMMON_CFG]
        bar = params.bar
        layout = [(c.VIRTIO_PCI_CAP_COMMON_CFG, bar.common_cfg, c.VIRTIO_PCI_COMMON_CFG_SIZE),
                  (c.VIRTIO_PCI_CAP_NOTIFY_CFG, bar.notify, 0x1000),
                  (c.VIRTIO_PCI_CAP_ISR_CFG, bar.isr, 1),
                  (c.VIRTIO_PCI_CAP_PCI_CFG, 0, 0)]
        for i, (cfg_type, offset, length) in enumerate(layout):
            pos = CAP_POS[cfg_type]
            nxt = CAP_POS[layout[i + 1][0]] if i + 1 < len(layout) else 0
            size = {c.VIRTIO_PCI_CAP_NOTIFY_CFG: c.VIRTIO_PCI_NOTIFY_CAP_SIZE,
                    c.VIRTIO_PCI_CAP_PCI_CFG: c.VIRTIO_PCI_CFG_CAP_SIZE}.get(
                        cfg_type, c.VIRTIO_PCI_CAP_SIZE)
            struct.pack_into("<BBBBBB2xII", self.config, pos, c.PCI_CAP_ID_VNDR, nxt, size,
                             cfg_type, 0, 0, offset, length)
            if cfg_type == c.VIRTIO_PCI_CAP_NOTIFY_CFG:
                struct.pack_into("<I", self.config, pos + c.VIRTIO_PCI_NOTIFY_CAP_MULT,
                                 bar.notify_off_multiplier)
        self.reset_device()
        self.notifies = []
        self.irq_counts = []

    def reset_device(self):
        self.status = 0
        self.dfselect = self.gfselect = self.queue_select = 0
        self.driver_features = [0, 0]
        self.msix_config = c.VIRTIO_MSI_NO_VECTOR
        self.queues = [{"size": self.params.max_queue_size, "vector": c.VIRTIO_MSI_NO_VECTOR,
                        "enable": 0, "addr": {}} for _ in range(c.NUM_QUEUES)]

    # --- Backend --------------------------------------------------------------------------

    async def config_read(self, offset, width):
        check_access(offset, width, (1, 2, 4))
        return int.from_bytes(self.config[offset:offset + width], "little")

    async def config_write(self, offset, value, width):
        check_access(offset, width, (1, 2, 4))
        self.config[offset:offset + width] = value.to_bytes(width, "little")

    def bar_size(self, bar):
        return self.params.bar.size if bar == 0 else 0

    async def bar_read(self, bar, offset, width):
        check_access(offset, width)
        self.bar_accesses.append(("r", bar, offset, width))
        common = self.params.bar.common_cfg
        if common <= offset < common + c.VIRTIO_PCI_COMMON_CFG_SIZE:
            return self._common_read(offset - common, width)
        return 0                    # notify, ISR (never raised here), MSI-X: all zero

    async def bar_write(self, bar, offset, value, width):
        check_access(offset, width)
        self.bar_accesses.append(("w", bar, offset, width))
        common = self.params.bar.common_cfg
        if common <= offset < common + c.VIRTIO_PCI_COMMON_CFG_SIZE:
            self._common_write(offset - common, value)
        elif self.params.bar.notify <= offset < self.params.bar.isr:
            self.notifies.append((offset - self.params.bar.notify, value))

    async def bar_read_block(self, bar, offset, length):
        return b"".join([(await self.bar_read(bar, offset + k, 4)).to_bytes(4, "little")
                         for k in range(0, length, 4)])

    def dma_alloc(self, size):
        region = FakeDma(self.next_iova, size)
        self.next_iova += -(-size // 4096) * 4096
        return region

    async def alloc_irq_vectors(self, nvec):
        if self.nomsi:
            return 0
        self.irq_counts = [0] * nvec
        return nvec

    async def wait_irq(self, vector, timeout):
        self.time += timeout
        raise InterruptTimeout(vector, timeout)

    def irq_count(self, vector):
        return self.irq_counts[vector]

    async def request_intx(self):
        raise BackendError("the fake function has no INTx")

    async def wait_intx(self, timeout):
        self.time += timeout
        raise InterruptTimeout(None, timeout)

    async def sleep(self, seconds):
        self.time += seconds

    def now(self):
        return self.time

    # --- common configuration ---------------------------------------------------------------

    def _features_ok(self):
        accepted = self.driver_features[1] << 32 | self.driver_features[0]
        pages = bin(accepted & c.PAGE_SIZE_FEATURE_MASK).count("1")
        return (not self.refuse_features and accepted & ~self.params.offered_features == 0
                and accepted >> c.VIRTIO_F_VERSION_1 & 1 and pages == 1)

    def _common_read(self, off, width):
        """Whole fields only: the driver never reads part of one."""
        q = self.queues[self.queue_select] if self.queue_select < c.NUM_QUEUES else None
        offered = self.params.offered_features
        values = {
            c.VIRTIO_PCI_COMMON_DFSELECT: self.dfselect,
            c.VIRTIO_PCI_COMMON_DF: (offered >> (32 * self.dfselect)) & 0xFFFFFFFF
            if self.dfselect < 2 else 0,
            c.VIRTIO_PCI_COMMON_GFSELECT: self.gfselect,
            c.VIRTIO_PCI_COMMON_GF: self.driver_features[self.gfselect]
            if self.gfselect < 2 else 0,
            c.VIRTIO_PCI_COMMON_MSIX: self.msix_config,
            c.VIRTIO_PCI_COMMON_NUMQ: c.NUM_QUEUES,
            c.VIRTIO_PCI_COMMON_STATUS: self.status,
            c.VIRTIO_PCI_COMMON_CFGGENERATION: 0,
            c.VIRTIO_PCI_COMMON_Q_SELECT: self.queue_select,
            c.VIRTIO_PCI_COMMON_Q_SIZE: q["size"] if q else 0,
            c.VIRTIO_PCI_COMMON_Q_MSIX: q["vector"] if q else c.VIRTIO_MSI_NO_VECTOR,
            c.VIRTIO_PCI_COMMON_Q_ENABLE: q["enable"] if q else 0,
            c.VIRTIO_PCI_COMMON_Q_NOFF: self.queue_select,
        }
        if off in values:
            return values[off]
        return q["addr"].get(off, 0) if q else 0

    def _common_write(self, off, value):
        q = self.queues[self.queue_select] if self.queue_select < c.NUM_QUEUES else None
        if off == c.VIRTIO_PCI_COMMON_DFSELECT:
            self.dfselect = value
        elif off == c.VIRTIO_PCI_COMMON_GFSELECT:
            self.gfselect = value
        elif off == c.VIRTIO_PCI_COMMON_GF and self.gfselect < 2:
            self.driver_features[self.gfselect] = value
        elif off == c.VIRTIO_PCI_COMMON_MSIX:
            self.msix_config = c.VIRTIO_MSI_NO_VECTOR if self.refuse_vectors else value
        elif off == c.VIRTIO_PCI_COMMON_STATUS:
            if value == 0:
                if not self.stuck_reset:
                    self.reset_device()
            else:
                if value & c.VIRTIO_CONFIG_S_FEATURES_OK and not self._features_ok():
                    value &= ~c.VIRTIO_CONFIG_S_FEATURES_OK
                self.status = value
        elif off == c.VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_select = value
        elif q is None:
            return
        elif off == c.VIRTIO_PCI_COMMON_Q_SIZE:
            q["size"] = value
        elif off == c.VIRTIO_PCI_COMMON_Q_MSIX:
            q["vector"] = c.VIRTIO_MSI_NO_VECTOR if self.refuse_vectors else value
        elif off == c.VIRTIO_PCI_COMMON_Q_ENABLE:
            q["enable"] = value
        elif c.VIRTIO_PCI_COMMON_Q_DESCLO <= off <= c.VIRTIO_PCI_COMMON_Q_USEDHI:
            q["addr"][off] = value
