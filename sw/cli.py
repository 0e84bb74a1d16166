"""``memballoon``: bring-up commands for a board (or any virtio-pci function) over VFIO.

::

    memballoon vfio bind BDF [--any-virtio]     hand the function to vfio-pci
    memballoon vfio unbind BDF                  give it back to its previous driver
    memballoon vfio probe BDF [--any-virtio]    capabilities, features, queues, vectors
    memballoon vfio selftest BDF                init, GIVE/GET/EXCHANGE with checks, reset
    memballoon vfio bench BDF                   the figures of `make bench`, on hardware

Every failure ends in one line ``memballoon: error: ...`` and exit status 1 (2 for bad
arguments); the VFIO backend is a context manager, so nothing stays mapped or enabled,
also on Ctrl-C (exit status 130); bind and unbind put the function back as it was when
they fail or are interrupted half-way, and the line says so. The command bodies
(:func:`probe_report`, :func:`selftest`, :func:`bench`) take any
:class:`~memballoon.backend.Backend`: the tests run them on the reference model.
"""

import argparse
import asyncio
import sys

from . import constants as c
from .backend import BackendError, InterruptTimeout
from .pci_sysfs import BarMissing, parse_bdf, vfio_bind, vfio_unbind
from .virtio_memballoon import GET_RESULT_BYTES, VirtioMemballoon
from .virtio_pci_modern import DeviceTimeout, VirtioError, VirtioPciModernDevice
from .virtio_ring import VirtqueueError

__all__ = ["main", "probe_report", "selftest", "bench"]

#: Seconds the hardware commands wait for the device (an interrupt, a reset).
DEFAULT_TIMEOUT = 1.0
#: The BAR-resident structures a driver needs (virtio 1.2 4.1.4).
NEEDED_CAPS = (c.VIRTIO_PCI_CAP_COMMON_CFG, c.VIRTIO_PCI_CAP_NOTIFY_CFG,
               c.VIRTIO_PCI_CAP_ISR_CFG, c.VIRTIO_PCI_CAP_DEVICE_CFG)
BENCH_KINDS = ("GIVE", "GET", "EXCHANGE")
BENCH_SIZES = (1, 64, 512)
BENCH_DEPTHS = (1, 8)


def _cap_name(cfg_type):
    try:
        return c.PciCapType(cfg_type).name
    except ValueError:
        return f"type {cfg_type}"


async def _device_id(backend, any_virtio):
    """The virtio device ID the driver binds to: the memballoon's, or the function's own."""
    if not any_virtio:
        return c.VIRTIO_ID_MEMORY_BALLOON
    device = await backend.config_read(c.PCI_DEVICE_ID, 2)
    return device - c.VIRTIO_PCI_MODERN_DEVICE_ID_BASE


async def _probed(backend, device_id):
    """A driver model that found and mapped the structures, after checking their BARs."""
    vdev = VirtioPciModernDevice(backend, device_id=device_id)
    for cap in await vdev.virtio_caps():
        if cap.cfg_type in NEEDED_CAPS and cap.bar < c.PCI_STD_NUM_BARS \
                and not backend.bar_size(cap.bar):
            raise BarMissing(f"BAR{cap.bar} holding {_cap_name(cap.cfg_type)} is not "
                             f"implemented (size 0): check the bitstream's BAR settings")
    await vdev.vp_modern_probe()
    return vdev


async def probe_report(backend, any_virtio=False, timeout=DEFAULT_TIMEOUT):
    """What the function offers, as lines of text; leaves it reset."""
    vdev = await _probed(backend, await _device_id(backend, any_virtio))
    rd = backend.config_read
    lines = [f"function {vdev.vendor_id:04x}:{vdev.device_id:04x}, virtio device "
             f"{vdev.id_device}, revision {await rd(c.PCI_REVISION_ID, 1)}, subsystem "
             f"{vdev.id_vendor:04x}:{await rd(c.PCI_SUBSYSTEM_ID, 2):04x}",
             "BARs: " + ", ".join(f"BAR{bar} {backend.bar_size(bar):#x} bytes"
                                  for bar in range(c.PCI_STD_NUM_BARS)
                                  if backend.bar_size(bar)),
             "capabilities:"]
    for cap_id, pos in await vdev.capabilities():
        if cap_id == c.PCI_CAP_ID_VNDR:
            cap = await vdev.read_virtio_cap(pos)
            extra = (f", notify_off_multiplier {cap.notify_off_multiplier}"
                     if cap.notify_off_multiplier is not None else "")
            lines.append(f"  {pos:#04x} virtio {_cap_name(cap.cfg_type)}: BAR{cap.bar} "
                         f"+{cap.offset:#x}, {cap.length:#x} bytes{extra}")
        elif cap_id == c.PCI_CAP_ID_MSIX:
            control = await rd(pos + c.PCI_MSIX_FLAGS, 2)
            table = await rd(pos + c.PCI_MSIX_TABLE, 4)
            pba = await rd(pos + c.PCI_MSIX_PBA, 4)
            lines.append(f"  {pos:#04x} MSI-X: {(control & c.PCI_MSIX_FLAGS_QSIZE) + 1} "
                         f"vectors, table BAR{table & 7} +{table & ~7:#x}, PBA BAR{pba & 7} "
                         f"+{pba & ~7:#x}")
        else:
            lines.append(f"  {pos:#04x} capability {cap_id:#04x}")
    await vdev.vp_modern_reset(timeout)
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_DRIVER)
    offered = await vdev.vp_modern_get_features()
    lines.append(f"features offered: {offered:#018x} ({' '.join(c.feature_names(offered))})")
    num_queues = await vdev.vp_modern_get_num_queues()
    sizes = [await vdev.vp_modern_get_queue_size(q) for q in range(num_queues)]
    lines.append(f"queues: {num_queues} (largest sizes: "
                 f"{', '.join(str(size) for size in sizes)})")
    lines.append(f"device status after ACKNOWLEDGE|DRIVER: {await vdev.vp_modern_get_status():#04x}")
    await vdev.vp_modern_reset(timeout)
    lines.append(f"device status after reset: {await vdev.vp_modern_get_status():#04x}")
    return lines


def _pages(balloon, first, count):
    return [balloon.page_size * page for page in range(first, first + count)]


def _expect(what, got, wanted):
    if got != wanted:
        raise VirtioError(f"selftest {what}: got {got}, expected {wanted}")


async def selftest(backend, timeout=DEFAULT_TIMEOUT):
    """Full init (both queues), one GIVE/GET/EXCHANGE round with checks, reset; lines."""
    await _probed(backend, c.VIRTIO_ID_MEMORY_BALLOON)
    balloon = VirtioMemballoon(backend, timeout=timeout)
    await balloon.virtballoon_probe()
    vdev = balloon.vdev
    lines = [f"init: features {' '.join(c.feature_names(vdev.accepted_features))}, "
             f"queues {', '.join(f'{q.index}:{q.num}' for q in vdev.queues)}, "
             f"page size {c.size_name(balloon.page_size)}"]
    given = _pages(balloon, 1, 4)
    await balloon.give_pages(given)
    _expect("balloon after GIVE of 4", balloon.num_pages, 4)
    lines.append(f"GIVE 4 pages: used.len 0, balloon {balloon.num_pages} pages")
    granted = await balloon.get_pages(given[:2])
    _expect("pages granted by GET of 2", granted, given[:2])
    lines.append(f"GET 2 pages: granted {len(granted)}, balloon {balloon.num_pages} pages")
    wanted, give = given[2:3], _pages(balloon, 5, 1)
    await balloon.exchange_pages(wanted, give)
    _expect("balloon pages after EXCHANGE", sorted(balloon.pages), sorted(given[3:] + give))
    lines.append(f"EXCHANGE 1 pair: balloon {balloon.num_pages} pages")
    irqs = backend.irq_count(balloon._vectors[balloon.todev_vq])
    if irqs == 0:
        raise VirtioError("selftest: todevq completed without an MSI-X message")
    lines.append(f"todevq MSI-X messages: {irqs}")
    await balloon.virtballoon_remove()
    _expect("device status after reset", await vdev.vp_modern_get_status(), 0)
    lines.append("reset: device status 0, buffers taken back")
    return lines


async def _bench_one(balloon, kind, size, depth, next_page):
    """Seconds from the doorbell to the last used buffer of ``depth`` commands."""
    vq = balloon.todev_vq
    commands, page = [], next_page
    for _ in range(depth):
        wanted = _pages(balloon, page, size)
        page += size
        if kind == "GIVE":
            commands.append([(_command(c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES, wanted), False)])
            continue
        await balloon.give_pages(wanted)                # set-up, not measured
        if kind == "GET":
            commands.append([(_command(c.VIRTIO_MEMBALLOON_GCMD_GET_PAGES, wanted), False),
                             (bytearray(GET_RESULT_BYTES), True)])
        else:
            give = _pages(balloon, page, size)
            page += size
            commands.append([(_command(c.VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES,
                                       wanted + give), False)])
    for token, sgs in enumerate(commands):
        await vq.virtqueue_add_sgs(sgs, token)
    start = balloon.backend.now()
    await vq.virtqueue_notify()
    used = [await balloon._wait_used(vq) for _ in range(depth)]
    seconds = balloon.backend.now() - start
    expected = GET_RESULT_BYTES if kind == "GET" else 0     # C5
    if sorted(used) != [(token, expected) for token in range(depth)]:
        raise VirtioError(f"bench {kind} x{depth}: used (token, len) {used}, expected len "
                          f"{expected} each")
    return seconds, page


def _command(code, addrs):
    return b"".join(value.to_bytes(8, "little") for value in (code, *addrs))


async def bench(backend, timeout=DEFAULT_TIMEOUT):
    """GIVE, GET and EXCHANGE with 1, 64 and 512 pages per command, 1 and 8 commands per
    doorbell (as ``make bench``), timed on the backend's clock; Markdown lines. The
    device's page bookkeeping is bypassed: pages come from a running counter."""
    await _probed(backend, c.VIRTIO_ID_MEMORY_BALLOON)
    balloon = VirtioMemballoon(backend, timeout=timeout, max_pages_per_cmd=max(BENCH_SIZES))
    await balloon.virtballoon_probe()
    lines = ["| command | pages/cmd | queued | doorbell to used (us) | pages/s |",
             "|---|---:|---:|---:|---:|"]
    page = 1
    for kind in BENCH_KINDS:
        for size in BENCH_SIZES:
            for depth in BENCH_DEPTHS:
                seconds, page = await _bench_one(balloon, kind, size, depth, page)
                rate = f"{size * depth / seconds:.0f}" if seconds > 0 else "-"
                lines.append(f"| {kind} | {size} | {depth} | {seconds * 1e6:.1f} | {rate} |")
    await balloon.vdev.vp_modern_reset(timeout)
    lines.append("EXCHANGE sizes are pairs; GET and EXCHANGE pages were given first "
                 "(not timed).")
    return lines


# --- command line ----------------------------------------------------------------------------

async def _on_function(bdf, body, *args):
    from .backend_vfio import VfioBackend      # Linux-only; keeps --help portable
    with VfioBackend.open(bdf) as backend:
        return await body(backend, *args)


def _cmd_bind(args):
    previous = vfio_bind(args.bdf, args.any_virtio)
    print(f"{args.bdf}: bound to vfio-pci (was: {previous or 'no driver'})")


def _cmd_unbind(args):
    driver = vfio_unbind(args.bdf)
    print(f"{args.bdf}: released by vfio-pci, now {driver or 'no driver'}")


def _cmd_probe(args):
    print("\n".join(asyncio.run(_on_function(args.bdf, probe_report, args.any_virtio,
                                             args.timeout))))


def _cmd_selftest(args):
    print("\n".join(asyncio.run(_on_function(args.bdf, selftest, args.timeout))))
    print("selftest passed")


def _cmd_bench(args):
    print("\n".join(asyncio.run(_on_function(args.bdf, bench, args.timeout))))


def _bdf(text):
    try:
        return parse_bdf(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="memballoon", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    vfio = commands.add_parser("vfio", help="bring-up over VFIO",
                               description="Bring-up of a PCIe function over VFIO.")
    actions = vfio.add_subparsers(dest="action", required=True, metavar="ACTION")
    specs = [
        ("bind", _cmd_bind, "check the function, its IOMMU group, and bind it to vfio-pci"),
        ("unbind", _cmd_unbind, "release the function to the driver it had before bind"),
        ("probe", _cmd_probe, "print capabilities, features, queues and vectors"),
        ("selftest", _cmd_selftest, "init, a GIVE/GET/EXCHANGE round with checks, reset"),
        ("bench", _cmd_bench, "time GIVE/GET/EXCHANGE as `make bench` does, on hardware"),
    ]
    for name, handler, text in specs:
        sub = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("bdf", type=_bdf, metavar="BDF",
                         help="PCI address, e.g. 0000:01:00.0 (lspci -D)")
        if name in ("bind", "probe"):
            sub.add_argument("--any-virtio", action="store_true",
                             help="accept any modern virtio function, not only the "
                                  "memballoon (1af4:104d)")
        if name in ("probe", "selftest", "bench"):
            sub.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT,
                             help=f"seconds to wait for the device (default "
                                  f"{DEFAULT_TIMEOUT:g})")
        sub.set_defaults(handler=handler)
    return parser


def main(argv=None):
    """Run one command; the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt as exc:
        print(f"memballoon: interrupted; {_notes(exc) or 'everything released'}",
              file=sys.stderr)
        return 130
    except (InterruptTimeout, DeviceTimeout) as exc:
        print(f"memballoon: error: timeout: {exc}", file=sys.stderr)
        return 1
    except (BackendError, VirtioError, VirtqueueError, OSError) as exc:
        print(f"memballoon: error: {'; '.join(filter(None, (str(exc), _notes(exc))))}",
              file=sys.stderr)
        return 1
    return 0


def _notes(exc):
    """The notes added to ``exc`` on its way out (what bind/unbind restored), one line."""
    return "; ".join(getattr(exc, "__notes__", ()))
