"""The available-ring reader of a split virtqueue (virtio 1.2 2.7.6)."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .... import constants as c
from ...pcie.interface import DMA_READ_BEAT_BYTES
from ...virtio.common_cfg import QueueConfig
from ..read_port import ReadRequest, ReadResponse
from ..write_port import WriteRequest


class AvailFetcher(wiring.Component):
    """Reads ``avail->idx`` and queues the head of every new buffer, until the ring is empty.

    A kick (doorbell, or the queue starting) starts a pass; kicks during a pass start
    another one, so nothing the driver published before its doorbell is missed and extra
    doorbells cost one index read (C11). Ring entries are read in batches up to the ring's
    end and the free space of the head queue.

    With EVENT_IDX, before going idle it writes ``avail_event`` (the next index it will
    read) into the used ring's tail, waits for the write, and reads ``avail->idx`` once
    more: the driver notifies only when it moves past ``avail_event`` (virtio 1.2 2.7.10).

    Attributes
    ----------
    config : In(QueueConfig)
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
        (AVAIL_AHEAD), or a ring read failed (DMA_READ); the fetcher then stops.
    fault_kind : Out(c.RingFault)
    """

    def __init__(self, max_heads=32):
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
        entry = Signal(range(DMA_READ_BEAT_BYTES // 2))    # ring entry within the beat

        last_avail = self.last_avail
        pending = Signal(16)
        position = Signal(16)
        in_ring = Signal(16)            # pending entries before the ring's end
        batch = Signal(range(self._max_heads + 1))
        ring_batch = Signal.like(batch)  # entries of the ring read being issued
        to_ring_end = config.size - position
        free = self._max_heads - queue.level
        m.d.comb += [
            pending.eq(avail_idx - last_avail),
            position.eq(last_avail & (config.size - 1)),
            in_ring.eq(Mux(pending < to_ring_end, pending, to_ring_end)),
            batch.eq(Mux(free < in_ring, free, in_ring)),
        ]

        with m.If(self.kick):
            m.d.sync += kick_pending.eq(1)

        def fail(kind):
            m.d.comb += [self.fault.eq(1), self.fault_kind.eq(kind)]
            m.next = "Faulted"

        beat = self.response.payload
        with m.FSM():
            with m.State("Idle"):
                with m.If(kick_pending):
                    m.d.sync += kick_pending.eq(self.kick)
                    m.next = "Read-Index"

            with m.State("Read-Index"):
                m.d.comb += [
                    self.read.valid.eq(1),
                    self.read.payload.command.address.eq(config.driver + 2),
                    self.read.payload.command.length.eq(2),
                ]
                with m.If(self.read.ready):
                    m.next = "Wait-Index"

            with m.State("Wait-Index"):
                m.d.comb += self.response.ready.eq(1)
                with m.If(self.response.valid):
                    with m.If(beat.error):
                        fail(c.RingFault.DMA_READ)
                    with m.Else():
                        m.d.sync += avail_idx.eq(beat.data[:16])
                        m.next = "Check"

            with m.State("Check"):
                with m.If(pending > config.size):
                    fail(c.RingFault.AVAIL_AHEAD)
                with m.Elif(pending != 0):
                    # batch != 0: with pending <= size there is ring up to its end, so
                    # only the head queue's room decides (not the min() chain; timing).
                    with m.If(free != 0):
                        m.d.sync += ring_batch.eq(batch)
                        m.next = "Read-Ring"
                with m.Elif(self.event_idx & ~(event_valid & (event_written == last_avail))):
                    m.next = "Write-Event"
                with m.Else():
                    m.next = "Idle"

            with m.State("Read-Ring"):
                m.d.comb += [
                    self.read.valid.eq(1),
                    self.read.payload.command.address.eq(config.driver + 4 + 2 * position),
                    self.read.payload.command.length.eq(2 * ring_batch),
                ]
                with m.If(self.read.ready):
                    m.next = "Unpack"

            with m.State("Unpack"):
                # Entries of a beat: count / 2 (the read starts at an even address).
                last_entry = entry == (beat.count >> 1) - 1
                m.d.comb += [
                    queue.w_data.eq(beat.data.word_select(entry, 16)),
                    queue.w_en.eq(self.response.valid & ~beat.error),
                    self.response.ready.eq(last_entry | beat.error),
                ]
                with m.If(self.response.valid & beat.error):
                    fail(c.RingFault.DMA_READ)
                with m.Elif(self.response.valid):
                    m.d.sync += [
                        last_avail.eq(last_avail + 1),
                        entry.eq(Mux(last_entry, 0, entry + 1)),
                    ]
                    with m.If(last_entry & beat.last):
                        m.next = "Check"

            with m.State("Write-Event"):
                m.d.comb += [
                    self.write.valid.eq(1),
                    self.write.payload.address.eq(config.device + 4 + 8 * config.size),
                    self.write.payload.length.eq(2),
                    self.write.payload.data.eq(last_avail),
                ]
                with m.If(self.write.ready):
                    m.d.sync += [
                        event_written.eq(last_avail),
                        event_valid.eq(1),
                    ]
                    m.next = "Wait-Write"

            with m.State("Wait-Write"):
                with m.If(self.write_idle):
                    m.next = "Read-Index"

            with m.State("Faulted"):
                pass

        return m
