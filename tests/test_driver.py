"""Driver model (sw/virtio_pci_modern.py) against the in-memory fake function: the init
sequence and every error it must report clearly."""

import asyncio

import pytest
from fake_virtio import CAP_POS, FakeVirtioBackend

from memballoon.constants import vring_avail_size, vring_desc_size, vring_used_size
from memballoon import constants as c
from memballoon.params import DeviceParams
from memballoon.virtio_pci_modern import (DeviceTimeout, FeaturesNotAccepted, ProbeError,
                                          VectorNotAccepted, VirtioError,
                                          VirtioPciModernDevice)


def run(coro):
    return asyncio.run(coro)


def test_probe_finds_capabilities_and_maps_structures():
    be = FakeVirtioBackend()
    vdev = VirtioPciModernDevice(be)
    run(vdev.vp_modern_probe())
    bar = be.params.bar
    assert vdev.id_device == c.VIRTIO_ID_MEMORY_BALLOON
    assert vdev.id_vendor == c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID
    assert (vdev.common.bar, vdev.common.offset) == (0, bar.common_cfg)
    assert vdev.common.length == c.VIRTIO_PCI_COMMON_CFG_SIZE
    assert (vdev.isr.offset, vdev.isr.length) == (bar.isr, 1)
    assert vdev.notify_base.offset == bar.notify
    assert vdev.notify_offset_multiplier == bar.notify_off_multiplier
    assert vdev.pci_cfg.pos == CAP_POS[c.VIRTIO_PCI_CAP_PCI_CFG]
    assert vdev.device is None
    assert vdev.modern_bars == 1


def test_capability_walk_and_find_next():
    be = FakeVirtioBackend()
    vdev = VirtioPciModernDevice(be)
    caps = run(vdev.capabilities())
    assert caps == [(c.PCI_CAP_ID_VNDR, pos) for pos in CAP_POS.values()]
    first = run(vdev.find_capability(c.PCI_CAP_ID_VNDR))
    assert first == CAP_POS[c.VIRTIO_PCI_CAP_COMMON_CFG]
    assert run(vdev.find_capability(c.PCI_CAP_ID_VNDR, first)) == \
        CAP_POS[c.VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert run(vdev.find_capability(c.PCI_CAP_ID_MSIX)) is None


def test_capability_loop_is_detected():
    be = FakeVirtioBackend()
    last = CAP_POS[c.VIRTIO_PCI_CAP_PCI_CFG]
    be.config[last + 1] = CAP_POS[c.VIRTIO_PCI_CAP_COMMON_CFG]
    with pytest.raises(ProbeError, match="loop"):
        run(VirtioPciModernDevice(be).capabilities())


@pytest.mark.parametrize("device_id, match", [
    (0x1000 + 0x80 + 13, "outside the virtio range"),
    (c.VIRTIO_PCI_MODERN_DEVICE_ID_BASE + 1, "virtio device ID 1"),
])
def test_probe_rejects_other_devices(device_id, match):
    with pytest.raises(ProbeError, match=match):
        run(VirtioPciModernDevice(FakeVirtioBackend(device_id=device_id)).vp_modern_probe())


def test_probe_rejects_structure_outside_bar():
    be = FakeVirtioBackend()
    pos = CAP_POS[c.VIRTIO_PCI_CAP_ISR_CFG]
    be.config[pos + c.VIRTIO_PCI_CAP_OFFSET:pos + c.VIRTIO_PCI_CAP_OFFSET + 4] = \
        be.params.bar.size.to_bytes(4, "little")
    with pytest.raises(ProbeError, match="outside BAR0"):
        run(VirtioPciModernDevice(be).vp_modern_probe())


def test_probe_requires_common_cfg():
    be = FakeVirtioBackend()
    be.config[CAP_POS[c.VIRTIO_PCI_CAP_COMMON_CFG] + c.VIRTIO_PCI_CAP_CFG_TYPE] = \
        c.VIRTIO_PCI_CAP_DEVICE_CFG
    with pytest.raises(ProbeError, match="COMMON_CFG"):
        run(VirtioPciModernDevice(be).vp_modern_probe())


def test_init_reaches_driver_ok_with_one_page_size():
    be = FakeVirtioBackend()
    vdev = VirtioPciModernDevice(be)
    queues = run(vdev.init())
    status = be.status
    assert status == (c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER |
                      c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)
    accepted = vdev.accepted_features
    assert accepted & c.PAGE_SIZE_FEATURE_MASK == 1 << c.VIRTIO_MEMBALLOON_F_4K
    assert accepted == be.params.offered_features & ~c.PAGE_SIZE_FEATURE_MASK | \
        1 << c.VIRTIO_MEMBALLOON_F_4K
    assert be.msix_config == 0
    assert [q.index for q in queues] == [c.FROMDEVQ, c.TODEVQ]
    for q, state in zip(queues, be.queues):
        n = be.params.max_queue_size
        assert q.num == n and q.vector == q.index + 1
        assert state["enable"] == 1 and state["vector"] == q.index + 1
        assert q.desc_addr % 16 == 0 and q.avail_addr % 2 == 0 and q.used_addr % 4 == 0
        assert q.avail_addr >= q.desc_addr + vring_desc_size(n)
        assert q.used_addr >= q.avail_addr + vring_avail_size(n)
        assert q.used_addr + vring_used_size(n) <= q.ring.iova + q.ring.size
        assert state["addr"][c.VIRTIO_PCI_COMMON_Q_DESCLO] == q.desc_addr & 0xFFFFFFFF
        assert state["addr"][c.VIRTIO_PCI_COMMON_Q_USEDHI] == q.used_addr >> 32
        assert q.notify.offset == be.params.bar.notify + \
            q.index * be.params.bar.notify_off_multiplier


def test_init_with_requested_page_size_and_queue_size():
    be = FakeVirtioBackend()
    vdev = VirtioPciModernDevice(be)
    queues = run(vdev.init(page_size=2 << 20, queue_size=16))
    assert vdev.accepted_features & c.PAGE_SIZE_FEATURE_MASK == 1 << c.VIRTIO_MEMBALLOON_F_2M
    assert [q.num for q in queues] == [16, 16]


def test_init_rejects_unoffered_page_size():
    vdev = VirtioPciModernDevice(FakeVirtioBackend(DeviceParams(page_size_bits=(1,))))
    with pytest.raises(VirtioError, match="page size 2M not offered"):
        run(vdev.init(page_size=2 << 20))


def test_features_refused_sets_failed_and_raises():
    be = FakeVirtioBackend(refuse_features=True)
    with pytest.raises(FeaturesNotAccepted, match="device refused features") as exc:
        run(VirtioPciModernDevice(be).init())
    assert not exc.value.status & c.VIRTIO_CONFIG_S_FEATURES_OK
    assert be.status & c.VIRTIO_CONFIG_S_FAILED


def test_vector_refused_raises():
    with pytest.raises(VectorNotAccepted, match="msix_config: wrote MSI-X vector 0x0000, "
                                                "read back 0xffff"):
        run(VirtioPciModernDevice(FakeVirtioBackend(refuse_vectors=True)).init())


def test_no_msix_and_no_interrupt_pin_gives_up():
    """vp_find_vqs: without MSI-X vectors the driver falls back to INTx, and gives up on
    a function whose interrupt pin reads 0 (the fake has none)."""
    be = FakeVirtioBackend()
    be.nomsi = True
    with pytest.raises(VirtioError, match="no MSI-X vectors, and no INTx"):
        run(VirtioPciModernDevice(be).init())


def test_reset_timeout_raises():
    be = FakeVirtioBackend(stuck_reset=True)
    vdev = VirtioPciModernDevice(be)
    run(vdev.vp_modern_probe())
    be.status = c.VIRTIO_CONFIG_S_ACKNOWLEDGE
    with pytest.raises(DeviceTimeout, match="still reads 0x01"):
        run(vdev.vp_modern_reset(timeout=10e-6))
    assert be.time >= 10e-6


def test_notify_writes_queue_index():
    be = FakeVirtioBackend()
    vdev = VirtioPciModernDevice(be)
    queues = run(vdev.init())
    for q in queues:
        run(vdev.vp_notify(q.notify, q.index))
    mult = be.params.bar.notify_off_multiplier
    assert be.notifies == [(q.index * mult, q.index) for q in queues]


def test_pci_cfg_select_rejects_unaligned():
    vdev = VirtioPciModernDevice(FakeVirtioBackend())
    run(vdev.vp_modern_probe())
    with pytest.raises(VirtioError, match="aligned"):
        run(vdev.vp_pci_cfg_read(0, 2, 4))
