"""The VFIO backend and the bring-up commands against real virtio-pci devices (QEMU's)
behind an emulated IOMMU, in a VM (:mod:`memballoon.tb.vm`, scenario
:mod:`memballoon.tb.vm_guest`). One boot serves every check below (about 40 s under TCG).

Needs root, qemu-system-x86, busybox-static, kmod and apt (``make setup`` installs them);
the kernel image is fetched into the cache on first use. A machine that cannot run the VM
fails this test with the reason: it is never skipped.
"""

import json
import sys

import pytest

from memballoon import constants as c
from memballoon.tb import vm

DUT = "0000:01:00.0"
FOREIGN_GROUP = "0000:02:00.0"
ACCESS_PLATFORM = 1 << c.VIRTIO_F_ACCESS_PLATFORM
VERSION_1 = 1 << c.VIRTIO_F_VERSION_1
#: The guest has 1 GiB of RAM (vm.qemu_command): an IOVA at or above 4 GiB reaches memory
#: only through the IOMMU's translation.
GUEST_RAM = 1 << 30


@pytest.fixture(scope="module")
def guest():
    """Boot once, run the scenario; its results by step."""
    try:
        result = vm.run_in_vm(f"{sys.executable} -m memballoon.tb.vm_guest")
    except vm.VmUnavailable as exc:
        pytest.fail(f"the VFIO VM cannot run here: {exc}")
    print(f"\nVFIO VM: {result.accel}, {result.seconds:.1f} s boot and scenario")
    steps = {}
    for line in result.console.splitlines():
        if line.startswith("MB-RESULT "):
            step = json.loads(line.removeprefix("MB-RESULT "))
            steps[step.pop("step")] = step
    assert result.exit_code == 0, f"guest scenario failed:\n{result.console}"
    assert vm.MARK_ERROR not in result.console, result.console
    return steps


def test_vfio_bring_up_in_vm(guest):
    def refused(step, message):
        got = guest[step]
        assert got["exit"] == 1, got
        assert got["stderr"].startswith("memballoon: error: ") and message in got["stderr"], got
        assert got["stderr"].count("\n") == 1, "errors are one line"
        assert got["drivers"][DUT] in ("virtio-pci", "vfio-pci"), got

    # Negative cases: nothing is bound by a refused bind.
    refused("bind-wrong-device", "is 1af4:1044, not memballoon 1af4:104d")
    assert guest["bind-wrong-device"]["drivers"] == {DUT: "virtio-pci", FOREIGN_GROUP: "virtio-pci"}
    refused("bind-foreign-group", "0000:02:00.1 (bound to virtio-pci)")
    assert guest["bind-foreign-group"]["drivers"][FOREIGN_GROUP] == "virtio-pci"
    refused("probe-unbound", "not vfio-pci")

    assert guest["bind"]["exit"] == 0 and guest["bind"]["drivers"][DUT] == "vfio-pci", guest["bind"]
    probe = guest["probe"]
    assert probe["exit"] == 0, probe
    for text in ("virtio COMMON_CFG: BAR4", "NOTIFY_CFG", "ISR_CFG", "MSI-X: 2 vectors",
                 "ACCESS_PLATFORM", "queues: 1", "device status after reset: 0x00"):
        assert text in probe["stdout"], (text, probe["stdout"])

    for step, huge, mapped in (("rng", False, True), ("rng-huge-pages-pread", True, False)):
        rng = guest[step]
        assert rng["caps"] == [c.VIRTIO_PCI_CAP_COMMON_CFG, c.VIRTIO_PCI_CAP_NOTIFY_CFG,
                               c.VIRTIO_PCI_CAP_ISR_CFG, c.VIRTIO_PCI_CAP_DEVICE_CFG], rng
        assert rng["offered"] & ACCESS_PLATFORM and rng["accepted"] & ACCESS_PLATFORM, rng
        assert rng["accepted"] & VERSION_1 and rng["accepted"] & ~rng["offered"] == 0, rng
        assert rng["status"] == (c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER |
                                 c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)
        assert rng["ring_iova"] >= GUEST_RAM, "the ring must sit where only the IOMMU reaches"
        assert rng["used"] == ["entropy", 64], rng
        assert rng["data"] != "00" * 64, "the device wrote the buffer by DMA"
        assert rng["irqs"][rng["vector"]] == 1 and rng["irqs"][0] == 0, rng
        assert rng["config_timeout"], "an idle vector times out"
        assert rng["status_after_reset"] == 0
        assert rng["huge_pages"] is huge, rng
        assert rng["device_reset"], "vfio-pci offers a reset (VFIO_DEVICE_RESET on close)"
        assert rng["iova_ranges"], "VFIO_IOMMU_GET_INFO reports the usable IOVA ranges"
        assert (4 in rng["mmap_bars"]) is mapped, rng["mmap_bars"]
        refused(f"{step}-busy", "open in another process")
        print(f"{step}: init to used buffer {rng['seconds'] * 1e3:.1f} ms (guest wall clock)")

    refused("selftest-not-memballoon", "virtio device ID 4, driver binds to 13")
    assert guest["unbind"]["exit"] == 0, guest["unbind"]
    assert guest["unbind"]["drivers"][DUT] == "virtio-pci", "unbind restores the driver"
    assert guest["released"]["open_vfio"] == [], "nothing VFIO is left open"
