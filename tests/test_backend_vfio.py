"""The parts of the VFIO bring-up that need no root and no device: the sysfs checks of
``vfio bind``/``unbind`` on a fake ``/sys`` tree, the IOVA allocator, and the driver's
feature choice for a non-memballoon virtio device. The real thing runs in
``tests/test_vm_vfio.py``."""

import os

import pytest

from memballoon import constants as c
from memballoon import pci_sysfs as ps
from memballoon.backend import BackendError
from memballoon.backend_vfio import IOVA_BASE, IovaAllocator, VfioBackend
from memballoon.virtio_pci_modern import TRANSPORT_FEATURES, VirtioError, VirtioPciModernDevice

DUT = "0000:01:00.0"


class FakeSysfs:
    """A ``/sys`` with PCI functions, drivers and IOMMU groups, as symlinks like Linux's."""

    def __init__(self, root):
        self.root = root
        self.devices = root / "bus" / "pci" / "devices"
        self.drivers = root / "bus" / "pci" / "drivers"
        self.devices.mkdir(parents=True)
        self.drivers.mkdir(parents=True)
        (root / "bus" / "pci" / "drivers_probe").write_text("")

    def add(self, bdf, vendor=c.PCI_VENDOR_ID_REDHAT_QUMRANET, device=c.MEMBALLOON_PCI_DEVICE_ID,
            driver=None, group=1, header_type=0):
        path = self.devices / bdf
        path.mkdir()
        (path / "vendor").write_text(f"{vendor:#06x}\n")
        (path / "device").write_text(f"{device:#06x}\n")
        config = bytearray(256)
        config[ps.PCI_HEADER_TYPE] = header_type
        (path / "config").write_bytes(bytes(config))
        (path / "driver_override").write_text("(null)\n")
        if driver:
            (self.drivers / driver).mkdir(exist_ok=True)
            os.symlink(self.drivers / driver, path / "driver")
        if group is not None:
            members = self.root / "kernel" / "iommu_groups" / str(group) / "devices"
            members.mkdir(parents=True, exist_ok=True)
            os.symlink(path, members / bdf)
            os.symlink(members.parent, path / "iommu_group")
        return path


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return FakeSysfs(tmp_path / "sys")


def bind(sysfs, tmp_path, bdf=DUT, any_virtio=False):
    return ps.vfio_bind(bdf, any_virtio, sysfs=sysfs.root, state_dir=tmp_path / "state")


def test_bind_refuses_a_missing_function(sysfs, tmp_path):
    with pytest.raises(ps.NoSuchDevice, match="no PCI function 0000:01:00.0"):
        bind(sysfs, tmp_path)


@pytest.mark.parametrize("vendor, device, any_virtio", [
    (c.PCI_VENDOR_ID_REDHAT_QUMRANET, 0x1044, False),      # virtio-rng, not a memballoon
    (0x8086, 0x1234, True),                                # not virtio at all
    (c.PCI_VENDOR_ID_REDHAT_QUMRANET, 0x1000, True),       # transitional, not modern
])
def test_bind_refuses_other_ids(sysfs, tmp_path, vendor, device, any_virtio):
    sysfs.add(DUT, vendor, device, driver="virtio-pci")
    with pytest.raises(ps.WrongDevice, match=f"is {vendor:04x}:{device:04x}, not"):
        bind(sysfs, tmp_path, any_virtio=any_virtio)
    assert (sysfs.devices / DUT / "driver_override").read_text() == "(null)\n"


def test_bind_refuses_without_iommu(sysfs, tmp_path):
    sysfs.add(DUT, group=None)
    with pytest.raises(ps.NoIommu, match="intel_iommu=on"):
        bind(sysfs, tmp_path)


def test_bind_refuses_a_group_with_a_foreign_member(sysfs, tmp_path):
    sysfs.add(DUT)
    sysfs.add("0000:01:00.1", 0x8086, 0x10D3, driver="e1000e")
    sysfs.add("0000:01:00.2", driver="vfio-pci")
    sysfs.add("0000:01:00.3", driver="pci-stub")
    sysfs.add("0000:00:01.0", 0x8086, 0x1901, driver="pcieport", header_type=0x81)
    with pytest.raises(ps.GroupNotViable) as info:
        bind(sysfs, tmp_path)
    assert str(info.value) == ("IOMMU group 1 of 0000:01:00.0 is not viable: 0000:01:00.1 "
                               "(bound to e1000e); unbind it or bind it to vfio-pci too")


def test_bind_accepts_a_function_already_on_vfio(sysfs, tmp_path):
    sysfs.add(DUT, driver="vfio-pci")
    sysfs.add("0000:00:01.0", 0x8086, 0x1901, driver="pcieport", header_type=0x01)
    assert bind(sysfs, tmp_path) == "vfio-pci"
    assert (sysfs.devices / DUT / "driver_override").read_text() == "(null)\n"


def test_unbind_gives_the_function_back_to_its_previous_driver(sysfs, tmp_path):
    sysfs.add(DUT, driver="vfio-pci")
    (sysfs.drivers / "virtio-pci").mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / f"{DUT}.driver").write_text("virtio-pci")
    ps.vfio_unbind(DUT, sysfs=sysfs.root, state_dir=state, vfio_dev=tmp_path / "dev")
    assert (sysfs.drivers / "vfio-pci" / "unbind").read_text() == DUT
    assert (sysfs.devices / DUT / "driver_override").read_text() == "\n"
    assert (sysfs.drivers / "virtio-pci" / "bind").read_text() == DUT
    assert not (state / f"{DUT}.driver").exists()


def test_unbind_without_a_record_lets_the_kernel_choose(sysfs, tmp_path):
    sysfs.add(DUT, driver="vfio-pci")
    ps.vfio_unbind(DUT, sysfs=sysfs.root, state_dir=tmp_path / "state",
                   vfio_dev=tmp_path / "dev")
    assert (sysfs.root / "bus" / "pci" / "drivers_probe").read_text() == DUT


def test_root_is_required(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for call in (lambda: ps.vfio_bind(DUT), lambda: ps.vfio_unbind(DUT),
                 lambda: VfioBackend.open(DUT)):
        with pytest.raises(ps.NotRoot, match="must run as root"):
            call()


def test_open_refuses_a_function_not_on_vfio(sysfs):
    sysfs.add(DUT, driver="virtio-pci")
    with pytest.raises(ps.NotBoundToVfio, match="bound to virtio-pci, not vfio-pci"):
        VfioBackend.open(DUT, sysfs=sysfs.root)


@pytest.mark.parametrize("text, bdf", [("0000:01:00.0", "0000:01:00.0"),
                                       ("01:1f.7", "0000:01:1f.7"),
                                       ("ABCD:FF:1F.7", "abcd:ff:1f.7")])
def test_parse_bdf(text, bdf):
    assert ps.parse_bdf(text) == bdf


@pytest.mark.parametrize("text", ["", "01:00", "0000:01:20.0", "0000:01:00.8", "1:2:3:4.0",
                                  "00000:01:00.0", "0000:01:00.00", "zz:00.0"])
def test_parse_bdf_rejects(text):
    with pytest.raises(ValueError, match="is not a PCI address"):
        ps.parse_bdf(text)


def test_iova_allocator_prefers_4g_and_skips_reserved_ranges():
    msi = (0xFEE0_0000, 0xFEEF_FFFF)
    iova = IovaAllocator([(msi[1] + 1, (1 << 39) - 1), (0, msi[0] - 1)])
    assert iova.alloc(0x20_0000, 0x20_0000) == IOVA_BASE
    assert iova.alloc(0x1000, 0x1000) == IOVA_BASE + 0x20_0000
    assert iova.alloc(0x20_0000, 0x20_0000) == IOVA_BASE + 0x40_0000


def test_iova_allocator_below_4g_and_exhausted():
    iova = IovaAllocator([(0x10_0000, 0x2F_FFFF)])
    assert iova.alloc(0x10_0000, 0x10_0000) == 0x10_0000
    assert iova.alloc(0x10_0000, 0x10_0000) == 0x20_0000
    with pytest.raises(BackendError, match="no IOVA space left"):
        iova.alloc(0x1000, 0x1000)


def test_a_non_balloon_device_gets_only_transport_features():
    vdev = VirtioPciModernDevice(backend=None, device_id=c.VIRTIO_ID_ENTROPY)
    unknown = 1 << 24 | 1 << c.VIRTIO_F_RING_PACKED | 1 << c.VIRTIO_MEMBALLOON_F_4K
    offered = TRANSPORT_FEATURES | unknown
    assert vdev.choose_features(offered) == TRANSPORT_FEATURES
    wanted = TRANSPORT_FEATURES & ~(1 << c.VIRTIO_F_INDIRECT_DESC)
    assert vdev.choose_features(offered, wanted=wanted) == wanted
    with pytest.raises(VirtioError, match="page size is a memballoon feature"):
        vdev.choose_features(offered, page_size=4096)
