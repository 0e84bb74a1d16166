"""The parts of the VFIO bring-up that need no root and no device: the sysfs checks of
``vfio bind``/``unbind`` on a fake ``/sys`` tree, the IOVA allocator, the driver's
feature choice for a non-memballoon virtio device, and INTx's eventfd with vfio-pci's
masking. The real thing runs in ``tests/test_vm_vfio.py``."""

import asyncio
import errno
import functools
import os
import pathlib

import types

import pytest

from memballoon import backend_vfio, cli, vfio
from memballoon import constants as c
from memballoon import pci_sysfs as ps
from memballoon.backend import BackendError, InterruptTimeout
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


# --- bind/unbind interrupted half-way --------------------------------------------------------

class PciCoreModel:
    """What Linux's PCI core does on the sysfs writes of bind and unbind, on a
    :class:`FakeSysfs` (``driver_override``, ``drivers/X/bind``/``unbind``,
    ``drivers_probe`` with ``native`` as the driver each function would get by itself).
    The write numbered ``fail_at`` raises ``error`` before it takes effect, or just after
    when ``after`` (a Ctrl-C that lands once the kernel did the work)."""

    def __init__(self, sysfs, native, fail_at=None, error=None, after=False):
        self.sysfs, self.native = sysfs, native
        self.fail_at, self.error, self.after = fail_at, error, after
        self.writes = []

    def write(self, path, text):
        index = len(self.writes)
        self.writes.append((os.path.relpath(path, self.sysfs.root), text))
        if index == self.fail_at and not self.after:
            raise self.error
        self._apply(pathlib.Path(os.path.realpath(path)), text.strip())
        if index == self.fail_at and self.after:
            raise self.error

    def _link(self, bdf):
        return self.sysfs.devices / bdf / "driver"

    def _attach(self, bdf, driver):
        if self._link(bdf).is_symlink():
            raise OSError(errno.EBUSY, "device already bound")
        override = (self.sysfs.devices / bdf / "driver_override").read_text().strip()
        if override not in ("(null)", driver) or not (self.sysfs.drivers / driver).is_dir():
            raise OSError(errno.ENODEV, "no such device")
        os.symlink(self.sysfs.drivers / driver, self._link(bdf))

    def _apply(self, path, text):
        if path.name == "driver_override":
            path.write_text(f"{text or '(null)'}\n")
        elif path.name == "unbind":
            link = self._link(text)
            if not link.is_symlink() or os.path.basename(os.readlink(link)) != path.parent.name:
                raise OSError(errno.ENODEV, "no such device")
            link.unlink()
        elif path.name == "bind":
            self._attach(text, path.parent.name)
        elif path.name == "drivers_probe":
            if not self._link(text).is_symlink():
                override = (self.sysfs.devices / text / "driver_override").read_text().strip()
                self._attach(text, self.native[text] if override == "(null)" else override)
        else:
            raise AssertionError(f"write to {path}")


def binding_state(sysfs, tmp_path):
    """What bind/unbind change: (driver_override, driver, records under the state dir)."""
    function = ps.PciFunction(DUT, sysfs.root)
    state = tmp_path / "state"
    records = {p.name: p.read_text() for p in state.iterdir()} if state.exists() else {}
    return function.driver_override, function.driver, records


@pytest.fixture
def kernel(sysfs, tmp_path, monkeypatch):
    """A function natively driven by virtio-pci, vfio-pci loaded, the kernel model in
    place of sysfs writes and /dev/vfio/1 present."""
    for driver in ("virtio-pci", ps.VFIO_DRIVER):
        (sysfs.drivers / driver).mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "1").write_text("")
    model = PciCoreModel(sysfs, {DUT: "virtio-pci"})
    monkeypatch.setattr(ps, "sysfs_write", model.write)
    return model


def bind_with_model(sysfs, tmp_path):
    return ps.vfio_bind(DUT, sysfs=sysfs.root, state_dir=tmp_path / "state",
                        vfio_dev=tmp_path / "dev")


def unbind_with_model(sysfs, tmp_path):
    return ps.vfio_unbind(DUT, sysfs=sysfs.root, state_dir=tmp_path / "state",
                          vfio_dev=tmp_path / "dev")


def on_vfio(sysfs, tmp_path, record):
    """The function as ``vfio bind`` leaves it; ``record`` the previous driver's name."""
    sysfs.add(DUT, driver=ps.VFIO_DRIVER)
    (sysfs.devices / DUT / "driver_override").write_text(f"{ps.VFIO_DRIVER}\n")
    if record is not None:
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / f"{DUT}.driver").write_text(record)


@pytest.mark.parametrize("previous", ["virtio-pci", None])
def test_bind_and_unbind_on_the_kernel_model(sysfs, tmp_path, kernel, previous):
    sysfs.add(DUT, driver=previous)
    start = binding_state(sysfs, tmp_path)
    assert bind_with_model(sysfs, tmp_path) == previous
    assert binding_state(sysfs, tmp_path) == (
        ps.VFIO_DRIVER, ps.VFIO_DRIVER, {f"{DUT}.driver": previous or ""})
    assert len(kernel.writes) == (3 if previous else 2)
    assert unbind_with_model(sysfs, tmp_path) == previous
    assert binding_state(sysfs, tmp_path) == start


BIND_STEPS = [("virtio-pci", 0), ("virtio-pci", 1), ("virtio-pci", 2), (None, 0), (None, 1)]
#: Made anew for each test: the restore adds its note to the exception.
ERRORS = [KeyboardInterrupt, lambda: OSError(errno.EIO, "Input/output error")]


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("error", ERRORS, ids=["ctrl-c", "eio"])
@pytest.mark.parametrize("previous, step", BIND_STEPS)
def test_bind_failing_at_each_write_leaves_the_function_as_it_was(
        sysfs, tmp_path, kernel, previous, step, error, after):
    """No half-bound function, whichever sysfs write of bind is cut short, before or
    after the kernel acted on it."""
    sysfs.add(DUT, driver=previous)
    start = binding_state(sysfs, tmp_path)
    kernel.fail_at, kernel.error, kernel.after = step, error(), after
    with pytest.raises(type(kernel.error)) as info:
        bind_with_model(sysfs, tmp_path)
    assert len(kernel.writes) > step                    # the failure was injected
    assert binding_state(sysfs, tmp_path) == start
    assert info.value.__notes__ == [f"{DUT} restored: driver {previous or 'none'}, "
                                    f"driver_override unset"]


UNBIND_STEPS = [("virtio-pci", 0), ("virtio-pci", 1), ("virtio-pci", 2), (None, 0),
                (None, 1), (None, 2)]


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("error", ERRORS, ids=["ctrl-c", "eio"])
@pytest.mark.parametrize("record, step", UNBIND_STEPS)
def test_unbind_failing_at_each_write_leaves_the_function_on_vfio(
        sysfs, tmp_path, kernel, record, step, error, after):
    on_vfio(sysfs, tmp_path, record)
    start = binding_state(sysfs, tmp_path)
    kernel.fail_at, kernel.error, kernel.after = step, error(), after
    with pytest.raises(type(kernel.error)):
        unbind_with_model(sysfs, tmp_path)
    assert len(kernel.writes) > step
    assert binding_state(sysfs, tmp_path) == start


def test_bind_without_the_group_file_gives_the_function_back(sysfs, tmp_path, kernel):
    sysfs.add(DUT, driver="virtio-pci")
    (tmp_path / "dev" / "1").unlink()
    with pytest.raises(ps.NoIommu, match="missing after binding"):
        bind_with_model(sysfs, tmp_path)
    assert binding_state(sysfs, tmp_path) == (None, "virtio-pci", {})


def test_a_restore_step_that_fails_is_named_and_the_others_still_run(sysfs, tmp_path, kernel):
    """The driver that refuses the function back does not stop the record's removal."""
    sysfs.add(DUT, driver="virtio-pci")
    kernel.fail_at, kernel.error, kernel.after = 2, KeyboardInterrupt(), True

    def refuse_virtio_pci(bdf, driver, attach=kernel._attach):
        if driver == "virtio-pci":
            raise OSError(errno.ENODEV, "No such device")
        attach(bdf, driver)
    kernel._attach = refuse_virtio_pci
    with pytest.raises(KeyboardInterrupt) as info:
        bind_with_model(sysfs, tmp_path)
    assert binding_state(sysfs, tmp_path) == (None, None, {})
    assert info.value.__notes__ == [
        f"{DUT} NOT fully restored, failed: bind to virtio-pci ([Errno 19] No such device); "
        f"check {sysfs.devices / DUT}"]


@pytest.mark.parametrize("error, status, line", [
    (KeyboardInterrupt, 130, f"memballoon: interrupted; {DUT} restored: driver virtio-pci, "
                               f"driver_override unset\n"),
    (ERRORS[1], 1,
     f"memballoon: error: [Errno 5] Input/output error; {DUT} restored: driver virtio-pci, "
     f"driver_override unset\n")])
def test_cli_bind_cut_short_is_one_line(sysfs, tmp_path, kernel, capsys, monkeypatch,
                                        error, status, line):
    sysfs.add(DUT, driver="virtio-pci")
    monkeypatch.setattr(cli, "vfio_bind", functools.partial(
        ps.vfio_bind, sysfs=sysfs.root, state_dir=tmp_path / "state", vfio_dev=tmp_path / "dev"))
    kernel.fail_at, kernel.error = 1, error()
    assert cli.main(["vfio", "bind", DUT]) == status
    assert capsys.readouterr() == ("", line)
    assert binding_state(sysfs, tmp_path) == (None, "virtio-pci", {})


# --- the backend released on Ctrl-C, wherever it lands -----------------------------------------

class RecordedVfio:
    """Stands in for :mod:`memballoon.vfio` (container, group, device) and for the backend's
    ``munmap``: every call is logged, and the ``nth`` call named ``fail_at`` raises
    KeyboardInterrupt. The device fd is a real file holding a configuration space."""

    def __init__(self, config_path, fail_at=None, nth=1):
        self.config_path = config_path
        self.fail_at, self.nth = fail_at, nth
        self.log = []
        self.failed = None
        self.device_fd = None

    def call(self, name, *args):
        self.log.append(" ".join([name, *(hex(arg) for arg in args)]))
        if name == self.fail_at and [e.split()[0] for e in self.log].count(name) == self.nth:
            self.failed = len(self.log) - 1
            raise KeyboardInterrupt

    def install(self, monkeypatch):
        """Put the fakes in place of the real layer."""
        rec, libc = self, backend_vfio._libc

        class Container:
            def __init__(self):
                rec.call("container")

            def set_iommu(self):
                rec.call("set_iommu")

            def iova_ranges(self):
                return None

            def map_dma(self, vaddr, iova, size):
                rec.call("map_dma", iova)

            def unmap_dma(self, iova, size):
                rec.call("unmap_dma", iova)

            def close(self):
                rec.call("container.close")

        class Group:
            def __init__(self, number):
                rec.call("group")

            def status(self):
                return vfio.VFIO_GROUP_FLAGS_VIABLE

            def set_container(self, container):
                rec.call("set_container")

            def device_fd(self, bdf):
                rec.call("device_fd")
                rec.device_fd = os.open(rec.config_path, os.O_RDWR)
                return rec.device_fd

            def close(self):
                rec.call("group.close")

        class Device:
            flags = vfio.VFIO_DEVICE_FLAGS_RESET

            def __init__(self, fd):
                rec.call("device")
                self.fd = fd

            def region_info(self, index):
                rec.call("region_info")
                return types.SimpleNamespace(offset=0, size=0, flags=0)

            def irq_info(self, index):
                rec.call("irq_info")
                return types.SimpleNamespace(count=0)

            def reset(self):
                rec.call("reset")

            def close(self):
                rec.call("device.close")
                os.close(self.fd)

        class Libc:
            mmap = libc.mmap

            @staticmethod
            def munmap(addr, size):
                rec.call("munmap")
                return libc.munmap(addr, size)

        for name, fake in (("VfioContainer", Container), ("VfioGroup", Group),
                           ("VfioDevice", Device)):
            monkeypatch.setattr(vfio, name, fake)
        monkeypatch.setattr(backend_vfio, "_libc", Libc)

    def check_released(self):
        """Each fd opened was closed once, device before group before container; every
        IOMMU mapping made was unmapped, after the reset and before the fds close."""
        opened = [e for i, e in enumerate(self.log)
                  if e in ("container", "group", "device") and i != self.failed]
        closes = [e for e in self.log if e.endswith(".close")]
        assert closes == [f"{e}.close" for e in reversed(opened)]
        if self.device_fd is not None:
            with pytest.raises(OSError):
                os.fstat(self.device_fd)
        mapped = [e.split()[1] for e in self.log if e.startswith("map_dma")]
        if self.fail_at == "map_dma":
            mapped.pop()                # the interrupted MAP_DMA never took effect
        unmaps = [i for i, e in enumerate(self.log) if e.startswith("unmap_dma")]
        assert [self.log[i].split()[1] for i in unmaps] == mapped
        if "device.close" in closes:
            assert self.log.index("reset") < min(unmaps, default=len(self.log))
            assert max(unmaps, default=-1) < self.log.index("device.close")


@pytest.fixture
def recorded_vfio(sysfs, tmp_path, monkeypatch):
    """A function on vfio-pci in the fake sysfs and the recorded VFIO layer; set
    ``fail_at``/``nth`` before opening."""
    sysfs.add(DUT, driver=ps.VFIO_DRIVER)
    config = tmp_path / "config"
    config.write_bytes(bytes(256))
    rec = RecordedVfio(config)
    rec.install(monkeypatch)
    return rec


def open_and_map(rec, sysfs):
    """Open the backend and allocate DMA memory over three chunks, as a driver run does."""
    with VfioBackend.open(DUT, sysfs=sysfs.root) as backend:
        backend.dma_alloc(4096)
        backend.dma_alloc(2 * backend_vfio.DMA_CHUNK)
        backend.dma_alloc(backend_vfio.DMA_CHUNK)


@pytest.mark.parametrize("fail_at, nth", [
    ("container", 1), ("group", 1), ("set_container", 1), ("set_iommu", 1), ("device_fd", 1),
    ("device", 1), ("region_info", 1), ("region_info", 4), ("irq_info", 1), ("map_dma", 1),
    ("map_dma", 2), ("map_dma", 3)])
def test_ctrl_c_during_open_or_dma_setup_releases_everything(recorded_vfio, sysfs,
                                                             fail_at, nth):
    """Wherever the Ctrl-C lands between the first open and the last DMA mapping."""
    recorded_vfio.fail_at, recorded_vfio.nth = fail_at, nth
    with pytest.raises(KeyboardInterrupt):
        open_and_map(recorded_vfio, sysfs)
    assert [e.split()[0] for e in recorded_vfio.log].count(fail_at) == nth
    recorded_vfio.check_released()


def test_a_run_without_interruption_releases_everything(recorded_vfio, sysfs):
    open_and_map(recorded_vfio, sysfs)
    chunks = [IOVA_BASE, IOVA_BASE + 0x20_0000, IOVA_BASE + 0x60_0000]
    assert [e for e in recorded_vfio.log if e.startswith("map_dma")] == [
        f"map_dma {iova:#x}" for iova in chunks]
    release = recorded_vfio.log[recorded_vfio.log.index("reset"):]
    assert release == ["reset", *[e for iova in chunks for e in (f"unmap_dma {iova:#x}",
                                                                 "munmap")],
                       "device.close", "group.close", "container.close"]
    recorded_vfio.check_released()


# --- INTx over VFIO_PCI_INTX_IRQ_INDEX ------------------------------------------------------

class IntxDevice:
    """vfio-pci's INTx as the backend sees it: one eventfd, signalled when the line is
    asserted and not masked; each signal masks it (vfio-pci's automasking of a level
    interrupt) until ``VFIO_IRQ_SET_ACTION_UNMASK``, which signals again at once while
    the line is still asserted."""

    def __init__(self, count=1):
        self.count = count
        self.fd = None
        self.line = self.masked = False
        self.log = []

    def irq_info(self, index):
        return types.SimpleNamespace(count=self.count if index == vfio.VFIO_PCI_INTX_IRQ_INDEX
                                     else 0)

    def set_irq_eventfds(self, index, eventfds):
        self.log.append(("set", index, len(eventfds)))
        self.fd = eventfds[0] if eventfds else None

    def unmask_irq(self, index):
        self.log.append(("unmask", index))
        self.masked = False
        self.fire()

    def fire(self):
        if self.line and not self.masked and self.fd is not None:
            self.masked = True
            os.eventfd_write(self.fd, 1)


def test_intx_is_unmasked_by_the_next_wait():
    """An interrupt is returned once; the following wait unmasks INTx first, so a line the
    driver did not clear fires again at once and a cleared one stays quiet."""
    device = IntxDevice()

    async def run():
        backend = VfioBackend(DUT)
        backend.device = device
        await backend.request_intx()
        assert device.log == [("set", vfio.VFIO_PCI_INTX_IRQ_INDEX, 1)]
        with pytest.raises(InterruptTimeout, match="no INTx interrupt"):
            await backend.wait_intx(0.01)
        device.line = True
        device.fire()
        await backend.wait_intx(1)
        await backend.wait_intx(1)              # not cleared: fires again after the unmask
        device.line = False                     # the driver's ISR read
        with pytest.raises(InterruptTimeout):
            await backend.wait_intx(0.01)
        assert device.log.count(("unmask", vfio.VFIO_PCI_INTX_IRQ_INDEX)) == 2
        fd = device.fd
        backend._free_irqs()
        assert device.log[-1] == ("set", vfio.VFIO_PCI_INTX_IRQ_INDEX, 0)
        with pytest.raises(OSError):
            os.fstat(fd)
    asyncio.run(run())


def test_no_intx_and_no_msi():
    """A function without INTx refuses request_intx; ``nomsi`` gives no vectors."""
    async def run():
        backend = VfioBackend(DUT)
        backend.device = IntxDevice(count=0)
        with pytest.raises(BackendError, match="has no INTx"):
            await backend.request_intx()
        with pytest.raises(BackendError, match="not requested"):
            await backend.wait_intx(0.01)
        backend.nomsi = True
        backend.msix_count = 3
        assert await backend.alloc_irq_vectors(3) == 0
    asyncio.run(run())
