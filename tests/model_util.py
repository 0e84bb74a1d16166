"""Helpers for the tests that run the driver model (sw/) against the reference model:
coroutine tests under plain pytest (no plugin), and a live device with both rings."""

import asyncio
import functools
from types import SimpleNamespace

from memballoon import constants as c
from memballoon.backend_ref import RefBackend
from memballoon.refmodel import MemballoonRef
from memballoon.virtio_pci_modern import VirtioPciModernDevice
from memballoon.virtio_ring import vring_new_virtqueue


def asynctest(fn):
    """Make the coroutine function ``fn`` a plain test that runs it to completion."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


async def init_until_driver_ok(vdev, **kwargs):
    """virtio_pci_modern's init, stopping short of DRIVER_OK."""
    add_status = vdev.vp_modern_add_status
    vdev.vp_modern_add_status = lambda status: add_status(status & ~c.VIRTIO_CONFIG_S_DRIVER_OK)
    try:
        await vdev.init(**kwargs)
    finally:
        del vdev.vp_modern_add_status


async def live(model=None, page_size=None, wanted=None, queue_size=None, driver_ok=True,
               **model_kwargs):
    """A device at DRIVER_OK (virtio_pci_modern's init) with both rings wrapped."""
    be = RefBackend(model or MemballoonRef(**model_kwargs))
    vdev = VirtioPciModernDevice(be)
    init = vdev.init if driver_ok else functools.partial(init_until_driver_ok, vdev)
    await init(page_size=page_size, wanted=wanted, queue_size=queue_size)
    vqs = []
    for info in vdev.queues:
        async def notify(vq, info=info):
            await vdev.vp_notify(info.notify, info.index)
        vqs.append(vring_new_virtqueue(info.index, info.num, be, notify, vdev.accepted_features,
                                       info.ring, info.desc_addr, info.avail_addr,
                                       info.used_addr))
    return SimpleNamespace(be=be, model=be.model, vdev=vdev, fromdevq=vqs[0], todevq=vqs[1])
