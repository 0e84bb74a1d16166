"""The memballoon driver (sw/virtio_memballoon.py) against the reference model through
RefBackend: probe and negotiation, every command, the driver's refusal of bad requests,
fromdevq and the MIN_BALLOON policy, resets (host request, C7 fault, under load) and
seeded random command streams checked against the model's scoreboard."""

import random

import pytest

from memballoon import constants as c
from memballoon.backend_ref import RefBackend
from memballoon.refmodel import MemballoonRef
from memballoon.tb.scenarios import random_sg_policy
from memballoon.virtio_memballoon import (BalloonDeviceError, BalloonUsageError,
                                          DeviceNeedsReset, PagePool, VirtioMemballoon)
from memballoon.virtio_pci_modern import DeviceTimeout, VirtioError
from memballoon.virtio_ring import VirtqueueBroken, VringDesc
from model_util import asynctest

PAGE = 4096
POOL_BASE = 16 * PAGE           # guest pages the policy uses: window pages 16..
EXTRA_MEM = c.VIRTIO_MEMBALLOON_F_EXTRA_MEM


async def probe(model=None, pool_pages=64, page_size=PAGE, without=(), queue_size=None,
                **driver_kwargs):
    model = model or MemballoonRef(bitmap_pages=1024)
    be = RefBackend(model)
    pool = PagePool(POOL_BASE // PAGE * page_size, pool_pages, page_size) if pool_pages else None
    vb = VirtioMemballoon(be, pool=pool, **driver_kwargs)
    await vb.virtballoon_probe(page_size=page_size, without=without, queue_size=queue_size)
    return vb, be, model


def assert_agrees(vb, model, extra=()):
    """The driver's view is the device's: balloon pages, size, no violations (the driver
    never sends a bad request)."""
    host_owned_extra = {addr for addr in extra if addr not in vb.extra_pages}
    assert model.balloon_addresses() == set(vb.pages) | host_owned_extra
    assert model.balloon_pages == vb.num_pages
    bad = {name: value for name, value in model.counters.items()
           if value and ("VIOLATION" in name or "MALFORMED" in name)}
    assert bad == {} and model.faults == []


# --- probe -----------------------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [PAGE, 2 << 20, 1 << 30])
@pytest.mark.parametrize("without, ring", [
    ((), None), ((EXTRA_MEM,), None), ((c.VIRTIO_F_INDIRECT_DESC, c.VIRTIO_F_RING_EVENT_IDX), None),
    ((), ()), ((c.VIRTIO_F_ACCESS_PLATFORM,), (c.VIRTIO_F_INDIRECT_DESC,))],
    ids=["all", "no-extra", "no-ring-features", "build-without-ring", "mixed"])
@asynctest
async def test_negotiation_matrix(page_size, without, ring):
    model = MemballoonRef(bitmap_pages=64) if ring is None else \
        MemballoonRef(bitmap_pages=64, ring_features=ring)
    vb, be, model = await probe(model, pool_pages=8, page_size=page_size, without=without,
                                queue_size=8)
    accepted = vb.vdev.accepted_features
    assert model.driver_features == accepted and model.driver_ok
    assert vb.page_size == page_size == model.page_size
    assert vb.extra_mem == (EXTRA_MEM not in without)
    for bit, vq_flag in ((c.VIRTIO_F_INDIRECT_DESC, "indirect"), (c.VIRTIO_F_RING_EVENT_IDX,
                                                                   "event")):
        offered = model.offered_features >> bit & 1
        assert getattr(vb.todev_vq, vq_flag) == bool(offered and bit not in without)
        assert bool(accepted >> bit & 1) == getattr(vb.fromdev_vq, vq_flag)
    assert len(model.queues[c.FROMDEVQ].held) == 1      # one buffer posted (draft init)
    await vb.give_pages([page_size, 3 * page_size])
    assert await vb.get_pages([3 * page_size]) == [3 * page_size]
    model.set_min_balloon(-page_size)
    assert await vb.wait_for_host(1e-3) == [-page_size if vb.extra_mem else 0]
    assert_agrees(vb, model)


@asynctest
async def test_probe_errors():
    with pytest.raises(VirtioError, match="not offered"):
        await probe(page_size=8192, pool_pages=0)
    for bit in (c.VIRTIO_F_VERSION_1, c.VIRTIO_MEMBALLOON_F_4K):
        with pytest.raises(BalloonUsageError, match="cannot be left out"):
            await probe(without=(bit,))
    with pytest.raises(BalloonUsageError, match="not a feature bit"):
        await probe(without=(64,))
    with pytest.raises(BalloonUsageError, match="page pool"):
        vb = VirtioMemballoon(RefBackend(), pool=PagePool(0, 4, 2 << 20))
        await vb.virtballoon_probe()
    with pytest.raises(ValueError, match="aligned"):
        PagePool(PAGE, 4, 3000)
    with pytest.raises(ValueError, match="max_pages_per_cmd"):
        VirtioMemballoon(RefBackend(), max_pages_per_cmd=0)


# --- commands --------------------------------------------------------------------------------

@asynctest
async def test_give_is_split_into_commands_sent_together():
    vb, be, model = await probe(max_pages_per_cmd=4)
    pages = [PAGE * i for i in range(1, 11)]
    await vb.give_pages(pages)
    assert model.counters["MGMT_CMD_GIVE"] == 3 and model.counters["MGMT_NOTIFY_COUNT_Q1"] == 1
    assert list(vb.pages) == pages and vb.num_pages == 10
    assert_agrees(vb, model)


@asynctest
async def test_get_returns_the_granted_prefix():
    vb, be, model = await probe(max_pages_per_cmd=2)
    pages = [PAGE * i for i in range(1, 9)]
    await vb.give_pages(pages)
    model.set_return_budget(3)
    assert await vb.get_pages(pages[:6]) == pages[:3]       # stops at the short command
    assert model.counters["MGMT_CMD_GET"] == 2 and model.get_grants == [(2, 2), (2, 1)]
    assert list(vb.pages) == pages[3:] and vb.num_pages == 5
    assert await vb.get_pages([pages[7]]) == []
    assert_agrees(vb, model)


@asynctest
async def test_exchange_pages():
    vb, be, model = await probe()
    await vb.give_pages([PAGE, 2 * PAGE, 3 * PAGE])
    model.set_return_budget(0)                               # does not apply to EXCHANGE
    await vb.exchange_pages([PAGE, 2 * PAGE], [5 * PAGE, PAGE])   # PAGE leaves and re-enters
    assert set(vb.pages) == {PAGE, 3 * PAGE, 5 * PAGE} and vb.num_pages == 3
    assert model.counters["MGMT_PAGES_LEFT"] == 2 and model.counters["MGMT_PAGES_ENTERED"] == 5
    assert_agrees(vb, model)


@asynctest
async def test_extra_memory():
    model = MemballoonRef(bitmap_pages=1024)
    model.set_extra_range(512, 4)
    extra = [PAGE * p for p in range(512, 516)]
    vb, be, model = await probe(model)
    assert await vb.get_pages(extra[:2]) == extra[:2]
    assert vb.num_pages == -2 and vb.extra_pages == set(extra[:2])
    assert_agrees(vb, model, extra)
    with pytest.raises(BalloonUsageError, match="already the guest's"):
        await vb.get_pages([extra[0]])
    await vb.exchange_pages([extra[2]], [extra[0]])         # more extra for an extra page
    assert vb.extra_pages == {extra[1], extra[2]} and vb.num_pages == -2
    await vb.give_pages([extra[1]])
    assert vb.num_pages == -1
    assert_agrees(vb, model, extra)


BAD_REQUESTS = [
    ("give_pages", ([],), "at least one"),
    ("give_pages", ([PAGE + 8],), "not aligned"),
    ("give_pages", ([PAGE, PAGE],), "appears twice"),
    ("give_pages", ([2 * PAGE],), "given twice"),
    ("give_pages", ([-PAGE],), "64-bit"),
    ("give_pages", ([1 << 64],), "64-bit"),
    ("give_pages", (["0x1000"],), "64-bit"),
    ("get_pages", ([3 * PAGE],), "not in the balloon"),
    ("get_pages", ([PAGE * 7 + 1],), "not aligned"),
    ("exchange_pages", ([2 * PAGE], []), "at least one"),
    ("exchange_pages", ([2 * PAGE], [3 * PAGE, 4 * PAGE]), "pairs"),
    ("exchange_pages", ([3 * PAGE], [4 * PAGE]), "not in the balloon"),
    ("exchange_pages", ([2 * PAGE], [5 * PAGE]), "given twice"),
]


@pytest.mark.parametrize("method, args, match", BAD_REQUESTS,
                         ids=[f"{m}-{match}" for m, _, match in BAD_REQUESTS])
@asynctest
async def test_bad_requests_never_reach_the_device(method, args, match):
    vb, be, model = await probe(without=(EXTRA_MEM,))
    await vb.give_pages([2 * PAGE, 5 * PAGE])
    notified = model.counters["MGMT_NOTIFY_COUNT_Q1"]
    with pytest.raises(BalloonUsageError, match=match):
        await getattr(vb, method)(*args)
    assert model.counters["MGMT_NOTIFY_COUNT_Q1"] == notified
    assert set(vb.pages) == {2 * PAGE, 5 * PAGE}
    assert_agrees(vb, model)


@asynctest
async def test_device_answers_are_checked():
    """A device that breaks C5 or C6 is reported, not believed (the model is patched
    into a rogue device here)."""
    vb, be, model = await probe(without=(EXTRA_MEM,))
    await vb.give_pages([PAGE])
    model._execute = lambda data, writable: (8, (9).to_bytes(8, "little"))
    with pytest.raises(BalloonDeviceError, match="granted 9 of 1"):
        await vb.get_pages([PAGE])
    model._execute = lambda data, writable: (0, b"")
    with pytest.raises(BalloonDeviceError, match="used.len 0"):
        await vb.get_pages([PAGE])
    assert PAGE in vb.pages
    for payload, match in ((b"\1" * 16, "unknown fromdevq command"),
                           ((32768).to_bytes(8, "little") + (-1).to_bytes(8, "little",
                                                                         signed=True),
                            "negative minimum")):
        queue = model.queues[c.FROMDEVQ]
        head = queue.held.pop(0)
        _, [(addr, _)] = model._walk(queue, head)
        model.memory.write(addr, payload)
        model._publish(c.FROMDEVQ, head, 16)
        with pytest.raises(BalloonDeviceError, match=match):
            await vb.virtballoon_fromdev()
    model._execute = lambda data, writable: (8, bytes(8))
    with pytest.raises(VirtqueueBroken, match="larger than"):
        await vb.give_pages([2 * PAGE])             # the ring catches a GIVE with len 8


# --- fromdevq and the policy (C6) ------------------------------------------------------------

@asynctest
async def test_min_balloon_messages_keep_one_buffer_posted():
    vb, be, model = await probe()
    for value in (PAGE, 2 * PAGE, 3 * PAGE):
        model.set_min_balloon(value)
    # The first went into the posted buffer; the third replaced the second (C6).
    assert model.counters["MGMT_MIN_DROPPED"] == 1
    assert await vb.virtballoon_fromdev() == [PAGE, 3 * PAGE]
    assert vb.min_balloon == 3 * PAGE and len(model.queues[c.FROMDEVQ].held) == 1
    assert await vb.wait_for_host(10e-6) == []
    assert be.now() >= 10e-6


@asynctest
async def test_host_sets_minimum_while_the_driver_waits():
    vb, be, model = await probe()
    start = be.now()
    be.schedule(50e-6, lambda: model.set_min_balloon(5 * PAGE))
    assert await vb.wait_for_host(1e-3) == [5 * PAGE]
    assert be.now() - start == pytest.approx(50e-6)


@asynctest
async def test_policy_follows_the_minimum():
    vb, be, model = await probe(pool_pages=16)
    model.set_min_balloon(10 * PAGE - 100)                  # rounded up to pages
    await vb.wait_for_host(1e-3)
    assert vb.towards_target() == 10
    assert await vb.update_balloon_size() == 10 and vb.num_pages == 10
    assert await vb.update_balloon_size() == 0
    model.set_min_balloon(4 * PAGE)
    await vb.wait_for_host(1e-3)
    model.set_return_budget(2)                              # partial grant
    assert await vb.update_balloon_size() == -2 and vb.num_pages == 8
    assert await vb.update_balloon_size() == 0              # budget spent: nothing granted
    model.set_return_budget(c.MGMT_UNLIMITED_BUDGET)
    assert await vb.update_balloon_size() == -4 and vb.num_pages == 4
    assert len(vb.pool.free) == 12
    vb.deflate = False
    model.set_min_balloon(0)
    await vb.wait_for_host(1e-3)
    assert await vb.update_balloon_size() == 0 and vb.num_pages == 4
    model.set_min_balloon(100 * PAGE)                       # more than the pool has
    await vb.wait_for_host(1e-3)
    assert await vb.update_balloon_size() == 12 and vb.pool.free == []
    assert_agrees(vb, model)


@asynctest
async def test_negative_minimum_deflates_to_empty_only():
    vb, be, model = await probe()
    await vb.fill_balloon(3)
    model.set_min_balloon(-8 * PAGE)
    assert await vb.wait_for_host(1e-3) == [-8 * PAGE]
    assert vb.towards_target() == -3                # never asks for extra memory
    assert await vb.update_balloon_size() == -3 and vb.num_pages == 0
    assert await vb.update_balloon_size() == 0


@asynctest
async def test_policy_needs_a_pool():
    vb, be, model = await probe(pool_pages=0)
    model.set_min_balloon(PAGE)
    await vb.wait_for_host(1e-3)
    with pytest.raises(BalloonUsageError, match="PagePool"):
        await vb.update_balloon_size()
    with pytest.raises(BalloonUsageError, match="PagePool"):
        await vb.leak_balloon(1)


# --- resets ----------------------------------------------------------------------------------

@asynctest
async def test_host_reset_request():
    """C10: the host asks for a reset; the driver stops sending and recovers with reset():
    the balloon is empty on both sides and its pages are the guest's again."""
    vb, be, model = await probe(pool_pages=8)
    await vb.fill_balloon(5)
    model.request_reset()
    with pytest.raises(DeviceNeedsReset):
        await vb.fill_balloon(1)
    assert model.counters["MGMT_CMD_GIVE"] == 1
    await vb.reset()
    assert vb.num_pages == 0 and vb.pages == {} and len(vb.pool.free) == 8
    assert model.bitmap == set() and model.driver_ok
    await vb.fill_balloon(2)
    assert_agrees(vb, model)


@asynctest
async def test_ring_fault_is_noticed_while_waiting():
    vb, be, model = await probe()
    await vb.give_pages([PAGE])
    await vb.todev_vq.add_raw_chain([VringDesc(0, 8, c.VRING_DESC_F_NEXT, 0)], "loop")
    with pytest.raises(DeviceNeedsReset):
        await vb.give_pages([2 * PAGE])
    assert model.faults == [(c.TODEVQ, c.RingFault.CHAIN_LOOP)]
    assert model.bitmap == {1}                              # C7: nothing lost
    await vb.reset()
    await vb.give_pages([2 * PAGE])
    assert model.bitmap == {2}


@asynctest
async def test_a_silent_device_times_out():
    vb, be, model = await probe(timeout=20e-6)
    await be.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY, 2)   # no bus mastering
    with pytest.raises(DeviceTimeout, match="todevq"):
        await vb.give_pages([PAGE])
    assert be.now() >= 20e-6


@asynctest
async def test_remove_returns_everything():
    vb, be, model = await probe(pool_pages=8)
    await vb.fill_balloon(6)
    await vb.todev_vq.virtqueue_add_outbuf([b"\0" * 16], "never kicked")
    await vb.virtballoon_remove()
    assert len(vb.pool.free) == 8 and vb.num_pages == 0
    assert vb.todev_vq.num_free == vb.todev_vq.num and vb.fromdev_vq.num_free == vb.fromdev_vq.num
    assert model.device_status == 0 and model.bitmap == set()


# --- random streams --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
@asynctest
async def test_random_command_streams(seed):
    """Seeded: random page size, features, queue size, splits and indirect, chunking; a
    stream of gives, gets (with partial grants), exchanges, extra memory, minimums with
    the policy, host reset requests and resets with buffers outstanding. After every step
    the driver and the model agree."""
    rng = random.Random(seed)
    print(f"seed={seed}")
    page_size = rng.choice([PAGE, 2 << 20])
    without = rng.choice([(), (EXTRA_MEM,), (c.VIRTIO_F_INDIRECT_DESC,),
                          (c.VIRTIO_F_RING_EVENT_IDX, EXTRA_MEM)])
    queue_size = rng.choice([2, 4, 16, 64] if c.VIRTIO_F_INDIRECT_DESC in without
                            else [1, 2, 4, 16, 64])
    model = MemballoonRef(bitmap_pages=512)
    extra = [page_size * p for p in range(480, 490)]
    model.set_extra_range(480, 10)
    vb, be, model = await probe(model, pool_pages=48, page_size=page_size, without=without,
                                queue_size=queue_size,
                                max_pages_per_cmd=rng.choice([1, 3, 256]))
    vb.sg_policy = random_sg_policy(rng, vb)
    for step in range(80):
        op = rng.choice(["give", "give", "get", "get", "exchange", "extra", "budget", "min",
                         "reset-request", "reset-outstanding"])
        context = f"seed {seed} step {step} op {op}"
        if op == "give" and vb.pool.free:
            pages = [vb.pool.alloc_page() for _ in range(rng.randint(1, len(vb.pool.free)))]
            await vb.give_pages(pages)
        elif op == "get" and vb.pages:
            wanted = rng.sample(list(vb.pages), rng.randint(1, len(vb.pages)))
            granted = await vb.get_pages(wanted)
            assert granted == wanted[:len(granted)], context
            for addr in granted:
                if addr not in vb.extra_origin:     # extra memory stays in use
                    vb.pool.free_page(addr)
        elif op == "exchange" and vb.pages and vb.pool.free:
            count = rng.randint(1, min(len(vb.pages), len(vb.pool.free)))
            wanted = rng.sample(list(vb.pages), count)
            give = [vb.pool.alloc_page() for _ in range(count)]
            await vb.exchange_pages(wanted, give)
            for addr in wanted:
                if addr not in vb.extra_origin:
                    vb.pool.free_page(addr)
        elif op == "extra" and vb.extra_mem:
            free_extra = [addr for addr in extra
                          if addr not in vb.extra_pages and addr not in vb.pages]
            if free_extra:
                got = await vb.get_pages(rng.sample(free_extra, rng.randint(1, len(free_extra))))
                if got and rng.random() < 0.5:
                    await vb.give_pages(got)
        elif op == "budget":
            model.set_return_budget(rng.choice([0, 1, 5, c.MGMT_UNLIMITED_BUDGET]))
        elif op == "min":
            model.set_min_balloon(rng.randint(-4, 40) * page_size)
            await vb.wait_for_host(1e-3)
            await vb.update_balloon_size()
        elif op == "reset-request":
            model.request_reset()
            with pytest.raises(DeviceNeedsReset):
                await vb.give_pages([1000 * page_size])     # refused before it is sent
            await vb.reset()
            model.set_return_budget(c.MGMT_UNLIMITED_BUDGET)
        elif op == "reset-outstanding":
            # Buffers the device has not used, a doorbell it cannot serve yet (no bus
            # mastering): the reset drops both, and the new queues start clean.
            for _ in range(rng.randint(1, vb.todev_vq.num_free)):
                await vb.todev_vq.virtqueue_add_outbuf([b"\0" * 16], "outstanding")
            await be.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY, 2)
            await vb.todev_vq.virtqueue_notify()
            await vb.reset()
            await be.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER, 2)
            assert len(model.queues[c.FROMDEVQ].held) == 1, context
        assert_agrees(vb, model, extra)
        pool_pages = set(vb.pool.free) | set(vb.pages)
        assert len(pool_pages) == len(vb.pool.free) + len(vb.pages), context
    assert model.counters["MGMT_RING_FAULTS"] == 0
