"""A PCI function as Linux's sysfs shows it, and handing it to vfio-pci and back.

:func:`vfio_bind` checks, in this order, every condition that makes a VFIO bring-up fail
later with a confusing message, and raises a :class:`SetupError` subclass whose text is
one line a person can act on: root, the function exists, its IDs, an IOMMU group, the
group is viable (each other member unbound, bound to vfio-pci or pci-stub, or a bridge:
the kernel's own rule), vfio-pci loaded. Then ``driver_override`` and a rebind, as
``Documentation/driver-api/vfio.rst`` describes. The previous driver is remembered under
``/run/memballoon`` so :func:`vfio_unbind` gives the function back to it.

``sysfs``, ``state_dir`` and ``vfio_dev`` are parameters so the checks can be tested on a
fake tree.
"""

import errno
import os
import pathlib
import subprocess

from . import constants as c
from .backend import BackendError

__all__ = ["PciFunction", "SetupError", "NotRoot", "NoSuchDevice", "WrongDevice", "NoIommu",
           "GroupNotViable", "NotBoundToVfio", "DeviceBusy", "BarMissing", "vfio_bind",
           "vfio_unbind", "check_ids", "parse_bdf"]

VFIO_DRIVER = "vfio-pci"
#: Drivers the kernel accepts on the other members of a group used through VFIO.
VIABLE_DRIVERS = (VFIO_DRIVER, "pci-stub")
STATE_DIR = "/run/memballoon"
PCI_HEADER_TYPE = 0x0E
PCI_HEADER_TYPE_MASK = 0x7F
PCI_HEADER_TYPE_NORMAL = 0


class SetupError(BackendError):
    """The function cannot be used through VFIO; the message says why and what to do."""


class NotRoot(SetupError):
    pass


class NoSuchDevice(SetupError):
    pass


class WrongDevice(SetupError):
    pass


class NoIommu(SetupError):
    pass


class GroupNotViable(SetupError):
    pass


class NotBoundToVfio(SetupError):
    pass


class DeviceBusy(SetupError):
    pass


class BarMissing(SetupError):
    pass


def parse_bdf(text):
    """``0000:01:00.0`` or ``01:00.0`` -> canonical ``dddd:bb:dd.f``; ValueError otherwise."""
    parts = text.split(":")
    if len(parts) == 2:
        parts = ["0000", *parts]
    try:
        domain, bus, rest = parts
        slot, function = rest.split(".")
        values = int(domain, 16), int(bus, 16), int(slot, 16), int(function, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a PCI address like 0000:01:00.0") from None
    if not (values[0] <= 0xFFFF and values[1] <= 0xFF and values[2] <= 0x1F
            and values[3] <= 7 and len(domain) <= 4 and len(bus) <= 2 and len(slot) <= 2
            and len(function) == 1):
        raise ValueError(f"{text!r} is not a PCI address like 0000:01:00.0")
    return "%04x:%02x:%02x.%x" % values


def require_root():
    if os.geteuid() != 0:
        raise NotRoot("must run as root (VFIO and sysfs binding need it): use sudo")


class PciFunction:
    """``/sys/bus/pci/devices/<bdf>``."""

    def __init__(self, bdf, sysfs="/sys"):
        self.bdf = bdf
        self.sysfs = pathlib.Path(sysfs)
        self.path = self.sysfs / "bus" / "pci" / "devices" / bdf
        if not self.path.exists():
            raise NoSuchDevice(f"no PCI function {bdf} (see lspci -D)")

    def _read(self, name):
        return (self.path / name).read_text().strip()

    @property
    def vendor(self):
        return int(self._read("vendor"), 16)

    @property
    def device(self):
        return int(self._read("device"), 16)

    @property
    def driver(self):
        """Name of the bound driver, or None."""
        link = self.path / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    @property
    def is_bridge(self):
        header = (self.path / "config").read_bytes()[PCI_HEADER_TYPE]
        return header & PCI_HEADER_TYPE_MASK != PCI_HEADER_TYPE_NORMAL

    @property
    def iommu_group(self):
        """The IOMMU group number; :class:`NoIommu` when the function has none."""
        link = self.path / "iommu_group"
        if not link.is_symlink():
            raise NoIommu(f"{self.bdf} has no IOMMU group: enable VT-d/AMD-Vi (IOMMU) in "
                          f"the firmware and boot with intel_iommu=on or amd_iommu=on")
        return int(os.path.basename(os.readlink(link)))

    def group_members(self):
        """The other functions in the same IOMMU group."""
        devices = self.sysfs / "kernel" / "iommu_groups" / str(self.iommu_group) / "devices"
        return [PciFunction(entry.name, self.sysfs) for entry in sorted(devices.iterdir())
                if entry.name != self.bdf]

    def check_group_viable(self):
        """Raise :class:`GroupNotViable` unless every other member may stay as it is."""
        foreign = [f"{m.bdf} (bound to {m.driver})" for m in self.group_members()
                   if m.driver not in (None, *VIABLE_DRIVERS) and not m.is_bridge]
        if foreign:
            raise GroupNotViable(
                f"IOMMU group {self.iommu_group} of {self.bdf} is not viable: "
                f"{', '.join(foreign)}; unbind it or bind it to vfio-pci too")

    def write(self, name, text):
        (self.path / name).write_text(text)


def check_ids(function, any_virtio):
    """The memballoon IDs (C1), or with ``any_virtio`` any modern virtio function."""
    vendor, device = function.vendor, function.device
    if any_virtio:
        if vendor == c.PCI_VENDOR_ID_REDHAT_QUMRANET and \
                c.VIRTIO_PCI_MODERN_DEVICE_ID_BASE <= device <= c.VIRTIO_PCI_DEVICE_ID_MAX:
            return
        wanted = "a modern virtio function (1af4:1040..107f)"
    else:
        if (vendor, device) == (c.PCI_VENDOR_ID_REDHAT_QUMRANET, c.MEMBALLOON_PCI_DEVICE_ID):
            return
        wanted = (f"memballoon {c.PCI_VENDOR_ID_REDHAT_QUMRANET:04x}:"
                  f"{c.MEMBALLOON_PCI_DEVICE_ID:04x} (--any-virtio for other virtio devices)")
    raise WrongDevice(f"{function.bdf} is {vendor:04x}:{device:04x}, not {wanted}")


def _state_file(state_dir, bdf):
    return pathlib.Path(state_dir) / f"{bdf}.driver"


def _ensure_vfio_pci(sysfs):
    drivers = pathlib.Path(sysfs) / "bus" / "pci" / "drivers"
    if not (drivers / VFIO_DRIVER).exists():
        subprocess.run(["modprobe", VFIO_DRIVER], capture_output=True)
    if not (drivers / VFIO_DRIVER).exists():
        raise NotBoundToVfio(f"the {VFIO_DRIVER} driver is not loaded and modprobe "
                             f"{VFIO_DRIVER} failed")


def vfio_bind(bdf, any_virtio=False, sysfs="/sys", state_dir=STATE_DIR):
    """Check and bind ``bdf`` to vfio-pci; returns the previous driver (None if none)."""
    require_root()
    function = PciFunction(bdf, sysfs)
    check_ids(function, any_virtio)
    group = function.iommu_group
    function.check_group_viable()
    previous = function.driver
    if previous == VFIO_DRIVER:
        return previous
    _ensure_vfio_pci(sysfs)
    state = _state_file(state_dir, bdf)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(previous or "")
    function.write("driver_override", VFIO_DRIVER)
    if previous is not None:
        function.write("driver/unbind", bdf)
    (pathlib.Path(sysfs) / "bus" / "pci" / "drivers_probe").write_text(bdf)
    if function.driver != VFIO_DRIVER:
        vfio_unbind(bdf, sysfs, state_dir)
        raise NotBoundToVfio(f"{bdf} did not bind to {VFIO_DRIVER} (see dmesg); "
                             f"{previous or 'no driver'} restored")
    if not os.path.exists(f"/dev/vfio/{group}"):
        raise NoIommu(f"/dev/vfio/{group} missing although {bdf} is bound to {VFIO_DRIVER}")
    return previous


def _check_group_closed(function, vfio_dev):
    """Raise :class:`DeviceBusy` while a process holds the group (the kernel would make
    the unbind wait for it); a group file that is absent is not in use."""
    try:
        fd = os.open(f"{vfio_dev}/{function.iommu_group}", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusy(f"{function.bdf} is open in another process; stop it before "
                             f"unbind") from None
        raise
    os.close(fd)


def vfio_unbind(bdf, sysfs="/sys", state_dir=STATE_DIR, vfio_dev="/dev/vfio"):
    """Take ``bdf`` from vfio-pci and give it back to the driver it had before
    :func:`vfio_bind` (or let the kernel choose when that is not known); the new driver."""
    require_root()
    function = PciFunction(bdf, sysfs)
    if function.driver == VFIO_DRIVER:
        _check_group_closed(function, vfio_dev)
        function.write("driver/unbind", bdf)
    function.write("driver_override", "\n")
    state = _state_file(state_dir, bdf)
    previous = state.read_text() if state.exists() else None
    if previous:
        (pathlib.Path(sysfs) / "bus" / "pci" / "drivers" / previous / "bind").write_text(bdf)
    elif previous is None:
        (pathlib.Path(sysfs) / "bus" / "pci" / "drivers_probe").write_text(bdf)
    if state.exists():
        state.unlink()
    return function.driver
