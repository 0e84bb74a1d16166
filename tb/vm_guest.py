"""The VFIO scenario that runs inside the VM of :mod:`memballoon.tb.vm` (as root).

Against QEMU's virtio-rng-pci functions (``disable-legacy=on,iommu_platform=on``, behind
the emulated intel-iommu) it runs the project's own ``memballoon vfio`` commands (their
``main``, in this process: each Python start costs seconds under TCG) and the driver model
over :class:`~memballoon.backend_vfio.VfioBackend`, and prints one line
``MB-RESULT {json}`` per step for ``tests/test_vm_vfio.py`` to check:

- ``bind`` refuses a function that is not a memballoon, and a function whose IOMMU group
  has a member bound to another driver; neither changes any binding;
- ``probe`` refuses a function not bound to vfio-pci;
- ``bind --any-virtio`` hands the rng function to vfio-pci; ``probe`` reads it;
- the transport and split ring: probe the capabilities, negotiate (ACCESS_PLATFORM
  included), set up the queue, post a device-writable buffer, notify, receive the MSI-X
  interrupt through the eventfd, take the used buffer the device filled by DMA, reset;
  once with mapped BARs and small pages, once with huge pages reserved (``MAP_HUGETLB``)
  and every BAR access a ``pread``/``pwrite``; while the function is open, a second
  ``probe`` finds it busy;
- a vector that never fires times out; ``selftest`` on a non-memballoon fails cleanly;
- on a virtio-blk function: a write and a read in 3-segment chains (readable header and
  data, writable data and status; indirect tables) behind one doorbell, a read-back in a
  direct chain; the bytes must match what the host put in and finds in the image;
- ``unbind`` gives the function back to virtio-pci, and nothing is left open.
"""

import asyncio
import contextlib
import io
import json
import os
import pathlib
import struct
import time

from memballoon import cli
from memballoon import constants as c
from memballoon import vfio
from memballoon.backend import InterruptTimeout
from memballoon.backend_vfio import VfioBackend
from memballoon.virtio_pci_modern import VirtioPciModernDevice
from memballoon.virtio_ring import vring_new_virtqueue

DUT = "0000:01:00.0"
IN_FOREIGN_GROUP = "0000:02:00.0"
BLK = "0000:03:00.0"
#: The virtio-blk image: the host writes :func:`sector_pattern` into this sector ...
HOST_SECTOR = 1
#: ... and the guest writes its pattern into this one, then reads both.
GUEST_SECTOR = 2
RNG_BYTES = 64
TIMEOUT = 5.0
HUGE_PAGES = "/proc/sys/vm/nr_hugepages"
HUGE_PAGES_RESERVED = 4


def report(step, **fields):
    print("MB-RESULT " + json.dumps({"step": step, **fields}), flush=True)


def driver_of(bdf):
    link = pathlib.Path("/sys/bus/pci/devices", bdf, "driver")
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def memballoon(step, *args):
    """Run ``memballoon ARGS``; report its exit status, output and the drivers after."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = cli.main(list(args))
        except SystemExit as exc:           # argparse
            status = exc.code
    report(step, exit=status, stdout=stdout.getvalue(), stderr=stderr.getvalue(),
           drivers={bdf: driver_of(bdf) for bdf in (DUT, IN_FOREIGN_GROUP, BLK)})


def rng_through_vfio(bdf, step, mmap_bars):
    """Open the function, check that a second open and an unbind find it busy, run
    :func:`rng_exchange`."""
    with VfioBackend.open(bdf, mmap_bars=mmap_bars) as backend:
        memballoon(f"{step}-busy", "vfio", "probe", "--any-virtio", bdf)
        memballoon(f"{step}-unbind-busy", "vfio", "unbind", bdf)
        asyncio.run(rng_exchange(backend, step))


async def rng_exchange(backend, step):
    """The driver model on the rng function: init, one buffer by DMA, its interrupt."""
    vdev = VirtioPciModernDevice(backend, device_id=c.VIRTIO_ID_ENTROPY)
    start = time.monotonic()
    [info] = await vdev.init(reset_timeout=TIMEOUT)
    async def notify(vq):
        await vdev.vp_notify(info.notify, info.index)
    vq = vring_new_virtqueue(info.index, info.num, backend, notify,
                             vdev.accepted_features, info.ring, info.desc_addr,
                             info.avail_addr, info.used_addr, name="requestq")
    buf = bytearray(RNG_BYTES)
    await vq.virtqueue_add_inbuf([buf], "entropy")
    await vq.virtqueue_kick()
    await backend.wait_irq(info.vector, TIMEOUT)
    used = await vq.virtqueue_get_buf()
    elapsed = time.monotonic() - start
    try:
        await backend.wait_irq(0, 0.2)          # config changes: none happen
        config_timeout = False
    except InterruptTimeout:
        config_timeout = True
    status_before_reset = await vdev.vp_modern_get_status()
    await vdev.vp_modern_reset(TIMEOUT)
    report(step, caps=sorted(vdev.caps), offered=vdev.offered_features,
           accepted=vdev.accepted_features, queue_size=info.num,
           ring_iova=info.ring.iova,
           used=list(used) if used else None, data=buf.hex(),
           irqs=[backend.irq_count(v) for v in range(2)], vector=info.vector,
           config_timeout=config_timeout, status=status_before_reset,
           status_after_reset=await vdev.vp_modern_get_status(),
           huge_pages=backend.huge_pages, seconds=elapsed,
           device_reset=bool(backend.device.flags & vfio.VFIO_DEVICE_FLAGS_RESET),
           iova_ranges=backend.container.iova_ranges(),
           mmap_bars=[bar for bar, region in enumerate(backend.bars) if region.addr])


def sector_pattern(sector):
    """The 512 bytes expected in ``sector`` of the virtio-blk image."""
    return bytes((sector * 37 + i * 11) & 0xFF for i in range(c.VIRTIO_BLK_SECTOR_SIZE))


def blk_request(kind, sector, data=b""):
    """A virtio-blk request (virtio 1.2 5.2.6) as a scatter list: the readable header and
    write data, then the writable read buffer and status byte; with those two sinks."""
    header = struct.pack("<IIQ", kind, 0, sector)
    status = bytearray(1)
    buf = bytearray(c.VIRTIO_BLK_SECTOR_SIZE if kind == c.VIRTIO_BLK_T_IN else 0)
    sgs = [(header, False)] + ([(data, False)] if data else []) + ([(buf, True)] if buf else [])
    return sgs + [(status, True)], buf, status


async def used_buffers(backend, vq, vector, count):
    """The next ``count`` used buffers of ``vq``, waiting for its interrupt in between."""
    used = []
    while len(used) < count:
        got = await vq.virtqueue_get_buf()
        if got is None:
            await backend.wait_irq(vector, TIMEOUT)
        else:
            used.append(list(got))
    return used


async def blk_exchange(backend):
    """The driver model on the virtio-blk function: a write and a read posted behind one
    doorbell as 3-segment chains (indirect tables once negotiated), then a read-back in a
    direct chain; the data must match on both sides of the DMA."""
    vdev = VirtioPciModernDevice(backend, device_id=c.VIRTIO_ID_BLOCK)
    [info] = await vdev.init(reset_timeout=TIMEOUT)
    capacity = (await vdev.device.ioread(c.VIRTIO_BLK_CFG_CAPACITY, 4) |
                await vdev.device.ioread(c.VIRTIO_BLK_CFG_CAPACITY + 4, 4) << 32)

    async def notify(vq):
        await vdev.vp_notify(info.notify, info.index)
    vq = vring_new_virtqueue(info.index, info.num, backend, notify, vdev.accepted_features,
                             info.ring, info.desc_addr, info.avail_addr, info.used_addr,
                             name="blk")
    write_sgs, _, write_status = blk_request(c.VIRTIO_BLK_T_OUT, GUEST_SECTOR,
                                             sector_pattern(GUEST_SECTOR))
    read_sgs, read_buf, read_status = blk_request(c.VIRTIO_BLK_T_IN, HOST_SECTOR)
    await vq.virtqueue_add_sgs(write_sgs, "write")
    await vq.virtqueue_add_sgs(read_sgs, "read")
    await vq.virtqueue_kick()
    used = await used_buffers(backend, vq, info.vector, 2)
    back_sgs, back_buf, back_status = blk_request(c.VIRTIO_BLK_T_IN, GUEST_SECTOR)
    await vq.virtqueue_add_sgs(back_sgs, "read-back", indirect=False)
    await vq.virtqueue_kick()
    used += await used_buffers(backend, vq, info.vector, 1)
    if backend.irq_count(info.vector) == 0:         # all found by polling: the
        await backend.wait_irq(info.vector, TIMEOUT)   # interrupt must still come
    await vdev.vp_modern_reset(TIMEOUT)
    report("blk", capacity=capacity, accepted=vdev.accepted_features, indirect=vq.indirect,
           event_idx=vq.event, used=sorted(used),
           status=[write_status[0], read_status[0], back_status[0]],
           host_sector_read=read_buf == sector_pattern(HOST_SECTOR),
           guest_sector_read_back=back_buf == sector_pattern(GUEST_SECTOR),
           irqs=backend.irq_count(info.vector))


def main():
    memballoon("bind-wrong-device", "vfio", "bind", DUT)
    memballoon("bind-foreign-group", "vfio", "bind", "--any-virtio", IN_FOREIGN_GROUP)
    memballoon("probe-unbound", "vfio", "probe", "--any-virtio", DUT)
    memballoon("bind", "vfio", "bind", "--any-virtio", DUT)
    memballoon("probe", "vfio", "probe", "--any-virtio", DUT)
    rng_through_vfio(DUT, "rng", mmap_bars=True)
    pathlib.Path(HUGE_PAGES).write_text(f"{HUGE_PAGES_RESERVED}\n")
    rng_through_vfio(DUT, "rng-huge-pages-pread", mmap_bars=False)
    memballoon("selftest-not-memballoon", "vfio", "selftest", DUT)
    memballoon("unbind", "vfio", "unbind", DUT)
    memballoon("bind-blk", "vfio", "bind", "--any-virtio", BLK)
    with VfioBackend.open(BLK) as backend:
        asyncio.run(blk_exchange(backend))
    memballoon("unbind-blk", "vfio", "unbind", BLK)
    open_vfio = [name for pid in os.listdir("/proc") if pid.isdigit()
                 for name in _open_files(pid) if name.startswith("/dev/vfio/")]
    report("released", open_vfio=open_vfio)


def _open_files(pid):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    names = []
    for fd in fds:
        try:
            names.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return names


if __name__ == "__main__":
    main()
