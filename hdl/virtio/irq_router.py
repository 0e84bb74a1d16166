"""From device events to the ISR byte and MSI-X vectors (C11)."""

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ... import constants as c


class IrqRouter(wiring.Component):
    """Maps events to the vectors the driver assigned.

    ``config_event`` (configuration change, e.g. DEVICE_NEEDS_RESET) and ``queue_event[i]``
    are one-cycle pulses. Each sets its ISR bit at once and is remembered until its MSI-X
    vector request has been accepted; several events of one source before then make one
    message, as virtio allows. A source mapped to ``VIRTIO_MSI_NO_VECTOR`` sends no
    message (C11). Lower sources win: configuration first, then queues in order.
    """

    def __init__(self, vectors):
        self._vectors = vectors
        super().__init__({
            "config_event": In(1),
            "queue_event": In(c.NUM_QUEUES),
            "config_vector": In(16),
            "queue_vectors": In(data.ArrayLayout(16, c.NUM_QUEUES)),
            "clear": In(1),
            "isr_config": Out(1),
            "isr_queue": Out(1),
            "msix_request": Out(stream.Signature(range(vectors))),
        })

    def elaborate(self, platform):
        m = Module()
        events = [self.config_event, *self.queue_event]
        vectors = [self.config_vector, *self.queue_vectors]
        pending = Signal(len(events))
        m.d.comb += [
            self.isr_config.eq(self.config_event),
            self.isr_queue.eq(self.queue_event.any()),
        ]

        taken = Signal(len(events))
        with m.If(~self.msix_request.valid | self.msix_request.ready):
            m.d.sync += self.msix_request.valid.eq(0)
            with m.Switch(pending):
                for source in range(len(events)):
                    with m.Case("-" * (len(events) - 1 - source) + "1" + "0" * source):
                        m.d.comb += taken.eq(1 << source)
                        with m.If(vectors[source] < self._vectors):
                            m.d.sync += [
                                self.msix_request.valid.eq(1),
                                self.msix_request.payload.eq(vectors[source]),
                            ]

        new_events = Signal(len(events))
        m.d.comb += new_events.eq(sum(e << i for i, e in enumerate(events)))
        with m.If(self.clear):
            m.d.sync += [pending.eq(0), self.msix_request.valid.eq(0)]
        with m.Else():
            m.d.sync += pending.eq((pending & ~taken) | new_events)
        return m
