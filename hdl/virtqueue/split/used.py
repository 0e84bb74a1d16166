"""Completes commands: result bytes, used ring and used-buffer notifications (virtio 1.2
2.7.8, 2.7.10; C11)."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .... import constants as c
from ...virtio.common_cfg import QueueConfig
from ..interface import CommandResult
from ..read_port import ReadRequest, ReadResponse
from ..write_port import WriteRequest
from .chain import RESULT_BYTES, WritableSegment

#: Bytes of a ring index, of ``avail->flags`` and of an avail ring entry (``used_event``
#: follows the entries).
_INDEX_BYTES = 2


class PendingCompletion(data.Struct):
    """A command the function has taken: its used element id and how many writable bytes
    a result may fill (min(writable, 16): the sum of its ``WritableSegment``s)."""
    head: 16
    writable: range(RESULT_BYTES + 1)


class UsedWriter(wiring.Component):
    """For each result, in command order: writes its bytes into the chain's writable
    segments (never past them, C12: a ``write_count`` above the chain's writable bytes
    writes those only), then the used element (id = head, len = ``used_len``).

    ``used->idx`` is published once no further result is waiting, or after ``max_batch``
    elements; one publication at a time is in the ``WritePort``, so that ``batch`` is the
    one ``published`` reports.

    Notifications are decided beside that, never holding it up (a host answers a read
    after hundreds of clocks): when no suppression read is out and publications have
    been handed to the hard IP since the last one (a read then cannot pass them), it
    reads ``avail->flags`` (without EVENT_IDX: no interrupt under
    VRING_AVAIL_F_NO_INTERRUPT) or ``used_event`` (with EVENT_IDX: ``vring_need_event``
    over [index of the previous check, index of the last handed publication), as
    Linux's ``vhost_notify``), and raises ``interrupt`` accordingly. Results are taken
    and published while the read is out; the next read covers those publications.

    With ``parking``, a result with ``park`` set writes nothing and publishes nothing: its
    chain's segments are popped and its head goes out on ``parked``, for the engine to
    walk the chain again later (the parked command's next result completes it).

    Attributes
    ----------
    config : In(QueueConfig)
    event_idx : In(1)
    completions : In(stream.Signature(PendingCompletion))
    segments : In(stream.Signature(WritableSegment))
    results : In(stream.Signature(CommandResult))
    write : Out(stream.Signature(WriteRequest))
        Through the engine's ``WritePort``.
    published : In(1)
        The ``WritePort``'s pulse: the ``used->idx`` write has been handed to the hard IP.
    read, response :
        The suppression read, through the engine's ``ReadPort``.
    parked : Out(stream.Signature(16))
        With ``parking``: heads of parked commands, in command order.
    used_idx : Out(16)
        The next used element's index (counts modulo 2**16).
    batch : Out(range(max_batch + 1))
        Used elements the last ``used->idx`` write published (marked ``publish`` for
        the ``WritePort``: once it is done, the commands are committed, C7).
    interrupt : Out(1)
        Pulse: send a used-buffer notification.
    idle : Out(1)
        Every result taken is published and its notification decided.
    """

    def __init__(self, max_batch=8, *, parking=False):
        self._max_batch = max_batch
        self._parking = parking
        members = {
            "config": In(QueueConfig),
            "event_idx": In(1),
            "completions": In(stream.Signature(PendingCompletion)),
            "segments": In(stream.Signature(WritableSegment)),
            "results": In(stream.Signature(CommandResult)),
            "write": Out(stream.Signature(WriteRequest)),
            "published": In(1),
            "read": Out(stream.Signature(ReadRequest)),
            "response": In(stream.Signature(ReadResponse)),
            "used_idx": Out(16),
            "batch": Out(range(max_batch + 1)),
            "interrupt": Out(1),
            "idle": Out(1),
        }
        if parking:
            members["parked"] = Out(stream.Signature(16))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        config = self.config
        used_idx = self.used_idx

        head = Signal(16)
        park = Signal()
        used_len = Signal(32)
        result_data = Signal(8 * RESULT_BYTES)
        to_write = Signal(range(RESULT_BYTES + 1))     # result bytes not written yet
        written = Signal(range(RESULT_BYTES + 1))      # result bytes written
        segment_bytes = Signal(range(RESULT_BYTES + 1))  # segment bytes not popped yet
        unpublished = Signal(range(self._max_batch + 1))

        # The publication in the WritePort, [first, last) of the used ring.
        handing = Signal()
        handing_first = Signal(16)
        handing_last = Signal(16)
        # Publications handed to the hard IP and not checked: [first, last).
        unchecked = Signal()
        unchecked_first = Signal(16)
        unchecked_last = Signal(16)
        # The suppression check: from its read's request to its decision.
        checking = Signal()
        requesting = Signal()
        deciding = Signal()
        check_last = Signal(16)
        check_span = Signal(16)                         # new - old
        distance = Signal(16)                           # new - used_event - 1
        suppressed = Signal()                           # VRING_AVAIL_F_NO_INTERRUPT

        # The ring's addresses, from the queue's configuration (set before the queue is
        # enabled, virtio 1.2 4.1.4.3.2) a clock ahead, so that no request's address is
        # an add of the configuration in the clock it goes out (timing); the next used
        # element's offset in the ring registered with ``used_idx``.
        used_ring = Signal(64)
        used_index_address = Signal(64)
        check_address = Signal(64)
        m.d.sync += [
            used_ring.eq(config.device + c.VRING_USED_RING),
            used_index_address.eq(config.device + c.VRING_USED_IDX),
            check_address.eq(Mux(self.event_idx,
                                 config.driver + c.VRING_AVAIL_RING + _INDEX_BYTES * config.size,
                                 config.driver + c.VRING_AVAIL_FLAGS)),
        ]
        next_used_idx = Signal(16)
        element_offset = Signal(range(c.VRING_USED_ELEM_SIZE << 16))
        m.d.comb += next_used_idx.eq(used_idx)
        m.d.sync += element_offset.eq(c.VRING_USED_ELEM_SIZE * (next_used_idx & (config.size - 1)))

        result = self.results.payload
        completion = self.completions.payload
        segment = self.segments.payload
        piece = Mux(segment.length < to_write, segment.length, to_write)

        def take_result():
            """Takes the next result if there is one (``m.next`` stays otherwise)."""
            with m.If(self.results.valid & self.completions.valid):
                m.d.comb += [
                    self.results.ready.eq(1),
                    self.completions.ready.eq(1),
                ]
                m.d.sync += [
                    head.eq(completion.head),
                    used_len.eq(result.used_len),
                    result_data.eq(result.write_data),
                    to_write.eq(result.write_count),
                    written.eq(0),
                    segment_bytes.eq(completion.writable),
                ]
                m.next = "Write-Data"
                with m.If(completion.writable == 0):     # nothing to write or pop
                    m.next = "Write-Element"
                if self._parking:
                    m.d.sync += park.eq(result.park)
                    with m.If(result.park):
                        m.d.sync += to_write.eq(0)
                        with m.If(completion.writable == 0):
                            m.next = "Park"

        m.d.sync += self.interrupt.eq(0)
        with m.FSM():
            with m.State("Idle"):
                m.d.comb += self.idle.eq((unpublished == 0) & ~handing & ~unchecked &
                                         ~checking)
                with m.If(unpublished != 0):
                    m.next = "Publish"
                take_result()                   # a waiting result goes first

            with m.State("Write-Data"):
                # One segment per step; those past the result's bytes are only popped.
                with m.If(self.segments.valid):
                    # piece == 0, without the comparison inside ``piece`` in front of it.
                    with m.If((segment.length == 0) | (to_write == 0)):
                        m.d.comb += self.segments.ready.eq(1)
                    with m.Else():
                        m.d.comb += [
                            self.write.valid.eq(1),
                            self.write.payload.address.eq(segment.address),
                            self.write.payload.length.eq(piece),
                            self.write.payload.data.eq(result_data >> (written * 8)),
                            self.segments.ready.eq(self.write.ready),
                        ]
                    with m.If(self.segments.ready):
                        m.d.sync += [
                            segment_bytes.eq(segment_bytes - segment.length),
                            to_write.eq(to_write - piece),
                            written.eq(written + piece),
                        ]
                        with m.If(segment.length == segment_bytes):     # the chain's last
                            m.next = "Write-Element"
                            if self._parking:
                                with m.If(park):        # no used element for it
                                    m.next = "Park"

            with m.State("Write-Element"):
                element = Signal(64)
                m.d.comb += [
                    element.eq(head | (used_len << 32)),
                    self.write.valid.eq(1),
                    self.write.payload.address.eq(used_ring + element_offset),
                    self.write.payload.length.eq(c.VRING_USED_ELEM_SIZE),
                    self.write.payload.data.eq(element),
                ]
                with m.If(self.write.ready):
                    m.d.comb += next_used_idx.eq(used_idx + 1)
                    m.d.sync += [
                        used_idx.eq(next_used_idx),
                        unpublished.eq(unpublished + 1),
                    ]
                    with m.If(unpublished + 1 == self._max_batch):
                        m.next = "Publish"
                    with m.Else():
                        # The next result in this clock: one clock per command that
                        # writes no bytes.
                        m.next = "Idle"
                        take_result()

            if self._parking:
                with m.State("Park"):
                    m.d.comb += [
                        self.parked.valid.eq(1),
                        self.parked.payload.eq(head),
                    ]
                    with m.If(self.parked.ready):
                        m.next = "Idle"

            with m.State("Publish"):
                # ``handing`` only falls here: ``valid`` stays up once raised.
                m.d.comb += [
                    self.write.valid.eq(~handing),
                    self.write.payload.address.eq(used_index_address),
                    self.write.payload.length.eq(_INDEX_BYTES),
                    self.write.payload.data.eq(used_idx),
                    self.write.payload.publish.eq(1),
                ]
                with m.If(self.write.valid & self.write.ready):
                    m.d.sync += [
                        handing.eq(1),
                        handing_first.eq(used_idx - unpublished),
                        handing_last.eq(used_idx),
                        self.batch.eq(unpublished),
                        unpublished.eq(0),
                    ]
                    m.next = "Idle"

        # --- Suppression checks, beside the publications --------------------------------
        # Issued on the WritePort's ``published`` rather than on its ``idle``: under a
        # steady stream of element writes the WritePort is seldom idle, and waiting for it
        # would hold notifications back for as long as the stream lasts.
        issue = unchecked & ~checking
        with m.If(self.read.ready):             # ``ready`` may come without ``valid``
            m.d.sync += requesting.eq(0)
        with m.If(issue):
            m.d.sync += [
                checking.eq(1),
                requesting.eq(1),
                unchecked.eq(0),
                check_last.eq(unchecked_last),
                check_span.eq(unchecked_last - unchecked_first),
            ]
        with m.If(self.published & handing):
            m.d.sync += [
                handing.eq(0),
                unchecked.eq(1),
                unchecked_last.eq(handing_last),
            ]
            with m.If(~unchecked | issue):
                m.d.sync += unchecked_first.eq(handing_first)

        m.d.comb += [
            self.read.valid.eq(requesting),
            self.read.payload.command.address.eq(check_address),
            self.read.payload.command.length.eq(_INDEX_BYTES),
            # Only this block's reads come here; the ReadPort needs them taken at once.
            self.response.ready.eq(1),
        ]

        # The answer is registered, then compared: vring_need_event(used_event, new, old)
        # is (new - used_event - 1) < (new - old), modulo 2**16. A failed read stops the
        # queue (C7, the engine sees it) and leaves the check open.
        value = self.response.payload.data[:16]
        with m.If(self.response.valid & ~self.response.payload.error):
            m.d.sync += [
                distance.eq(check_last + ~value),
                suppressed.eq((value & c.VRING_AVAIL_F_NO_INTERRUPT).any()),
                deciding.eq(1),
            ]
        with m.If(deciding):
            m.d.sync += [
                self.interrupt.eq(Mux(self.event_idx, distance < check_span, ~suppressed)),
                deciding.eq(0),
                checking.eq(0),
            ]

        return m
