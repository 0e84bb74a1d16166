"""The split-ring virtqueue engine: one per queue (C2: fromdevq 0, todevq 1)."""

from amaranth.hdl import Module, Mux, ResetInserter, Shape, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .... import constants as c
from ....params import DeviceParams
from ...pcie.dma import TAGS
from ...pcie.interface import DmaSignature
from ...virtio.common_cfg import QueueConfig
from ..data import DataFetcher, Segment
from ..interface import CommandHeader, CommandSignature
from ..narrow import ResponseNarrower
from ..park import ParkedHeads
from ..read_port import ReadPort
from ..realign import Realigner
from ..write_port import WritePort
from .avail import AvailFetcher
from .chain import RESULT_BYTES, ChainWalker, WritableSegment
from .indirect import TablePrefetcher
from .prefetch import PREFETCH_DEPTH, DescriptorPrefetcher
from .used import PendingCompletion, UsedWriter


def _fifo(m, name, shape, depth, producer, consumer, reset):
    """A ``SyncFIFOBuffered`` from stream ``producer`` to stream ``consumer``, emptied by
    ``reset``."""
    fifo = SyncFIFOBuffered(width=Shape.cast(shape).width, depth=depth)
    m.submodules[name] = ResetInserter(reset)(fifo)
    m.d.comb += [
        fifo.w_data.eq(producer.payload),
        fifo.w_en.eq(producer.valid),
        producer.ready.eq(fifo.w_rdy),
        consumer.payload.eq(fifo.r_data),
        consumer.valid.eq(fifo.r_rdy),
        fifo.r_en.eq(consumer.ready),
    ]
    return fifo


#: Readable segments walked ahead of the data reads, at most: a chain of more readable
#: buffers than the queue holds is walked twice (``ChainWalker``).
READABLE_QUEUE_DEPTH = 32
#: Chains walked ahead of the function, at most: their data reads are what a host's read
#: latency is hidden behind when commands are short (a 1-page command is one 16-byte
#: read), so as many as the DMA engine has tags.
HEADER_QUEUE_DEPTH = TAGS
#: Used elements published in one ``used->idx`` write, at most.
USED_BATCH = 8
#: The ReadPort's clients, first served first.
_READ_CLIENTS = ("used_writer", "avail_fetcher", "chain_walker", "descriptor_prefetcher",
                 "table_prefetcher", "data_fetcher")
#: Entries of an indirect table the ChainWalker reads at once: a table of up to 8 costs
#: one round trip (a 4 KiB command goes by in 256 clocks, about two round trips behind the
#: data in flight, while the next chain is walked). Its reads of the descriptor table stay
#: at 2 descriptors, so that a chain of one or two costs no extra beats.
_TABLE_WINDOW = 8
#: Beats of the ChainWalker's largest descriptor read (one 16-byte descriptor a beat),
#: which the narrower in front of it holds without stalling the read channel.
_DESCRIPTOR_READ_BEATS = _TABLE_WINDOW


class VirtqueueEngine(wiring.Component):
    """Serves one split virtqueue (virtio 1.2 2.7) for the device function behind
    ``command``.

    A doorbell or the queue starting makes it drain every available buffer (C11). The
    stages overlap, so commands reach the function back to back::

        AvailFetcher ─▶ DescriptorPrefetcher ─▶ TablePrefetcher ─▶ ChainWalker ─chains─▶ header
            ┌─readable──────────────────────────────────────────────────┘ │
            ▼                                                             └─writable─┐
        DataFetcher ─▶ Realigner ─▶ command.words      command.result ─▶ UsedWriter ◀┘

    Every stage keeps reads in flight for several commands, so that a host's read latency is
    paid once per pipeline fill, not once per command: the ring is read in batches, the head
    descriptors of every available chain are read ahead, several heads a read
    (``DescriptorPrefetcher``), and so is the start of each indirect table they point to
    (``TablePrefetcher``, which answers the walker's first read of it), the data of the next
    commands is read while earlier ones execute, and used elements are published without
    waiting on a read. The blocks share the DMA read channel through a ``ReadPort``
    (priority: used-ring suppression read, ring, the walker's descriptors, prefetched
    descriptors, prefetched tables, data; up to ``TAGS`` reads out) and the write channel
    through a ``WritePort``. Reads of data are credited against their buffer so that no beat
    ever waits on the function, and the in-order read channel cannot deadlock. Data moves
    ``DMA_READ_BEAT_BYTES`` (16) a clock, two command words a beat; the ChainWalker takes
    descriptors 8 bytes a beat, through a ``ResponseNarrower``.

    With ``parking`` (fromdevq, C6: a buffer held for a minimum must not hold up the
    malformed ones behind it), the function may park a command instead of completing it
    and unpark it later (``interface.py``). The engine keeps only the head of a parked
    command (``ParkedHeads``, one 16-bit entry per buffer up to the largest queue size)
    and walks its chain again when it is unparked: one more round trip, once per
    minimum, instead of storing every held chain's writable segments. Faults found on
    that walk stop the queue as on the first. Without ``parking`` (todevq) commands
    complete strictly in order and the heads go from the AvailFetcher straight to the
    DescriptorPrefetcher; with it they pass ParkedHeads::

        AvailFetcher ─heads─▶ ParkedHeads ─walks─▶ DescriptorPrefetcher
                                 ▲     ▲
              UsedWriter ─parked─┘     └─ command.unpark

    Attributes
    ----------
    dma : Out(DmaSignature())
        Only ring, descriptor-table and device-readable reads; only used-ring and
        device-writable writes; nothing while ``run`` is low (C12).
    config : In(QueueConfig)
    run : In(1)
        The queue may work: enabled, DRIVER_OK, not resetting. Its rise is a kick.
    event_idx, indirect : In(1)
        VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_INDIRECT_DESC negotiated.
    notify : In(1)
        Doorbell pulse.
    command : Out(CommandSignature(parking=parking))
    interrupt : Out(1)
        Pulse: a used-buffer notification is due (after suppression, C11); the used index
        is written before.
    fault : Out(1)
        Pulse: a C7 ring fault, of kind ``fault_kind``; the queue stops (no DMA) until
        ``reset``. A fault in the ring ahead of the function, or a failed read of a
        command's data, is raised once the commands before it are completed and
        published, or parked (a faulting chain never reaches the function; a command
        whose data failed gets an ``error`` word beat and is never completed); a failed
        write, or a failed suppression read, stops at once, with whatever is unpublished
        left unpublished.
    committed : Out(range(USED_BATCH + 1))
        Commands whose used elements the host now sees (a ``used->idx`` write handed to
        the hard IP): the function commits them (C7). Zero for writes started before a
        ``reset``.
    fault_kind : Out(c.RingFault)
        The kind of the last fault; NONE after ``reset``.
    reset : In(1)
        Virtio reset (C9): abandon everything; indices back to 0. The function must be
        reset with the engine: a result it still offered would complete the next command.
    busy : Out(1)
        DMA still outstanding: reads whose beats are still to come (they are drained
        after a reset or a fault), writes not yet handed to the hard IP.

    The sub-blocks are attributes (``avail_fetcher``, ``used_writer``, ...) so that tests
    can start the ring indices near the 16-bit wrap.

    Parameters
    ----------
    parking : bool
        Commands may be parked and unparked (fromdevq).
    data_buffer_depth : int
        Beats of readable data buffered ahead of the function.
    max_in_flight : int
        Data beats requested and not yet arrived. Two words per clock need at least the
        DMA read latency (in clocks) plus one read (32 beats): 320 covers a host answering
        after 1000 ns (250 clocks) and the hard IP's and DMA engine's 30-odd. A walker's
        own descriptor read waits behind them; the heads' descriptors do not, they are
        read ahead.
    """

    def __init__(self, params: DeviceParams, *, parking=False, data_buffer_depth=512,
                 max_in_flight=320):
        self._params = params
        self._parking = parking
        self.avail_fetcher = AvailFetcher()
        self.descriptor_prefetcher = DescriptorPrefetcher()
        self.table_prefetcher = TablePrefetcher(table_window=_TABLE_WINDOW,
                                                depth=PREFETCH_DEPTH)
        self.chain_walker = ChainWalker(table_window=_TABLE_WINDOW)
        self.data_fetcher = DataFetcher(buffer_depth=data_buffer_depth,
                                        max_in_flight=max_in_flight)
        self.realigner = Realigner()
        self.used_writer = UsedWriter(max_batch=USED_BATCH, parking=parking)
        if parking:
            self.parked_heads = ParkedHeads(depth=params.max_queue_size)
        super().__init__({
            "dma": Out(DmaSignature()),
            "config": In(QueueConfig),
            "run": In(1),
            "event_idx": In(1),
            "indirect": In(1),
            "notify": In(1),
            "command": Out(CommandSignature(parking=parking)),
            "interrupt": Out(1),
            "fault": Out(1),
            "fault_kind": Out(c.RingFault),
            "committed": Out(range(USED_BATCH + 1)),
            "reset": In(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        stopped = Signal()
        halt = self.reset | stopped

        avail = self.avail_fetcher
        prefetcher = self.descriptor_prefetcher
        tables = self.table_prefetcher
        walker = self.chain_walker
        fetcher = self.data_fetcher
        realigner = self.realigner
        used = self.used_writer
        for name, block in (("avail_fetcher", avail), ("descriptor_prefetcher", prefetcher),
                            ("table_prefetcher", tables), ("chain_walker", walker),
                            ("data_fetcher", fetcher), ("realigner", realigner),
                            ("used_writer", used)):
            m.submodules[name] = ResetInserter(halt)(block)

        m.submodules.read_port = read_port = ReadPort(clients=len(_READ_CLIENTS),
                                                        max_reads=TAGS)
        m.submodules.write_port = write_port = WritePort(clients=2)
        for port in (read_port, write_port):
            m.d.comb += [port.allow.eq(self.run), port.halt.eq(halt)]
        wiring.connect(m, read_port.read_cmd, wiring.flipped(self.dma.read_cmd))
        wiring.connect(m, wiring.flipped(self.dma.read_data), read_port.read_data)
        wiring.connect(m, write_port.write_cmd, wiring.flipped(self.dma.write_cmd))
        wiring.connect(m, write_port.write_data, wiring.flipped(self.dma.write_data))
        wiring.connect(m, wiring.flipped(self.dma.write_done), write_port.write_done)
        narrower = ResponseNarrower(depth=_DESCRIPTOR_READ_BEATS)
        m.submodules.descriptor_narrower = ResetInserter(halt)(narrower)
        for index, name in enumerate(_READ_CLIENTS):
            block = getattr(self, name)
            if block is walker:
                # Through the TablePrefetcher, which answers the tables it read ahead.
                wiring.connect(m, walker.read, tables.walker_read)
                wiring.connect(m, tables.forward_read, read_port.requests[index])
                wiring.connect(m, read_port.responses[index], tables.forward_response)
                wiring.connect(m, tables.walker_response, narrower.wide)
                wiring.connect(m, narrower.narrow, walker.response)
            else:
                wiring.connect(m, block.read, read_port.requests[index])
                wiring.connect(m, read_port.responses[index], block.response)
        for index, block in enumerate((used, avail)):
            wiring.connect(m, block.write, write_port.requests[index])
        m.d.comb += [
            avail.write_idle.eq(write_port.idle),
            used.published.eq(write_port.published),
        ]

        for block in (avail, prefetcher, walker, used):
            m.d.comb += block.config.eq(self.config)
        m.d.comb += [
            avail.event_idx.eq(self.event_idx),
            used.event_idx.eq(self.event_idx),
            walker.indirect.eq(self.indirect),
            tables.indirect.eq(self.indirect),
            tables.size.eq(self.config.size),
        ]

        # --- Kicks: a doorbell, or the queue starting (again after a halt) ---------------
        run_seen = Signal()
        m.d.sync += run_seen.eq(self.run & ~halt)
        m.d.comb += avail.kick.eq(self.notify | (self.run & ~run_seen))

        # --- Queues between the stages, emptied by a halt --------------------------------
        if self._parking:
            parked = self.parked_heads
            m.submodules.parked_heads = ResetInserter(halt)(parked)
            wiring.connect(m, avail.heads, parked.fresh)
            wiring.connect(m, used.parked, parked.park)
            wiring.connect(m, wiring.flipped(self.command.unpark), parked.unpark)
            wiring.connect(m, parked.walks, prefetcher.heads)
            heads_waiting = (avail.heads_queued | parked.walks.valid | ~prefetcher.idle |
                             ~tables.idle)
        else:
            m.d.comb += [
                prefetcher.heads.payload.head.eq(avail.heads.payload),
                prefetcher.heads.valid.eq(avail.heads.valid),
                avail.heads.ready.eq(prefetcher.heads.ready),
            ]
            heads_waiting = avail.heads_queued | ~prefetcher.idle | ~tables.idle
        wiring.connect(m, prefetcher.walks, tables.walks_in)
        wiring.connect(m, tables.walks_out, walker.heads)
        # A direct chain has at most max_queue_size buffers.
        _fifo(m, "readable_queue", Segment,
              min(READABLE_QUEUE_DEPTH, self._params.max_queue_size),
              walker.readable, fetcher.segments, halt)
        _fifo(m, "writable_queue", WritableSegment, 2 * RESULT_BYTES,
              walker.writable, used.segments, halt)
        wiring.connect(m, fetcher.beats, realigner.beats)
        wiring.connect(m, realigner.words, wiring.flipped(self.command.words))
        wiring.connect(m, wiring.flipped(self.command.result), used.results)

        # A header goes out when its completion can be queued for the UsedWriter.
        queued_header = stream.Signature(CommandHeader).create()
        completion = stream.Signature(PendingCompletion).create()
        header_queue = _fifo(m, "header_queue", CommandHeader, HEADER_QUEUE_DEPTH, walker.chains,
                             queued_header, halt)
        completion_queue = _fifo(m, "completion_queue", PendingCompletion, 4, completion,
                                 used.completions, halt)
        header = self.command.header
        m.d.comb += [
            header.payload.eq(queued_header.payload),
            header.valid.eq(queued_header.valid & completion.ready),
            queued_header.ready.eq(header.ready & completion.ready),
            completion.payload.head.eq(queued_header.payload.head),
            completion.payload.writable.eq(
                Mux(queued_header.payload.writable < RESULT_BYTES,
                    queued_header.payload.writable, RESULT_BYTES)),
            completion.valid.eq(header.valid & header.ready),
        ]

        # --- C7: the first fault stops the queue until reset -------------------------------
        # A fault found ahead of the function (ring and descriptor reads, the ring's
        # structure) waits until every command walked before it is completed and
        # published (or parked), as if buffers were taken one at a time; a fault while a
        # command is being read or completed (its data, its writes, the suppression read)
        # stops the queue at once.
        walker_fault = Signal()
        walker_kind = Signal(c.RingFault)
        avail_fault = Signal()
        avail_kind = Signal(c.RingFault)
        with m.If(walker.fault & ~walker.header_sent):
            m.d.sync += [walker_fault.eq(1), walker_kind.eq(walker.fault_kind)]
        with m.If(avail.fault):
            m.d.sync += [avail_fault.eq(1), avail_kind.eq(avail.fault_kind)]
        # FIFO levels, not their outputs, which lag behind a write.
        completed = (header_queue.level == 0) & (completion_queue.level == 0) & used.idle
        suppression = read_port.responses[_READ_CLIENTS.index("used_writer")]
        suppression_error = suppression.valid & suppression.payload.error
        # A command's data could not be read: the function has its error beat, and every
        # command before it is published once the UsedWriter is idle.
        data_error = Signal()
        words = self.command.words
        with m.If(words.valid & words.ready & words.payload.error):
            m.d.sync += data_error.eq(1)
        faults = (
            (write_port.error, c.RingFault.DMA_WRITE),
            (suppression_error, c.RingFault.DMA_READ),
            (data_error & used.idle, c.RingFault.DMA_READ),
            # A chain changed under its second walk: its header is out already.
            (walker.fault & walker.header_sent, walker.fault_kind),
            (walker_fault & completed, walker_kind),
            (avail_fault & completed & walker.idle & ~heads_waiting, avail_kind),
        )
        m.d.sync += self.fault.eq(0)
        with m.If(self.reset):
            m.d.sync += [
                stopped.eq(0),
                self.fault_kind.eq(c.RingFault.NONE),
                walker_fault.eq(0),
                avail_fault.eq(0),
                data_error.eq(0),
            ]
        with m.Elif(~stopped):
            for index, (detected, kind) in enumerate(faults):
                with (m.If if index == 0 else m.Elif)(detected):
                    m.d.sync += [
                        stopped.eq(1),
                        self.fault.eq(1),
                        self.fault_kind.eq(kind),
                    ]

        # --- C7: commits, except of writes a reset left behind ---------------------------
        stale = Signal()
        with m.If(self.reset):
            m.d.sync += stale.eq(1)
        with m.Elif(write_port.idle):
            m.d.sync += stale.eq(0)
        with m.If(write_port.published & ~stale & ~self.reset):
            m.d.comb += self.committed.eq(used.batch)

        m.d.comb += [
            self.interrupt.eq(used.interrupt),
            self.busy.eq(read_port.busy | write_port.busy),
        ]
        return m
