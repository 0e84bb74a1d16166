"""fromdevq (C6): the host's minimum balloon size, sent as VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON."""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from memballoon import constants as c

from ..virtio.interface import CommandSignature


class FromDevqEvents(data.Struct):
    """One-cycle strobes; the names match :class:`.interface.BalloonCounters`."""
    fromdevq_malformed: 1
    min_sent: 1
    min_dropped: 1


class MinBalloonSender(wiring.Component):
    """Fills fromdevq buffers with the minimum the host sets (C6).

    A buffer with device-readable bytes or fewer than 16 device-writable bytes is
    malformed: its word beats (one or two words each) are drained up to the one marked
    ``last``, and it is used at once with ``used_len`` 0. A good
    buffer is held until a minimum is pending, then gets le64 ``HCMD_MIN_BALLOON`` and the
    le64 minimum, ``used_len`` 16. The pending minimum is the newest one committed: a value
    replaced before it was handed to a buffer is dropped (and counted); once handed over,
    it is sent, and a newer value waits for the next buffer. Without EXTRA_MEM a negative
    minimum is sent as 0 (the draft: the device MUST NOT send a negative value then).

    Attributes
    ----------
    command : In(CommandSignature())
        fromdevq's buffers, from the virtqueue engine.
    minimum : In(stream.Signature(signed(64), always_ready=True))
        A minimum the host committed, in signed bytes (C10).
    extra_mem : In(1)
        VIRTIO_MEMBALLOON_F_EXTRA_MEM was negotiated.
    events : Out(FromDevqEvents)
    """

    command: In(CommandSignature())
    minimum: In(stream.Signature(signed(64), always_ready=True))
    extra_mem: In(1)
    events: Out(FromDevqEvents)

    def elaborate(self, platform):
        m = Module()
        header, words, result = self.command.header, self.command.words, self.command.result

        pending = Signal()
        pending_value = Signal(signed(64))
        sent_value = Signal(signed(64))
        hand_over = Signal()

        with m.If(self.minimum.valid):
            m.d.sync += [pending.eq(1), pending_value.eq(self.minimum.payload)]
            m.d.comb += self.events.min_dropped.eq(pending & ~hand_over)
        with m.Elif(hand_over):
            m.d.sync += pending.eq(0)

        with m.FSM():
            with m.State("Header"):
                m.d.comb += header.ready.eq(1)
                with m.If(header.valid):
                    with m.If(header.payload.readable != 0):
                        m.next = "Drain"
                    with m.Elif(header.payload.writable < c.FROMDEVQ_MIN_BUFFER):
                        m.next = "Malformed"
                    with m.Else():
                        m.next = "Wait-Minimum"

            with m.State("Drain"):
                m.d.comb += words.ready.eq(1)
                with m.If(words.valid & words.payload.last):
                    m.next = "Malformed"

            with m.State("Malformed"):
                m.d.comb += result.valid.eq(1)
                with m.If(result.ready):
                    m.d.comb += self.events.fromdevq_malformed.eq(1)
                    m.next = "Header"

            with m.State("Wait-Minimum"):
                with m.If(pending):
                    m.d.comb += hand_over.eq(1)
                    negative_refused = (pending_value < 0) & ~self.extra_mem
                    m.d.sync += sent_value.eq(Mux(negative_refused, 0, pending_value))
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
