"""A PCI function as Linux's sysfs shows it, and handing it to vfio-pci and back.

:func:`vfio_bind` checks, in this order, every condition that makes a VFIO bring-up fail
later with a confusing message, and raises a :class:`SetupError` subclass whose text is
one line a person can act on: root, the function exists, its IDs, an IOMMU group, the
group is viable (each other member unbound, bound to vfio-pci or pci-stub, or a bridge:
the kernel's own rule), vfio-pci loaded. Then ``driver_override`` and a rebind, as
``Documentation/driver-api/vfio.rst`` describes. The previous driver is remembered under
``/run/memballoon`` so :func:`vfio_unbind` gives the function back to it.

The sysfs writes of both commands are one critical section, :class:`BindingTransaction`:
an error or Ctrl-C in the middle puts back the ``driver_override``, the bound driver and
the record under ``/run/memballoon`` as they were, so no function is left half-bound.

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
           "vfio_unbind", "check_ids", "parse_bdf", "BindingTransaction"]

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

    @property
    def driver_override(self):
        """The ``driver_override`` text, or None when it is unset (sysfs shows ``(null)``)."""
        text = self._read("driver_override")
        return None if text in ("", "(null)") else text

    def write(self, name, text):
        sysfs_write(self.path / name, text)


def sysfs_write(path, text):
    """Every sysfs write of bind and unbind goes here (the tests put a model of the
    kernel's PCI core in its place)."""
    pathlib.Path(path).write_text(text)


class BindingTransaction:
    """The critical section of a (re)bind: records the function's ``driver_override``,
    its driver and the contents of ``state`` at entry; if the body raises (an error or
    KeyboardInterrupt), puts all three back, each step on its own so one that fails does
    not stop the others, and adds a note to the exception saying what it restored (the
    command line prints it on the same line). A second Ctrl-C that lands in one of those
    writes counts as that step failing; the remaining steps still run."""

    def __init__(self, function, state):
        self.function = function
        self.state = pathlib.Path(state)

    def __enter__(self):
        self.override = self.function.driver_override
        self.driver = self.function.driver
        self.state_text = self.state.read_text() if self.state.exists() else None
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:
            exc.add_note(self.restore())
        return False

    def _step(self, what, action, failed):
        try:
            action()
        except (Exception, KeyboardInterrupt) as error:
            failed.append(f"{what} ({error or type(error).__name__})")

    def restore(self):
        """Put the recorded state back; one line saying what was restored or not."""
        function, failed = self.function, []
        self._step("driver_override", lambda: function.write(
            "driver_override", self.override or "\n"), failed)
        try:
            current = function.driver
        except OSError as error:
            failed.append(f"reading the driver ({error})")
            current = self.driver
        if current != self.driver:
            if current is not None:
                self._step(f"unbind from {current}",
                           lambda: function.write("driver/unbind", function.bdf), failed)
            if self.driver is not None:
                self._step(f"bind to {self.driver}", lambda: sysfs_write(
                    function.sysfs / "bus" / "pci" / "drivers" / self.driver / "bind",
                    function.bdf), failed)
        self._step(f"record {self.state}", self._restore_state, failed)
        if failed:
            return (f"{function.bdf} NOT fully restored, failed: {', '.join(failed)}; "
                    f"check {function.path}")
        return (f"{function.bdf} restored: driver {self.driver or 'none'}, "
                f"driver_override {self.override or 'unset'}")

    def _restore_state(self):
        if self.state_text is None:
            self.state.unlink(missing_ok=True)
        else:
            self.state.write_text(self.state_text)


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


def vfio_bind(bdf, any_virtio=False, sysfs="/sys", state_dir=STATE_DIR,
              vfio_dev="/dev/vfio"):
    """Check and bind ``bdf`` to vfio-pci; returns the previous driver (None if none).
    On any failure after the checks the function is left as it was."""
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
    with BindingTransaction(function, state):
        state.write_text(previous or "")     # first, so a killed process leaves a record
        function.write("driver_override", VFIO_DRIVER)
        if previous is not None:
            function.write("driver/unbind", bdf)
        sysfs_write(pathlib.Path(sysfs) / "bus" / "pci" / "drivers_probe", bdf)
        if function.driver != VFIO_DRIVER:
            raise NotBoundToVfio(f"{bdf} did not bind to {VFIO_DRIVER} (see dmesg)")
        if not os.path.exists(f"{vfio_dev}/{group}"):
            raise NoIommu(f"{vfio_dev}/{group} missing after binding {bdf} to {VFIO_DRIVER}")
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
    :func:`vfio_bind` (or let the kernel choose when that is not known); the new driver.
    On a failure in the middle the function stays on vfio-pci as it was."""
    require_root()
    function = PciFunction(bdf, sysfs)
    state = _state_file(state_dir, bdf)
    bound = function.driver == VFIO_DRIVER
    if bound:
        _check_group_closed(function, vfio_dev)
    with BindingTransaction(function, state):
        if bound:
            function.write("driver/unbind", bdf)
        function.write("driver_override", "\n")
        previous = state.read_text() if state.exists() else None
        if previous:
            sysfs_write(pathlib.Path(sysfs) / "bus" / "pci" / "drivers" / previous / "bind",
                        bdf)
        elif previous is None:
            sysfs_write(pathlib.Path(sysfs) / "bus" / "pci" / "drivers_probe", bdf)
        state.unlink(missing_ok=True)
    return function.driver
