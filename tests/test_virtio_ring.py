"""The split-ring driver (sw/virtio_ring.py) against the reference model through RefBackend:
descriptor accounting, indirect tables, scatter lists split anywhere, event index and
notification suppression, index wrap, unused-buffer recovery and rogue-device checks."""

import random
import struct

import pytest

from memballoon.constants import (VRING_AVAIL_IDX, VRING_USED_FLAGS, VRING_USED_IDX,
                                  VRING_USED_RING)
from memballoon import constants as c
from memballoon.backend_ref import RefBackend
from memballoon.tb.scenarios import cmd
from memballoon.virtio_pci_modern import VirtioPciModernDevice
from memballoon.virtio_ring import (VirtqueueBroken, VirtqueueError, VirtqueueFull, VringDesc,
                                    VringVirtqueue, sg_split, vring_avail_event_offset,
                                    vring_create_virtqueue, vring_need_event,
                                    vring_new_virtqueue, vring_used_event_offset)
from model_util import asynctest, live

PAGE = 4096
GIVE = c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES
GET = c.VIRTIO_MEMBALLOON_GCMD_GET_PAGES
ALL = (1 << 64) - 1
NO_INDIRECT = ALL & ~(1 << c.VIRTIO_F_INDIRECT_DESC)
NO_EVENT_IDX = ALL & ~(1 << c.VIRTIO_F_RING_EVENT_IDX)


# --- pure helpers ----------------------------------------------------------------------------

@pytest.mark.parametrize("event, new, old, need", [
    (0, 1, 0, True), (0, 2, 1, False), (5, 10, 0, True), (10, 10, 0, False),
    (9, 10, 9, True), (0xFFFF, 1, 0xFFFE, True), (0xFFFF, 0, 0xFFFF, True),
    (0xFFFE, 0xFFFE, 0xFFFD, False), (3, 3, 3, False)])
def test_vring_need_event(event, new, old, need):
    """The index moved from old to new: did it pass event (modulo 2**16)?"""
    assert vring_need_event(event, new, old) is need


def test_desc_pack_and_sg_split():
    desc = VringDesc(0x1_2345_6789, 0x100, c.VRING_DESC_F_NEXT | c.VRING_DESC_F_WRITE, 7)
    raw = desc.pack()
    assert len(raw) == c.VRING_DESC_SIZE and raw[:8] == (0x1_2345_6789).to_bytes(8, "little")
    assert VringDesc.unpack(raw) == desc
    assert sg_split(b"abcdefgh", [3, 1, 3]) == [b"a", b"bc", b"", b"defgh"]
    assert sg_split(b"ab", []) == [b"ab"]
    with pytest.raises(ValueError, match="outside"):
        sg_split(b"ab", [3])


@asynctest
async def test_bad_buffers_are_refused():
    dev = await live()
    vq = dev.todevq
    for sgs, match in [([], "non-empty"), ([b"x"], "expected"), ([(b"x", 1)], "expected"),
                       ([("text", False)], "neither"), ([(-1, True)], "length"),
                       ([(1 << 32, True)], "length"),
                       ([((1 << 31), True), ((1 << 31), True)], "2\\*\\*32")]:
        with pytest.raises(ValueError, match=match):
            await vq.virtqueue_add_sgs(sgs, "t")
    with pytest.raises(ValueError, match="token"):
        await vq.virtqueue_add_sgs([(b"x", False)], None)
    assert vq.num_free == vq.num and vq.avail_idx_shadow == 0


@asynctest
async def test_ring_construction_checks():
    be = RefBackend()
    region = be.dma_alloc(4096)
    with pytest.raises(ValueError, match="power of two"):
        VringVirtqueue(0, 3, be, None, 0, (region, 0), (region, 64), (region, 128))
    with pytest.raises(ValueError, match="aligned"):
        VringVirtqueue(0, 2, be, None, 0, (region, 8), (region, 64), (region, 128))
    with pytest.raises(ValueError, match="outside the ring region"):
        vring_new_virtqueue(0, 256, be, None, 0, region, region.iova, region.iova + 4096,
                            region.iova + 8192)


# --- descriptors and buffers -----------------------------------------------------------------

@asynctest
async def test_free_descriptor_accounting_without_indirect():
    dev = await live(wanted=NO_INDIRECT, queue_size=4)
    vq = dev.todevq
    assert not vq.indirect
    for i in range(2):
        await vq.virtqueue_add_sgs([(cmd(GIVE, (i + 1) * PAGE)[:5], False),
                                    (cmd(GIVE, (i + 1) * PAGE)[5:], False)], i)
    assert vq.num_free == 0
    with pytest.raises(VirtqueueFull):
        await vq.virtqueue_add_outbuf([cmd(GIVE, 3 * PAGE)], 2)
    with pytest.raises(VirtqueueError, match="never fit"):
        await vq.virtqueue_add_outbuf([b"\0" * 8] * 5, 3)
    with pytest.raises(VirtqueueError, match="not negotiated"):
        await vq.virtqueue_add_outbuf([b"\0" * 8, b"\0" * 8], 3, indirect=True)
    assert await vq.virtqueue_kick()
    assert await vq.virtqueue_get_buf() == (0, 0)
    assert vq.num_free == 2
    assert await vq.virtqueue_get_buf() == (1, 0)
    assert vq.num_free == 4 and await vq.virtqueue_get_buf() is None
    assert dev.model.bitmap == {1, 2}


@asynctest
async def test_indirect_tables():
    dev = await live(queue_size=4)
    vq = dev.todevq
    assert vq.indirect
    data = cmd(GIVE, *(PAGE * i for i in range(1, 10)))
    pieces = sg_split(data, range(8, len(data), 8))         # 10 segments in a 4-entry queue
    await vq.virtqueue_add_outbuf(pieces, "many")
    assert vq.num_free == 3
    await vq.virtqueue_add_outbuf([data[:3], data[3:]], "forced-direct", indirect=False)
    assert vq.num_free == 1
    await vq.virtqueue_kick()
    assert [await vq.virtqueue_get_buf() for _ in range(2)] == [("many", 0), ("forced-direct", 0)]
    assert vq.num_free == 4
    assert dev.model.bitmap == set(range(1, 10))
    assert dev.model.counters["MGMT_VIOLATION_DOUBLE_GIVE"] == 9
    # No free entry: a buffer that only fits indirect is "full" (retry), not "never fits".
    for i in range(4):
        await vq.virtqueue_add_outbuf([cmd(GIVE, (20 + i) * PAGE)], i)
    with pytest.raises(VirtqueueFull):
        await vq.virtqueue_add_outbuf(pieces, "many-again")
    await vq.virtqueue_kick()
    assert [await vq.virtqueue_get_buf() for _ in range(4)] == [(i, 0) for i in range(4)]
    # A single segment goes direct unless indirect is forced.
    await vq.virtqueue_add_outbuf([cmd(GIVE, 11 * PAGE)], "one", indirect=True)
    await vq.virtqueue_kick()
    assert await vq.virtqueue_get_buf() == ("one", 0) and 11 in dev.model.bitmap


@asynctest
async def test_writable_segments_are_copied_back():
    dev = await live()
    vq = dev.todevq
    await vq.virtqueue_add_outbuf([cmd(GIVE, PAGE, 2 * PAGE)], "give")
    low, high = bytearray(b"\xEE" * 2), bytearray(b"\xEE" * 6)
    await vq.virtqueue_add_sgs([(cmd(GET, PAGE, 2 * PAGE, 3 * PAGE), False), (low, True),
                                (high, True)], "get", indirect=False)
    await vq.virtqueue_add_sgs([(cmd(GET, 9 * PAGE), False), (8, True)], "get-length")
    await vq.virtqueue_kick()
    assert [await vq.virtqueue_get_buf() for _ in range(3)] == \
        [("give", 0), ("get", 8), ("get-length", 8)]
    assert low + high == (2).to_bytes(8, "little")


@pytest.mark.parametrize("queue_size, wanted", [(1, ALL), (2, NO_INDIRECT), (4, NO_EVENT_IDX)])
@asynctest
async def test_ring_slots_wrap(queue_size, wanted):
    """Many more buffers than entries, one at a time and in batches."""
    dev = await live(wanted=wanted, queue_size=queue_size, bitmap_pages=1024)
    vq = dev.todevq
    page = 1
    for batch in [1] * 5 + [queue_size] * 5:
        for _ in range(batch):
            await vq.virtqueue_add_sgs([(cmd(GIVE, page * PAGE), False)], page)
            page += 1
        await vq.virtqueue_kick()
        got = [await vq.virtqueue_get_buf() for _ in range(batch)]
        assert got == [(p, 0) for p in range(page - batch, page)]
    assert dev.model.bitmap == set(range(1, page))
    assert vq.avail_idx_shadow == vq.last_used_idx == page - 1 and vq.num_free == queue_size


async def jump_indices(dev, vq, index):
    """Move both sides of an idle queue to ring index ``index`` (as after that many
    buffers), so the 16-bit wrap is reached without 65536 commands."""
    q = dev.model.queues[vq.index]
    q.last_avail = q.used_idx = index
    vq.avail_idx_shadow = vq.last_used_idx = index
    await vq.avail.write16(VRING_AVAIL_IDX, index)
    await vq.used.write16(VRING_USED_IDX, index)
    await vq.avail.write16(vring_used_event_offset(vq.num), index)
    await vq.used.write16(vring_avail_event_offset(vq.num), index)


@pytest.mark.parametrize("wanted", [ALL, NO_EVENT_IDX], ids=["event-idx", "flags"])
@asynctest
async def test_index_wraps_at_65536(wanted):
    dev = await live(wanted=wanted, queue_size=8)
    vq = dev.todevq
    await jump_indices(dev, vq, 0xFFFA)
    page = 1
    for batch in (3, 5, 8, 1):
        for _ in range(batch):
            await vq.virtqueue_add_outbuf([cmd(GIVE, page * PAGE)], page)
            page += 1
        assert await vq.virtqueue_kick()
        got = [await vq.virtqueue_get_buf() for _ in range(batch)]
        assert got == [(p, 0) for p in range(page - batch, page)]
    assert vq.avail_idx_shadow == (0xFFFA + page - 1) & 0xFFFF == 11
    assert dev.model.queues[c.TODEVQ].last_avail == 11
    assert dev.model.bitmap == set(range(1, page))
    assert dev.be.irq_count(2) == 4                 # one used notification per batch


# --- notification suppression (virtio 1.2 2.7.7, 2.7.10; C11) --------------------------------

@asynctest
async def test_kick_follows_avail_event():
    dev = await live()
    vq = dev.todevq
    notified = dev.model.counters
    await vq.virtqueue_add_outbuf([cmd(GIVE, PAGE)], 1)
    assert await vq.virtqueue_kick() and notified["MGMT_NOTIFY_COUNT_Q1"] == 1
    assert await vq.used.read16(vring_avail_event_offset(vq.num)) == 1
    # The device asks to hear of entry 5 only: entries 1..4 need no doorbell.
    await vq.used.write16(vring_avail_event_offset(vq.num), 5)
    for page in range(2, 6):
        await vq.virtqueue_add_outbuf([cmd(GIVE, page * PAGE)], page)
        assert not await vq.virtqueue_kick()
    await vq.virtqueue_add_outbuf([cmd(GIVE, 6 * PAGE)], 6)
    assert await vq.virtqueue_kick_prepare()
    assert notified["MGMT_NOTIFY_COUNT_Q1"] == 1
    assert await vq.virtqueue_notify() and notified["MGMT_NOTIFY_COUNT_Q1"] == 2
    assert dev.model.bitmap == set(range(1, 7))


@asynctest
async def test_kick_follows_no_notify_without_event_idx():
    dev = await live(wanted=NO_EVENT_IDX)
    vq = dev.todevq
    await vq.used.write16(VRING_USED_FLAGS, c.VRING_USED_F_NO_NOTIFY)
    await vq.virtqueue_add_outbuf([cmd(GIVE, PAGE)], 1)
    assert not await vq.virtqueue_kick()
    assert dev.model.counters["MGMT_NOTIFY_COUNT_Q1"] == 0
    await vq.used.write16(VRING_USED_FLAGS, 0)
    await vq.virtqueue_add_outbuf([cmd(GIVE, 2 * PAGE)], 2)
    assert await vq.virtqueue_kick()
    assert dev.model.bitmap == {1, 2}


@pytest.mark.parametrize("wanted", [ALL, NO_EVENT_IDX], ids=["event-idx", "flags"])
@asynctest
async def test_callbacks_disable_and_enable(wanted):
    dev = await live(wanted=wanted)
    vq = dev.todevq
    await vq.virtqueue_disable_cb()
    await vq.virtqueue_disable_cb()                 # idempotent
    for page in (1, 2):
        await vq.virtqueue_add_outbuf([cmd(GIVE, page * PAGE)], page)
        await vq.virtqueue_kick()
    assert dev.be.irq_count(2) == 0
    assert not await vq.virtqueue_enable_cb()       # used buffers are waiting
    assert [await vq.virtqueue_get_buf() for _ in range(2)] == [(1, 0), (2, 0)]
    assert await vq.virtqueue_enable_cb()
    await vq.virtqueue_add_outbuf([cmd(GIVE, 3 * PAGE)], 3)
    await vq.virtqueue_kick()
    assert dev.be.irq_count(2) == 1
    last = await vq.virtqueue_enable_cb_prepare()
    assert await vq.virtqueue_poll(last)


# --- reset and rogue devices -----------------------------------------------------------------

@asynctest
async def test_detach_unused_buffers_after_reset():
    dev = await live(queue_size=8)
    vq = dev.todevq
    for i in range(3):
        await vq.virtqueue_add_sgs([(cmd(GET, PAGE), False), (bytearray(8), True)], i)
    await dev.vdev.vp_modern_reset()
    tokens = []
    while (token := await vq.virtqueue_detach_unused_buf()) is not None:
        tokens.append(token)
    assert sorted(tokens) == [0, 1, 2]
    assert vq.num_free == 8 and vq.avail_idx_shadow == 0
    assert await vq.avail.read16(VRING_AVAIL_IDX) == 0


async def rogue_used(vq, head, length, count=1):
    """Write a used element and move used idx by ``count``, as a broken device would."""
    await vq.used.write(VRING_USED_RING, struct.pack("<II", head, length))
    await vq.used.write16(VRING_USED_IDX, count)


@pytest.mark.parametrize("head, length, count, match", [
    (5, 0, 1, "not the head"), ("head", 9, 1, "larger than"), ("head", 0, 3, "ahead")])
@asynctest
async def test_rogue_device_breaks_the_ring(head, length, count, match):
    be = RefBackend()
    notified = []

    async def notify(vq):
        notified.append(vq.index)
    vq = vring_create_virtqueue(1, 8, be, notify, 0)
    await vq.virtqueue_add_sgs([(b"\0" * 8, False), (bytearray(8), True)], "t")
    await rogue_used(vq, vq.free_head - 2 if head == "head" else head, length, count)
    with pytest.raises(VirtqueueBroken, match=match):
        await vq.virtqueue_get_buf()
    assert vq.broken
    with pytest.raises(VirtqueueBroken):
        await vq.virtqueue_add_outbuf([b"x"], "t2")
    assert not await vq.virtqueue_notify() and notified == []


@pytest.mark.parametrize("separate", [False, True])
@asynctest
async def test_created_rings_anywhere(separate):
    """vring_create_virtqueue's rings, programmed by hand: the device only uses the
    addresses it was given (virtio 1.2 2.7: three areas anywhere)."""
    be = RefBackend()
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    await vdev.vp_modern_reset()
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER)
    features = vdev.choose_features(await vdev.vp_modern_get_features())
    await vdev.vp_finalize_features(features)
    await be.alloc_irq_vectors(3)
    vqs = []
    for index in range(c.NUM_QUEUES):
        notify_area = await vdev.vp_modern_map_vq_notify(index)

        async def notify(vq, area=notify_area):
            await vdev.vp_notify(area, vq.index)
        vq = vring_create_virtqueue(index, 16, be, notify, features, separate=separate)
        await vdev.vp_modern_set_queue_size(index, 16)
        await vdev.vp_modern_queue_address(index, vq.desc.iova, vq.avail.iova, vq.used.iova)
        await vdev.vp_modern_queue_vector(index, index + 1)
        await vdev.vp_modern_set_queue_enable(index, True)
        vqs.append(vq)
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_DRIVER_OK)
    areas = {vqs[1].desc.region, vqs[1].avail.region, vqs[1].used.region}
    assert len(areas) == (3 if separate else 1)
    await vqs[1].virtqueue_add_outbuf([cmd(GIVE, PAGE)], "give")
    await vqs[1].virtqueue_kick()
    assert await vqs[1].virtqueue_get_buf() == ("give", 0)
    await vqs[0].virtqueue_add_inbuf([bytearray(16)], "msg")
    await vqs[0].virtqueue_kick()
    be.model.set_min_balloon(PAGE)
    assert await vqs[0].virtqueue_get_buf() == ("msg", 16)
    assert be.irq_count(1) == be.irq_count(2) == 1


# --- random streams --------------------------------------------------------------------------

def random_sgs(rng, data, writable):
    """``data`` cut at random places, then ``writable`` bytes in random pieces."""
    cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(4))] if data else []
    sgs = [(piece, False) for piece in sg_split(data, cuts)] if data else []
    while writable:
        piece = rng.randint(1, writable)
        sgs.append((bytearray(piece), True))
        writable -= piece
    return sgs


@pytest.mark.parametrize("seed", range(8))
@asynctest
async def test_random_buffers(seed):
    """Seeded: random queue size, features, splits, indirect choice, batching and callback
    toggling over valid and malformed commands; every buffer comes back in order with
    the length C5 gives it and the device's used ring agrees."""
    rng = random.Random(seed)
    print(f"seed={seed}")
    wanted = rng.choice([ALL, NO_INDIRECT, NO_EVENT_IDX, NO_INDIRECT & NO_EVENT_IDX])
    indirect_ok = bool(wanted >> c.VIRTIO_F_INDIRECT_DESC & 1)
    size = rng.choice([1, 2, 4, 8, 32] if indirect_ok else [2, 4, 8, 32])
    dev = await live(wanted=wanted, queue_size=size, bitmap_pages=256)
    vq = dev.todevq
    in_balloon = set()
    expected = []
    for _ in range(60):
        batch = []
        for _ in range(rng.randint(1, size)):
            page = rng.randrange(256)
            kind = rng.choice(["give", "get", "bad-length", "bad-code"])
            if kind == "give":
                data, writable, length = cmd(GIVE, page * PAGE), 0, 0
            elif kind == "get":
                data, writable, length = cmd(GET, page * PAGE), 8, 8
            elif kind == "bad-length":
                data, writable, length = cmd(GIVE, page * PAGE)[:rng.randrange(1, 16)], 0, 0
            else:
                data, writable, length = cmd(7, page * PAGE), rng.choice([0, 8]), 0
            sgs = random_sgs(rng, data, writable)
            if vq.indirect:
                indirect = rng.choice([None, True] if len(sgs) > size else [None, True, False])
            else:
                indirect = None
                if len(sgs) > size:         # direct descriptors only: at most two pieces
                    sgs = [(data, False)] + ([(bytearray(writable), True)] if writable else [])
            one = indirect or indirect is None and vq.indirect and len(sgs) > 1
            if (1 if one else len(sgs)) > vq.num_free:
                break
            await vq.virtqueue_add_sgs(sgs, len(expected), indirect)
            if kind == "give":
                in_balloon.add(page)
            elif kind == "get":
                in_balloon.discard(page)
            batch.append(len(expected))
            expected.append(length)
        if rng.random() < 0.3:
            await vq.virtqueue_disable_cb()
        elif rng.random() < 0.5:
            await vq.virtqueue_enable_cb()
        await vq.virtqueue_kick()
        for token in batch:
            assert await vq.virtqueue_get_buf() == (token, expected[token]), f"seed {seed}"
        assert vq.num_free == size, f"seed {seed}"
    assert dev.model.bitmap == in_balloon, f"seed {seed}"
    assert [length for _, length in dev.model.used[c.TODEVQ]] == expected, f"seed {seed}"
