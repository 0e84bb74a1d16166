"""The available-ring reader of a split virtqueue (virtio 1.2 2.7.6)."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from .... import constants as c
from ...pcie.interface import DMA_READ_BEAT_BYTES
from ...virtio.common_cfg import QueueConfig
from ..read_port import ReadRequest, ReadResponse
from ..write_port import WriteRequest

#: The host's cache line. A device read is a consistent snapshot only within one line: a
#: root complex may fetch the lines of one request in any order, so ring entries read
#: together with ``avail->idx`` are trusted only if they lie in its line.
CACHE_LINE_BYTES = 64
#: ``avail->idx`` and each ring entry: le16.
_ENTRY_BYTES = 2
_BEAT_ENTRIES = DMA_READ_BEAT_BYTES // _ENTRY_BYTES
_LINE_WORDS = CACHE_LINE_BYTES // _ENTRY_BYTES
#: The smallest head queue (see ``AvailFetcher.__init__``).
_MIN_HEADS = 3


class AvailFetcher(wiring.Component):
    """Reads ``avail->idx`` and queues the head of every new buffer, until the ring is empty.

    A kick (doorbell, or the queue starting) starts a pass; kicks during a pass start
    another one, so nothing the driver published before its doorbell is missed and extra
    doorbells cost one index read (C11). Ring entries are read in batches up to the ring's
    end and the free space of the head queue.

    When the next entry to read lies in ``avail->idx``'s cache line (``CACHE_LINE_BYTES``),
    the index read goes on to the end of that line (or the ring's end, or the head queue's
    room) and the entries the new index covers are queued from it: a buffer published
    alone costs one round trip, not two. The driver writes the entries before the index,
    and one line is read as one snapshot; entries past the index are ignored. Entries in
    other lines are read after the index, as ring reads. The driver area is only 2-byte
    aligned (virtio 1.2 2.7), so the index may lie anywhere in its line, even in its
    last two bytes (no entry shares that line). A failed index read is a DMA_READ fault
    whichever of its bytes failed (after the entries of its whole beats before).

    With EVENT_IDX, before going idle it writes ``avail_event`` (the next index it will
    read) into the used ring's tail, waits for the write, and reads ``avail->idx`` once
    more: the driver notifies only when it moves past ``avail_event`` (virtio 1.2 2.7.10).

    Attributes
    ----------
    config : In(QueueConfig)
        Holds still while the queue runs (what it implies is registered).
    event_idx : In(1)
        VIRTIO_F_RING_EVENT_IDX was negotiated.
    kick : In(1)
        Pulse: look at the ring.
    read, response :
        Ring reads, through the engine's ``ReadPort``.
    write : Out(stream.Signature(WriteRequest))
        ``avail_event`` writes, through the engine's ``WritePort``.
    write_idle : In(1)
        The ``WritePort`` has no write outstanding.
    heads : Out(stream.Signature(16))
        Heads of available descriptor chains, in ring order.
    heads_queued : Out(1)
        Heads read from the ring wait in the queue (``heads.valid`` may lag behind).
    last_avail : Out(16)
        The next ring index to read (``last_avail_idx``); counts modulo 2**16.
    fault : Out(1)
        Pulse, C7: ``avail->idx`` is more than the queue size ahead of ``last_avail``
        (AVAIL_AHEAD), or a ring read failed (DMA_READ); the fetcher then stops (and
        drops the beats of its read still to come).
    fault_kind : Out(c.RingFault)

    Parameters
    ----------
    max_heads : int
        Heads the queue holds (at least 3): read ahead of the chain walk.
    """

    def __init__(self, max_heads=32):
        # Entries are pushed a clock apart against the room counted from the queue's
        # level, which a SyncFIFOBuffered of depth 2 does not honour (its second write
        # right after the first is refused while the level says there is room).
        if max_heads < _MIN_HEADS:
            raise ValueError(f"max_heads must be at least {_MIN_HEADS}")
        self._max_heads = max_heads
        super().__init__({
            "config": In(QueueConfig),
            "event_idx": In(1),
            "kick": In(1),
            "read": Out(stream.Signature(ReadRequest)),
            "response": In(stream.Signature(ReadResponse)),
            "write": Out(stream.Signature(WriteRequest)),
            "write_idle": In(1),
            "heads": Out(stream.Signature(16)),
            "heads_queued": Out(1),
            "last_avail": Out(16),
            "fault": Out(1),
            "fault_kind": Out(c.RingFault),
        })

    def elaborate(self, platform):
        m = Module()
        config = self.config
        m.submodules.queue = queue = SyncFIFOBuffered(width=16, depth=self._max_heads)
        m.d.comb += [
            self.heads.payload.eq(queue.r_data),
            self.heads.valid.eq(queue.r_rdy),
            queue.r_en.eq(self.heads.ready),
            self.heads_queued.eq(queue.level != 0),
        ]

        avail_idx = Signal(16)          # avail->idx as last read
        event_written = Signal(16)      # avail_event as last written ...
        event_valid = Signal()          # ... if it was
        kick_pending = Signal()
        entry = Signal(range(_BEAT_ENTRIES))    # ring entry within the beat ...
        skip = Signal(range(CACHE_LINE_BYTES // DMA_READ_BEAT_BYTES))   # ... after these

        last_avail = self.last_avail
        # No entry is left before avail->idx: set in the states before Unpack, kept there
        # as entries are taken, so a take does not wait for the comparison (timing).
        caught_up = Signal()
        pending = Signal(16)
        position = Signal(16)
        # Pending entries before the ring's end, registered: taken in "Batch", a clock
        # after "Check" (timing).
        in_ring = Signal(16)
        ring_batch = Signal(range(self._max_heads + 1))  # entries of the ring read issued
        to_ring_end = config.size - position
        free = self._max_heads - queue.level
        m.d.comb += [
            pending.eq(avail_idx - last_avail),
            position.eq(last_avail & (config.size - 1)),
        ]
        m.d.sync += in_ring.eq(Mux(pending < to_ring_end, pending, to_ring_end))

        # --- The next index read, with the entries in its cache line ----------------------
        # The read starts at avail->idx: ring[i] is its le16 word i + 1.
        line_bits = exact_log2(CACHE_LINE_BYTES)
        idx_offset = (config.driver[:line_bits] + c.VRING_AVAIL_IDX)[:line_bits]
        after_idx = Signal(range(_LINE_WORDS))          # words of the line after idx
        line_entries = Signal(range(_LINE_WORDS))       # ring entries in idx's line
        m.d.comb += after_idx.eq(_LINE_WORDS - 1 - idx_offset // _ENTRY_BYTES)
        # Registered: the configuration holds still while the queue runs.
        m.d.sync += line_entries.eq(Mux(config.size < after_idx, config.size, after_idx))
        # Planned in Idle and Wait-Write, the states before Read-Index, where last_avail
        # holds still and the head queue only empties (the room planned for stays).
        line_read = Signal()            # the index read takes ring entries ...
        line_stop = Signal(range(_LINE_WORDS))          # ... ring[position .. line_stop - 1]
        first_word = Signal(range(_LINE_WORDS))         # the read's word of ring[position]
        line_position = position[:exact_log2(_LINE_WORDS)]      # if line_read
        room_stop = line_position + free

        def plan():
            m.d.sync += [
                line_read.eq((position < line_entries) & (free != 0)),
                line_stop.eq(Mux(room_stop < line_entries, room_stop, line_entries)),
                first_word.eq(line_position + 1),
            ]

        with m.If(self.kick):
            m.d.sync += kick_pending.eq(1)

        # Addresses from the configuration (set before the queue is enabled) a clock
        # ahead, and the ring read's in "Batch": no request's address is an add in the
        # clock it goes out (timing).
        index_address = Signal(64)
        event_address = Signal(64)
        ring_start = Signal(64)
        ring_address = Signal(64)
        m.d.sync += [
            index_address.eq(config.driver + c.VRING_AVAIL_IDX),
            ring_start.eq(config.driver + c.VRING_AVAIL_RING),
            event_address.eq(config.device + c.VRING_USED_RING +
                             c.VRING_USED_ELEM_SIZE * config.size),
        ]

        def fail(kind):
            m.d.comb += [self.fault.eq(1), self.fault_kind.eq(kind)]
            m.next = "Faulted"

        beat = self.response.payload
        with m.FSM():
            with m.State("Idle"):
                plan()
                with m.If(kick_pending):
                    m.d.sync += kick_pending.eq(self.kick)
                    m.next = "Read-Index"

            with m.State("Read-Index"):
                m.d.comb += [
                    self.read.valid.eq(1),
                    self.read.payload.command.address.eq(index_address),
                    self.read.payload.command.length.eq(
                        Mux(line_read, _ENTRY_BYTES * (line_stop + 1), _ENTRY_BYTES)),
                ]
                with m.If(self.read.ready):
                    m.next = "Wait-Index"

            with m.State("Wait-Index"):
                # The first beat: the index, then (line_read) entries, kept for Unpack.
                m.d.comb += self.response.ready.eq(~line_read | beat.error)
                with m.If(self.response.valid):
                    with m.If(beat.error):
                        fail(c.RingFault.DMA_READ)
                    with m.Else():
                        m.d.sync += avail_idx.eq(beat.data[:16])
                        with m.If(line_read):
                            m.d.sync += [
                                entry.eq(first_word % _BEAT_ENTRIES),
                                skip.eq(first_word // _BEAT_ENTRIES),
                            ]
                            m.next = "Check-Line"
                        with m.Else():
                            m.next = "Check"

            with m.State("Check-Line"):
                # The index before the entries it covers: a runaway one queues none.
                m.d.sync += caught_up.eq(pending == 0)
                with m.If(pending > config.size):
                    fail(c.RingFault.AVAIL_AHEAD)
                with m.Else():
                    m.next = "Unpack"

            with m.State("Check"):
                with m.If(pending > config.size):
                    fail(c.RingFault.AVAIL_AHEAD)
                with m.Elif(pending != 0):
                    # The batch is not 0: with pending <= size there is ring up to its
                    # end, so only the head queue's room decides (not the min() chain;
                    # timing).
                    with m.If(free != 0):
                        m.next = "Batch"
                with m.Elif(self.event_idx & ~(event_valid & (event_written == last_avail))):
                    m.next = "Write-Event"
                with m.Else():
                    m.next = "Idle"

            with m.State("Batch"):
                # in_ring is this index's now; the room only grows (the queue empties).
                m.d.sync += [
                    ring_batch.eq(Mux(free < in_ring, free, in_ring)),
                    ring_address.eq(ring_start + _ENTRY_BYTES * position),
                ]
                m.next = "Read-Ring"

            with m.State("Read-Ring"):
                m.d.comb += [
                    self.read.valid.eq(1),
                    self.read.payload.command.address.eq(ring_address),
                    self.read.payload.command.length.eq(_ENTRY_BYTES * ring_batch),
                ]
                m.d.sync += caught_up.eq(pending == 0)
                with m.If(self.read.ready):
                    m.next = "Unpack"

            with m.State("Unpack"):
                # Entries of a beat: count / 2 (reads start at even addresses). Beats
                # before the first entry and entries past avail->idx are dropped.
                last_entry = entry == (beat.count >> 1) - 1
                take = (skip == 0) & ~caught_up
                m.d.comb += [
                    queue.w_data.eq(beat.data.word_select(entry, 16)),
                    queue.w_en.eq(self.response.valid & ~beat.error & take),
                    self.response.ready.eq(last_entry | beat.error | ~take),
                ]
                with m.If(self.response.valid & beat.error):
                    fail(c.RingFault.DMA_READ)
                with m.Elif(self.response.valid):
                    with m.If(take):
                        m.d.sync += [last_avail.eq(last_avail + 1), caught_up.eq(pending == 1)]
                    with m.If(self.response.ready):
                        with m.If(skip != 0):
                            m.d.sync += skip.eq(skip - 1)
                        with m.Else():
                            m.d.sync += entry.eq(0)
                        with m.If(beat.last):
                            m.next = "Check"
                    with m.Else():
                        m.d.sync += entry.eq(entry + 1)

            with m.State("Write-Event"):
                m.d.comb += [
                    self.write.valid.eq(1),
                    self.write.payload.address.eq(event_address),
                    self.write.payload.length.eq(_ENTRY_BYTES),
                    self.write.payload.data.eq(last_avail),
                ]
                with m.If(self.write.ready):
                    m.d.sync += [
                        event_written.eq(last_avail),
                        event_valid.eq(1),
                    ]
                    m.next = "Wait-Write"

            with m.State("Wait-Write"):
                plan()
                with m.If(self.write_idle):
                    m.next = "Read-Index"

            with m.State("Faulted"):
                # Drops what is left of the read (the entries of a runaway index).
                m.d.comb += self.response.ready.eq(1)

        return m
