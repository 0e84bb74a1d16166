"""The VFIO backend and the bring-up commands against real virtio-pci devices (QEMU's)
behind an emulated IOMMU, in a VM (:mod:`memballoon.tb.vm`, scenario
:mod:`memballoon.tb.vm_guest`). One boot serves every check below (25-40 s under TCG).

Needs qemu-system-x86, busybox-static, kmod and apt (``make setup`` installs them);
the kernel image is fetched into the cache on first use. A machine that cannot run the VM
fails this test with the reason: it is never skipped.
"""

import json
import sys

import pytest

from memballoon import constants as c
from memballoon.tb import vm
from memballoon.tb.vm_guest import (BLK, DUT, GUEST_SECTOR, HOST_SECTOR, IN_FOREIGN_GROUP,
                                    sector_pattern)

ACCESS_PLATFORM = 1 << c.VIRTIO_F_ACCESS_PLATFORM
VERSION_1 = 1 << c.VIRTIO_F_VERSION_1
#: The guest has 1 GiB of RAM (vm.qemu_command): an IOVA at or above 4 GiB reaches memory
#: only through the IOMMU's translation.
GUEST_RAM = 1 << 30


def sector(image, number):
    size = c.VIRTIO_BLK_SECTOR_SIZE
    return image[number * size:(number + 1) * size]


def boot_and_run(tmp_path):
    """Boot once, run the scenario; its results by step, and the disk image after."""
    disk = tmp_path / "disk.img"
    image = bytearray(vm.DISK_BYTES)
    offset = HOST_SECTOR * c.VIRTIO_BLK_SECTOR_SIZE
    image[offset:offset + c.VIRTIO_BLK_SECTOR_SIZE] = sector_pattern(HOST_SECTOR)
    disk.write_bytes(bytes(image))
    try:
        result = vm.run_in_vm(f"{sys.executable} -m memballoon.tb.vm_guest", disk=disk)
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
    steps["disk"] = disk.read_bytes()
    return steps


def test_vfio_in_vm(tmp_path):
    """One boot (xdist would boot once per worker for a fixture shared by tests)."""
    guest = boot_and_run(tmp_path)
    check_bring_up_and_rng(guest)
    check_virtio_blk(guest)


def check_bring_up_and_rng(guest):
    def refused(step, message):
        got = guest[step]
        assert got["exit"] == 1, got
        assert got["stderr"].startswith("memballoon: error: ") and message in got["stderr"], got
        assert got["stderr"].count("\n") == 1, "errors are one line"

    # Negative cases: nothing is bound by a refused bind.
    untouched = {DUT: "virtio-pci", IN_FOREIGN_GROUP: "virtio-pci", BLK: "virtio-pci"}
    for step, message in (("bind-wrong-device", "is 1af4:1044, not memballoon 1af4:104d"),
                          ("bind-foreign-group", "0000:02:00.1 (bound to virtio-pci)"),
                          ("probe-unbound", "bound to virtio-pci, not vfio-pci")):
        refused(step, message)
        assert guest[step]["drivers"] == untouched, guest[step]

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
        refused(f"{step}-unbind-busy", "open in another process; stop it before unbind")
        assert guest[f"{step}-unbind-busy"]["drivers"][DUT] == "vfio-pci"
        print(f"{step}: init to used buffer {rng['seconds'] * 1e3:.1f} ms (guest wall clock)")

    refused("selftest-not-memballoon", "virtio device ID 4, driver binds to 13")
    assert guest["unbind"]["exit"] == 0, guest["unbind"]
    assert guest["unbind"]["drivers"][DUT] == "virtio-pci", "unbind restores the driver"
    assert guest["released"]["open_vfio"] == [], "nothing VFIO is left open"


def check_virtio_blk(guest):
    """Mixed readable/writable chains, indirect and direct, data checked on both sides."""
    assert guest["bind-blk"]["exit"] == 0 and guest["bind-blk"]["drivers"][BLK] == "vfio-pci"
    blk = guest["blk"]
    assert blk["capacity"] == vm.DISK_BYTES // c.VIRTIO_BLK_SECTOR_SIZE
    assert blk["accepted"] & ACCESS_PLATFORM and blk["indirect"], blk
    sector_and_status = c.VIRTIO_BLK_SECTOR_SIZE + 1
    assert blk["used"] == sorted([["write", 1], ["read", sector_and_status],
                                  ["read-back", sector_and_status]]), blk
    assert blk["status"] == [c.VIRTIO_BLK_S_OK] * 3, blk
    assert blk["host_sector_read"], "the device wrote the host's sector into our buffer"
    assert blk["guest_sector_read_back"], "the sector written reads back"
    assert sector(guest["disk"], GUEST_SECTOR) == sector_pattern(GUEST_SECTOR), \
        "the device read our buffer by DMA and wrote it to the image"
    assert 1 <= blk["irqs"] <= 3, blk
    assert guest["unbind-blk"]["exit"] == 0
    assert guest["unbind-blk"]["drivers"][BLK] == "virtio-pci"
