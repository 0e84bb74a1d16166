"""``make sim``: build ``memballoon_usp``, bring the device up as a driver would, print
what it looks like, then tell a balloon's story.

``python -m memballoon.tb.sim [--width 512|256] [--verbose]`` builds the DUT and runs two
cocotb tests. :func:`device_summary` (enumerate, negotiate, set up both queues,
DRIVER_OK) prints IDs, capabilities with BAR/offset/length, offered and accepted features
by name, the queues, MSI-X vectors and device status, and the simulated user_clk cycles
against wall time. :func:`balloon_story` runs the memballoon driver and the host side
(C10 management port) through a readable scenario: inflate, the host raises the minimum
and the driver follows, the host limits its return budget and the driver deflates with
partial grants, an exchange, and extra memory taking the balloon below zero; it prints
the balloon size and the counters after each step. ``WAVES=1`` also writes an FST
waveform and prints its path.
"""

import argparse
import sys
import time

import cocotb

from memballoon.constants import PCI_CLASS_REVISION
from memballoon import constants as c
from memballoon.params import DeviceParams
from memballoon.tb.harness import LINK_CONFIG, MemballoonTb
from memballoon.tb.runner import params_from_env, run_cocotb
from memballoon.tb.scenarios import story
from memballoon.tb.scoreboard import SimRig
from memballoon.virtio_pci_modern import VirtioPciModernDevice

CAP_NAMES = {0x01: "Power Management", 0x05: "MSI", c.PCI_CAP_ID_MSIX: "MSI-X",
             0x10: "PCI Express", c.PCI_CAP_ID_VNDR: "Vendor Specific"}
QUEUE_NAMES = {c.FROMDEVQ: "fromdevq", c.TODEVQ: "todevq"}


def _features(bits):
    return " ".join(c.feature_names(bits)) or "-"


async def summary_lines(tb, vdev):
    """The device as the driver sees it, one line per fact."""
    be, params = tb.backend, tb.params
    generation, lanes = LINK_CONFIG[params.data_width]
    class_rev = await be.config_read(PCI_CLASS_REVISION, 4)
    lines = [
        f"memballoon_usp, {params.data_width}-bit AXI stream (Gen{generation} x{lanes}), "
        f"function {tb.function.pcie_id}",
        f"  IDs       vendor {vdev.vendor_id:04x} device {vdev.device_id:04x} "
        f"rev {class_rev & 0xFF:02x} class {class_rev >> 8:06x} "
        f"subsystem {vdev.id_vendor:04x}:{tb.pci_dev.subsystem_id:04x} "
        f"(virtio device {vdev.id_device})",
        f"  BAR0      64-bit memory at {tb.pci_dev.bar_addr[0]:#x}, "
        f"{c.size_name(be.bar_size(0))}iB",
        "  Capabilities",
    ]
    virtio = {cap.pos: cap for cap in await vdev.virtio_caps()}
    for cap_id, pos in await vdev.capabilities():
        line = f"    [{pos:02x}] {CAP_NAMES.get(cap_id, f'ID {cap_id:#04x}')}"
        if pos in virtio:
            cap = virtio[pos]
            line += (f": virtio {c.PciCapType(cap.cfg_type).name:<10} BAR{cap.bar} "
                     f"offset {cap.offset:#06x} length {cap.length:#x}")
            if cap.notify_off_multiplier is not None:
                line += f", notify_off_multiplier {cap.notify_off_multiplier}"
        elif cap_id == c.PCI_CAP_ID_MSIX:
            ctrl = await be.config_read(pos + c.PCI_MSIX_FLAGS, 2)
            table = await be.config_read(pos + c.PCI_MSIX_TABLE, 4)
            pba = await be.config_read(pos + c.PCI_MSIX_PBA, 4)
            line += (f": {(ctrl & c.PCI_MSIX_FLAGS_QSIZE) + 1} vectors, "
                     f"{'enabled' if ctrl & c.PCI_MSIX_FLAGS_ENABLE else 'disabled'}, "
                     f"table BAR{table & 7}+{table & ~7:#x}, PBA BAR{pba & 7}+{pba & ~7:#x}")
        lines.append(line)
    lines += [
        f"  Features offered   {vdev.offered_features:#018x}  {_features(vdev.offered_features)}",
        f"  Features accepted  {vdev.accepted_features:#018x}  "
        f"{_features(vdev.accepted_features)}",
        "  Queues",
    ]
    for q in vdev.queues:
        lines.append(
            f"    {q.index} {QUEUE_NAMES[q.index]:<8} size {q.num:<5} desc {q.desc_addr:#x} "
            f"avail {q.avail_addr:#x} used {q.used_addr:#x} vector {q.vector} "
            f"notify BAR{q.notify.bar}+{q.notify.offset:#x}")
    config_vector = await vdev.common.ioread(c.VIRTIO_PCI_COMMON_MSIX, 2)
    vectors = [f"config {config_vector}"] + [f"{QUEUE_NAMES[q.index]} {q.vector}"
                                             for q in vdev.queues]
    lines.append(f"  MSI-X      {', '.join(vectors)} (of {params.msix_vectors})")
    status = await vdev.vp_modern_get_status()
    lines.append(f"  Status     {status:#04x} "
                 f"{' '.join(flag.name for flag in c.DeviceStatus if status & flag)}")
    return lines


@cocotb.test(timeout_time=1000, timeout_unit="us")
async def device_summary(dut):
    """Enumerate, negotiate, set up both queues and print the device summary."""
    tb = MemballoonTb(dut, params_from_env())
    await tb.init()
    vdev = VirtioPciModernDevice(await tb.enumerate())
    await vdev.init()
    lines = await summary_lines(tb, vdev)
    cycles, wall, rate = tb.clock_rate()
    lines.append(f"  Simulated  {cycles:.0f} user_clk cycles ({cycles / 250:.1f} us at 250 MHz)"
                 f" in {wall:.2f} s wall: {rate:.0f} cycles/s")
    tb.check_errors()
    print("\n".join(["", *lines, ""]), flush=True)


@cocotb.test(timeout_time=20000, timeout_unit="us")
async def balloon_story(dut):
    """The driver and the host through inflate, minimum, budgeted deflate, exchange and
    extra memory (tb/scenarios.py ``story``); balloon size and counters after each step."""
    tb = MemballoonTb(dut, params_from_env())
    await tb.init()
    await tb.enumerate()
    lines = await story(SimRig(tb))
    cycles, wall, rate = tb.clock_rate()
    lines.append(f"  Simulated  {cycles:.0f} user_clk cycles ({cycles / 250:.1f} us at 250 MHz)"
                 f" in {wall:.2f} s wall: {rate:.0f} cycles/s")
    tb.check_errors()
    print("\n".join(["", *lines, ""]), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, choices=(512, 256), default=512,
                        help="AXI-stream data width of the hard IP interface")
    parser.add_argument("--verbose", action="store_true",
                        help="show the cocotb and model log (default: errors only)")
    args = parser.parse_args()
    start = time.perf_counter()
    env = {} if args.verbose else {"COCOTB_LOG_LEVEL": "ERROR",
                                   "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    try:
        run_cocotb("memballoon.tb.sim", "sim", DeviceParams(data_width=args.width),
                   testcase=["device_summary", "balloon_story"], extra_env=env)
    except AssertionError as exc:
        print(f"sim failed: {exc}", file=sys.stderr)
        return 1
    print(f"total wall time (build + run): {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
