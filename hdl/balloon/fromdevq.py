"""fromdevq (C6): the host's minimum balloon size, sent as VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON."""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from memballoon import constants as c

from ..virtqueue.interface import CommandSignature


class FromDevqEvents(data.Struct):
    """One-cycle strobes; the names match :class:`.interface.BalloonCounters`."""
    fromdevq_malformed: 1
    min_sent: 1
    min_dropped: 1


class MinBalloonSender(wiring.Component):
    """Fills fromdevq buffers with the minimum the host sets (C6).

    Every buffer is answered as it arrives, whatever is held before it (C6: used elements
    need not follow ring order). A buffer with device-readable bytes or fewer than 16
    device-writable bytes is malformed: its word beats (one or two words each) are drained
    up to the one marked ``last``, and it is used at once with ``used_len`` 0. A good
    buffer is parked in the engine (``VirtqueueEngine(parking=True)`` keeps its head).
    While a minimum is pending the sender asks for the oldest parked buffer back, one at
    a time; when it comes back (``parked``) it gets le64 ``HCMD_MIN_BALLOON`` and the le64
    minimum, ``used_len`` 16. So good buffers are used in ring order, one per minimum,
    and any number of them may be held. A parked buffer that comes back malformed (the
    driver changed it) is used like any malformed one; the minimum waits for the next.

    The pending minimum is the newest one committed: a value replaced before a buffer came
    back for it is dropped (and counted); once handed over, it is sent, and a newer value
    waits for the next buffer. Without EXTRA_MEM a negative minimum is sent as 0 (the
    draft: the device MUST NOT send a negative value then).

    Attributes
    ----------
    command : In(CommandSignature(parking=True))
        fromdevq's buffers, from the virtqueue engine.
    minimum : In(stream.Signature(signed(64), always_ready=True))
        A minimum the host committed, in signed bytes (C10).
    extra_mem : In(1)
        VIRTIO_MEMBALLOON_F_EXTRA_MEM was negotiated.
    events : Out(FromDevqEvents)
    """

    command: In(CommandSignature(parking=True))
    minimum: In(stream.Signature(signed(64), always_ready=True))
    extra_mem: In(1)
    events: Out(FromDevqEvents)

    def elaborate(self, platform):
        m = Module()
        header, words, result = self.command.header, self.command.words, self.command.result
        unpark = self.command.unpark

        pending = Signal()
        pending_value = Signal(signed(64))
        sent_value = Signal(signed(64))
        hand_over = Signal()
        unparking = Signal()                # a parked buffer asked back, not answered yet
        came_back = Signal()                # the current buffer is a parked one

        with m.If(self.minimum.valid):
            m.d.sync += [pending.eq(1), pending_value.eq(self.minimum.payload)]
            m.d.comb += self.events.min_dropped.eq(pending & ~hand_over)
        with m.Elif(hand_over):
            m.d.sync += pending.eq(0)

        m.d.comb += unpark.valid.eq(pending & ~unparking)
        with m.If(unpark.valid & unpark.ready):
            m.d.sync += unparking.eq(1)

        with m.FSM():
            with m.State("Header"):
                m.d.comb += header.ready.eq(1)
                with m.If(header.valid):
                    m.d.sync += came_back.eq(header.payload.parked)
                    with m.If(header.payload.readable != 0):
                        m.next = "Drain"
                    with m.Elif(header.payload.writable < c.FROMDEVQ_MIN_BUFFER):
                        m.next = "Malformed"
                    with m.Elif(header.payload.parked):
                        m.next = "Hand-Over"
                    with m.Else():
                        m.next = "Park"

            with m.State("Drain"):
                m.d.comb += words.ready.eq(1)
                with m.If(words.valid & words.payload.last):
                    m.next = "Malformed"

            with m.State("Malformed"):
                m.d.comb += result.valid.eq(1)
                with m.If(result.ready):
                    m.d.comb += self.events.fromdevq_malformed.eq(1)
                    # Back malformed: the pending value asks for the next one.
                    with m.If(came_back):
                        m.d.sync += unparking.eq(0)
                    m.next = "Header"

            with m.State("Park"):
                m.d.comb += [
                    result.valid.eq(1),
                    result.payload.park.eq(1),
                ]
                with m.If(result.ready):
                    m.next = "Header"

            with m.State("Hand-Over"):
                # A state of its own, so that the header's decode stays out of the
                # pending value's logic (timing). Asked back for it: a value is pending.
                m.d.comb += hand_over.eq(1)
                negative_refused = (pending_value < 0) & ~self.extra_mem
                m.d.sync += [
                    sent_value.eq(Mux(negative_refused, 0, pending_value)),
                    unparking.eq(0),
                ]
                m.next = "Send"

            with m.State("Send"):
                m.d.comb += [
                    result.valid.eq(1),
                    result.payload.used_len.eq(c.FROMDEVQ_MIN_BUFFER),
                    result.payload.write_data.eq(Cat(c.HostCmd.MIN_BALLOON, sent_value)),
                    result.payload.write_count.eq(c.FROMDEVQ_MIN_BUFFER),
                ]
                with m.If(result.ready):
                    m.d.comb += self.events.min_sent.eq(1)
                    m.next = "Header"
        return m
