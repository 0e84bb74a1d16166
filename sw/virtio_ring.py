"""Split virtqueue driver (virtio 1.2 2.7), named after Linux ``drivers/virtio/virtio_ring.c``.

A :class:`VringVirtqueue` is ``struct vring_virtqueue`` for one split ring: a free list of
descriptors, the shadow avail index and flags, the last seen used index, indirect tables
when VIRTIO_F_INDIRECT_DESC was negotiated, and the event-index rules of
VIRTIO_F_RING_EVENT_IDX. Buffers are scatter lists of ``(segment, writable)`` pairs, where
a segment is bytes (its content) or an int (its length); a writable ``bytearray`` receives
what the device wrote when the buffer comes back (the DMA API's unmap copy). The ring and
every buffer live in DMA memory from the backend, so the same code runs against the
reference model, the RTL and the board.

For fault injection (C7) there is a low-level API that writes descriptors and the avail
ring exactly as told (:meth:`VringVirtqueue.add_raw_chain`, :meth:`publish_avail`,
:meth:`write_avail_idx`, :meth:`map_raw`).
"""

import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from . import constants as c

__all__ = ["VringDesc", "VringVirtqueue", "VirtqueueError", "VirtqueueFull", "VirtqueueBroken",
           "DmaPool", "vring_create_virtqueue", "vring_new_virtqueue", "vring_need_event",
           "sg_split", "vring_used_event_offset", "vring_avail_event_offset"]



def vring_used_event_offset(num):
    """``used_event`` sits after the avail ring's ``num`` entries (EVENT_IDX)."""
    return c.VRING_AVAIL_RING + 2 * num


def vring_avail_event_offset(num):
    """``avail_event`` sits after the used ring's ``num`` elements (EVENT_IDX)."""
    return c.VRING_USED_RING + c.VRING_USED_ELEM_SIZE * num


def vring_need_event(event_idx, new_idx, old):
    """True when moving an index from ``old`` to ``new_idx`` passes ``event_idx``
    (virtio 1.2 2.7.7/2.7.10; Linux ``vring_need_event``)."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old) & 0xFFFF


class VringDesc(NamedTuple):
    """``struct vring_desc``: le64 addr, le32 len, le16 flags, le16 next."""
    addr: int
    len: int
    flags: int = 0
    next: int = 0

    _FORMAT = struct.Struct("<QIHH")

    def pack(self):
        return self._FORMAT.pack(*self)

    @classmethod
    def unpack(cls, raw):
        return cls(*cls._FORMAT.unpack(raw))


def sg_split(data, cuts):
    """``data`` cut at the byte offsets ``cuts`` (any order, duplicates give empty pieces):
    the pieces of a scatter list that splits a command anywhere (C5)."""
    bounds = [0, *sorted(cuts), len(data)]
    if bounds[1] < 0 or bounds[-2] > len(data):
        raise ValueError(f"cuts {cuts} outside the {len(data)} bytes")
    return [bytes(data[a:b]) for a, b in zip(bounds, bounds[1:])]


class VirtqueueError(Exception):
    """A virtqueue cannot do what was asked."""


class VirtqueueFull(VirtqueueError):
    """Not enough free descriptors now (Linux returns -ENOSPC); retry after get_buf."""


class VirtqueueBroken(VirtqueueError):
    """The device made a mess of the ring (Linux ``BAD_RING``); the queue is dead."""


@dataclass
class _Buf:
    """A piece of DMA memory: ``size`` bytes at ``offset`` in ``region``."""
    region: object
    offset: int
    size: int

    @property
    def iova(self):
        return self.region.iova + self.offset


class DmaPool:
    """Small DMA buffers carved from backend regions and reused once freed (Linux's
    ``dma_pool``): power-of-two size classes of at least 16 bytes, 16-byte aligned."""

    MIN_CLASS = 16

    def __init__(self, backend, slab=1 << 16):
        self._backend = backend
        self._slab_size = slab
        self._slab = None
        self._used = 0
        self._free = defaultdict(list)

    def alloc(self, size):
        size_class = max(self.MIN_CLASS, 1 << (max(size, 1) - 1).bit_length())
        if self._free[size_class]:
            return self._free[size_class].pop()
        if size_class > self._slab_size:
            return _Buf(self._backend.dma_alloc(size_class), 0, size_class)
        if self._slab is None or self._used + size_class > self._slab.size:
            self._slab = self._backend.dma_alloc(self._slab_size)
            self._used = 0
        buf = _Buf(self._slab, self._used, size_class)
        self._used += size_class
        return buf

    def free(self, buf):
        self._free[buf.size].append(buf)


@dataclass
class _Area:
    """One ring part: ``region`` at ``offset``."""
    region: object
    offset: int

    @property
    def iova(self):
        return self.region.iova + self.offset

    async def read16(self, off):
        return int.from_bytes(await self.region.read(self.offset + off, 2), "little")

    async def write16(self, off, value):
        await self.region.write(self.offset + off, (value & 0xFFFF).to_bytes(2, "little"))

    async def read(self, off, length):
        return await self.region.read(self.offset + off, length)

    async def write(self, off, data):
        await self.region.write(self.offset + off, data)


@dataclass
class _DescState:
    """``vring_desc_state_split`` plus what unmapping needs."""
    token: object
    slots: list                 # descriptor table entries the chain holds
    bufs: list = field(default_factory=list)   # (_Buf, length, sink bytearray or None)
    indir: _Buf = None
    in_len: int = 0             # device-writable bytes offered
    raw: bool = False           # built by add_raw_chain: the device may write anywhere


def _check_sgs(sgs):
    """Normalise a scatter list to (content bytes or None, length, writable, sink)."""
    if not isinstance(sgs, (list, tuple)) or not sgs:
        raise ValueError("a buffer needs a non-empty list of (segment, writable) pairs")
    out = []
    for i, item in enumerate(sgs):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or \
                not isinstance(item[1], bool):
            raise ValueError(f"segment {i}: expected (bytes or length, writable: bool), "
                             f"got {item!r}")
        seg, writable = item
        if isinstance(seg, int) and not isinstance(seg, bool):
            length, content, sink = seg, None, None
        elif isinstance(seg, (bytes, bytearray, memoryview)):
            length, content = len(seg), bytes(seg)
            sink = seg if writable and isinstance(seg, bytearray) else None
        else:
            raise ValueError(f"segment {i}: {type(seg).__name__} is neither bytes nor a length")
        if not 0 <= length <= c.VRING_DESC_MAX_LEN:
            raise ValueError(f"segment {i}: length {length} outside 0..{c.VRING_DESC_MAX_LEN}")
        out.append((content, length, writable, sink))
    if sum(length for _, length, _, _ in out) > c.VRING_DESC_MAX_LEN:
        raise ValueError("a chain carries at most 2**32 - 1 bytes (virtio 1.2 2.7.5.1)")
    return out


class VringVirtqueue:
    """``struct vring_virtqueue`` of a split ring (see module docstring).

    ``notify`` is an async callable ``notify(vq)`` that rings the device's doorbell;
    ``features`` the negotiated feature word (INDIRECT_DESC and RING_EVENT_IDX are
    looked at); ``desc``, ``avail`` and ``used`` are ``(DmaRegion, offset)`` of the three
    ring parts, whose memory must be zero.
    """

    def __init__(self, index, num, backend, notify, features, desc, avail, used, name=None):
        if not isinstance(num, int) or num < 1 or num > 32768 or num & (num - 1):
            raise ValueError(f"queue size {num!r} is not a power of two in 1..32768")
        self.index = index
        self.num = num
        self.name = name or f"vq{index}"
        self.notify = notify
        self.pool = DmaPool(backend)
        self.desc, self.avail, self.used = (_Area(*part) for part in (desc, avail, used))
        for part, align in ((self.desc, c.VRING_DESC_ALIGN), (self.avail, c.VRING_AVAIL_ALIGN),
                            (self.used, c.VRING_USED_ALIGN)):
            if part.iova % align:
                raise ValueError(f"{self.name}: ring part at {part.iova:#x} is not "
                                 f"{align}-byte aligned (virtio 1.2 2.7)")
        #: Host supports indirect buffers / publishes the event indices.
        self.indirect = bool(features >> c.VIRTIO_F_INDIRECT_DESC & 1)
        self.event = bool(features >> c.VIRTIO_F_RING_EVENT_IDX & 1)
        self.broken = False
        self.num_free = num
        self.free_head = 0
        self._next = [(i + 1) % num for i in range(num)]    # desc_extra[i].next
        self.avail_idx_shadow = 0
        self.avail_flags_shadow = 0
        self.last_used_idx = 0
        self.num_added = 0
        self._desc_state = {}

    # --- adding buffers ----------------------------------------------------------------

    def _bad_ring(self, message):
        self.broken = True
        raise VirtqueueBroken(f"{self.name}: {message}")

    def _check_usable(self):
        if self.broken:
            raise VirtqueueBroken(f"{self.name} is broken; reset the device")

    def _take_descs(self, count):
        slots, i = [], self.free_head
        for _ in range(count):
            slots.append(i)
            i = self._next[i]
        self.free_head = i
        self.num_free -= count
        return slots

    async def _write_desc(self, index, desc):
        await self.desc.write(c.VRING_DESC_SIZE * index, desc.pack())

    async def _expose(self, head):
        """Put ``head`` in the next avail slot and publish the new avail idx."""
        slot = self.avail_idx_shadow & (self.num - 1)
        await self.avail.write16(c.VRING_AVAIL_RING + 2 * slot, head)
        self.avail_idx_shadow = self.avail_idx_shadow + 1 & 0xFFFF
        await self.avail.write16(c.VRING_AVAIL_IDX, self.avail_idx_shadow)
        self.num_added += 1
        if self.num_added == 0xFFFF:        # old = new - num_added must stay meaningful
            await self.virtqueue_kick()

    async def virtqueue_add_sgs(self, sgs, token, indirect=None):
        """Expose one buffer, a scatter list of ``(bytes or length, writable)`` segments
        in chain order, identified by ``token`` (returned by :meth:`virtqueue_get_buf`).
        ``indirect`` forces (True) or forbids (False) an indirect table; by default one
        is used, as Linux does, when negotiated and the buffer has several segments."""
        if token is None:
            raise ValueError("token must not be None (get_buf returns None for 'nothing')")
        segments = _check_sgs(sgs)
        self._check_usable()
        total = len(segments)
        if indirect and not self.indirect:
            raise VirtqueueError(f"{self.name}: indirect descriptors were not negotiated "
                                 f"(VIRTIO_F_INDIRECT_DESC)")
        if total > self.num and not (self.indirect and indirect is not False):
            raise VirtqueueError(f"{self.name}: {total} segments never fit a queue of "
                                 f"{self.num} without indirect descriptors")
        use_indirect = (self.indirect and total > 1 and self.num_free > 0
                        if indirect is None else indirect)
        needed = 1 if use_indirect else total
        if self.num_free < needed:
            raise VirtqueueFull(f"{self.name}: {needed} descriptors needed, "
                                f"{self.num_free} free")

        state = _DescState(token, [])
        descs = []
        for content, length, writable, sink in segments:
            buf = self.pool.alloc(length)
            if content:
                await buf.region.write(buf.offset, content)
            state.bufs.append((buf, length, sink))
            if writable:
                state.in_len += length
            descs.append(VringDesc(buf.iova, length,
                                   c.VRING_DESC_F_WRITE if writable else 0))

        def chained(positions):
            return [d._replace(flags=d.flags | c.VRING_DESC_F_NEXT, next=positions[i + 1])
                    if i + 1 < len(descs) else d for i, d in enumerate(descs)]

        if use_indirect:
            state.indir = self.pool.alloc(c.VRING_DESC_SIZE * total)
            table = b"".join(d.pack() for d in chained(range(total)))
            await state.indir.region.write(state.indir.offset, table)
            state.slots = self._take_descs(1)
            await self._write_desc(state.slots[0], VringDesc(
                state.indir.iova, len(table), c.VRING_DESC_F_INDIRECT))
        else:
            state.slots = self._take_descs(total)
            for slot, desc in zip(state.slots, chained(state.slots)):
                await self._write_desc(slot, desc)
        self._desc_state[state.slots[0]] = state
        await self._expose(state.slots[0])

    async def virtqueue_add_outbuf(self, sgs, token, indirect=None):
        """A buffer of device-readable segments only (``sgs``: bytes or lengths)."""
        await self.virtqueue_add_sgs([(seg, False) for seg in sgs], token, indirect)

    async def virtqueue_add_inbuf(self, sgs, token, indirect=None):
        """A buffer of device-writable segments only (``sgs``: bytearrays or lengths)."""
        await self.virtqueue_add_sgs([(seg, True) for seg in sgs], token, indirect)

    # --- notifying the device (virtio 1.2 2.7.13.4) ----------------------------------------

    async def virtqueue_kick_prepare(self):
        """Whether the device wants a notification for the buffers added since the last
        call: ``avail_event`` with EVENT_IDX, else the used ring's NO_NOTIFY flag."""
        new = self.avail_idx_shadow
        old = new - self.num_added & 0xFFFF
        self.num_added = 0
        if self.event:
            event = await self.used.read16(vring_avail_event_offset(self.num))
            return vring_need_event(event, new, old)
        return not await self.used.read16(c.VRING_USED_FLAGS) & c.VRING_USED_F_NO_NOTIFY

    async def virtqueue_notify(self):
        """Ring the doorbell; False on a broken queue."""
        if self.broken:
            return False
        await self.notify(self)
        return True

    async def virtqueue_kick(self):
        """``kick_prepare`` then ``notify`` when needed; True if the device was notified."""
        if await self.virtqueue_kick_prepare():
            return await self.virtqueue_notify()
        return False

    # --- used buffers ---------------------------------------------------------------------

    async def _more_used(self):
        used_idx = await self.used.read16(c.VRING_USED_IDX)
        ahead = used_idx - self.last_used_idx & 0xFFFF
        if ahead > len(self._desc_state):
            self._bad_ring(f"used idx {used_idx} is {ahead} ahead of {self.last_used_idx} "
                           f"with {len(self._desc_state)} buffers outstanding")
        return ahead != 0

    async def _detach_buf(self, head):
        """Return the chain's descriptors to the free list and unmap its buffers (copying
        device-writable bytes into their bytearrays); the buffer's token."""
        state = self._desc_state.pop(head)
        self._next[state.slots[-1]] = self.free_head
        self.free_head = state.slots[0]
        self.num_free += len(state.slots)
        for buf, length, sink in state.bufs:
            if sink is not None:
                sink[:] = await buf.region.read(buf.offset, length)
            self.pool.free(buf)
        if state.indir is not None:
            self.pool.free(state.indir)
        return state.token

    async def virtqueue_get_buf(self):
        """The next used buffer as ``(token, len)``, or None when there is none."""
        self._check_usable()
        if not await self._more_used():
            return None
        slot = self.last_used_idx & (self.num - 1)
        head, length = struct.unpack(
            "<II", await self.used.read(c.VRING_USED_RING + c.VRING_USED_ELEM_SIZE * slot,
                                        c.VRING_USED_ELEM_SIZE))
        state = self._desc_state.get(head)
        if state is None:
            self._bad_ring(f"used id {head} is not the head of a buffer in flight")
        if length > state.in_len and not state.raw:
            self._bad_ring(f"used len {length} is larger than the {state.in_len} writable "
                           f"bytes of buffer {head}")
        token = await self._detach_buf(head)
        self.last_used_idx = self.last_used_idx + 1 & 0xFFFF
        if self.event and not self.avail_flags_shadow & c.VRING_AVAIL_F_NO_INTERRUPT:
            await self.avail.write16(vring_used_event_offset(self.num), self.last_used_idx)
        return token, length

    async def virtqueue_disable_cb(self):
        """Ask the device for no used-buffer notifications (a hint, virtio 1.2 2.7.7):
        NO_INTERRUPT, or with EVENT_IDX a ``used_event`` just behind us (65535 away)."""
        if not self.avail_flags_shadow & c.VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow |= c.VRING_AVAIL_F_NO_INTERRUPT
            if self.event:
                await self.avail.write16(vring_used_event_offset(self.num),
                                         self.last_used_idx - 1)
            else:
                await self.avail.write16(c.VRING_AVAIL_FLAGS, self.avail_flags_shadow)

    async def virtqueue_enable_cb_prepare(self):
        """Ask for notifications again; returns the opaque value for :meth:`virtqueue_poll`."""
        if self.avail_flags_shadow & c.VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow &= ~c.VRING_AVAIL_F_NO_INTERRUPT
            if not self.event:
                await self.avail.write16(c.VRING_AVAIL_FLAGS, self.avail_flags_shadow)
        if self.event:
            await self.avail.write16(vring_used_event_offset(self.num), self.last_used_idx)
        return self.last_used_idx

    async def virtqueue_poll(self, last_used_idx):
        """True if buffers were used since :meth:`virtqueue_enable_cb_prepare` returned
        ``last_used_idx``."""
        return await self.used.read16(c.VRING_USED_IDX) != last_used_idx

    async def virtqueue_enable_cb(self):
        """Re-enable notifications; False if buffers are already pending (then process
        them, as a notification may have been missed)."""
        return not await self.virtqueue_poll(await self.virtqueue_enable_cb_prepare())

    async def virtqueue_detach_unused_buf(self):
        """After a device reset: take back one buffer the device never used (its token),
        or None when none is left."""
        if not self._desc_state:
            return None
        head = next(iter(self._desc_state))
        token = await self._detach_buf(head)
        self.avail_idx_shadow = self.avail_idx_shadow - 1 & 0xFFFF
        await self.avail.write16(c.VRING_AVAIL_IDX, self.avail_idx_shadow)
        return token

    def virtqueue_get_vring_size(self):
        return self.num

    # --- low-level access for fault injection (C7) -------------------------------------------

    async def map_raw(self, data):
        """Copy ``data`` into DMA memory that stays allocated; its address."""
        buf = self.pool.alloc(len(data))
        await buf.region.write(buf.offset, bytes(data))
        return buf.iova

    async def add_raw_chain(self, descs, token):
        """Write ``descs`` (:class:`VringDesc`) into free descriptor entries and expose the
        first as a buffer, exactly as given: a ``next`` that is a position in ``descs``
        is translated to the entry that position got, any other value is written as is
        (an index out of range, ...). Flags are not checked. Returns the entries used."""
        self._check_usable()
        if not descs or len(descs) > self.num_free:
            raise VirtqueueFull(f"{self.name}: {len(descs)} raw descriptors, "
                                f"{self.num_free} free")
        slots = self._take_descs(len(descs))
        for slot, desc in zip(slots, descs):
            nxt = slots[desc.next] if desc.next < len(slots) else desc.next
            await self._write_desc(slot, desc._replace(next=nxt))
        self._desc_state[slots[0]] = _DescState(token, slots, raw=True)
        await self._expose(slots[0])
        return slots

    async def publish_avail(self, head):
        """Put any ``head`` (even out of range) in the avail ring; nothing is tracked."""
        await self._expose(head)

    async def write_avail_idx(self, idx):
        """Write avail ``idx`` as given (the shadow index does not move)."""
        await self.avail.write16(c.VRING_AVAIL_IDX, idx)


def _layout(num):
    """Offsets of avail and used in one region holding a whole ring, and its size."""
    avail = -(-c.vring_desc_size(num) // c.VRING_AVAIL_ALIGN) * c.VRING_AVAIL_ALIGN
    used = -(-(avail + c.vring_avail_size(num)) // c.VRING_USED_ALIGN) * c.VRING_USED_ALIGN
    return avail, used, used + c.vring_used_size(num)


def vring_new_virtqueue(index, num, backend, notify, features, ring, desc_addr, avail_addr,
                        used_addr, name=None):
    """A virtqueue over ring memory allocated elsewhere (what ``setup_vq`` of
    :mod:`memballoon.virtio_pci_modern` placed in ``ring``, a DmaRegion)."""
    parts = []
    for what, addr, size in (("descriptor table", desc_addr, c.vring_desc_size(num)),
                             ("avail ring", avail_addr, c.vring_avail_size(num)),
                             ("used ring", used_addr, c.vring_used_size(num))):
        offset = addr - ring.iova
        if offset < 0 or offset + size > ring.size:
            raise ValueError(f"{what} at {addr:#x}+{size} is outside the ring region "
                             f"{ring.iova:#x}+{ring.size:#x}")
        parts.append((ring, offset))
    return VringVirtqueue(index, num, backend, notify, features, *parts, name=name)


def vring_create_virtqueue(index, num, backend, notify, features, separate=False, name=None):
    """Allocate a ring of ``num`` entries from ``backend`` and return its virtqueue: one
    region with the usual layout, or with ``separate`` three regions (virtio 1.x lets
    the areas lie anywhere). Program its addresses with ``vp_modern_queue_address``
    (``vq.desc.iova``, ``vq.avail.iova``, ``vq.used.iova``)."""
    if separate:
        parts = [(backend.dma_alloc(size), 0)
                 for size in (c.vring_desc_size(num), c.vring_avail_size(num), c.vring_used_size(num))]
    else:
        avail, used, size = _layout(num)
        ring = backend.dma_alloc(size)
        parts = [(ring, 0), (ring, avail), (ring, used)]
    return VringVirtqueue(index, num, backend, notify, features, *parts, name=name)
