"""The DMA write channel of one virtqueue engine, shared by its blocks."""

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from ..pcie.interface import DmaWriteBeat, DmaWriteCommand, DmaWriteDone


class WriteRequest(data.Struct):
    """Write ``length`` (1..16) bytes of ``data`` (byte 0 = bits 7..0) at ``address``;
    ``publish``: its successful done is reported on ``WritePort.published``."""
    address: 64
    length: 5
    data: 128
    publish: 1


class WritePort(wiring.Component):
    """Turns the small writes of several blocks (used ring, device-writable bytes) into
    DMA write commands and their beats, one write at a time.

    Writes are not waited for: PCIe keeps posted writes in order, so a used element
    issued after the buffer's bytes is seen after them. A block that needs a write to be
    visible before a read (virtio 1.2 2.7.10: used idx, then the event read) waits for
    ``idle``, which counts the ``DmaWriteDone``s.

    Attributes
    ----------
    requests : In(stream.Signature(WriteRequest)).array(clients)
        Writes to issue; the lowest index wins.
    write_cmd, write_data, write_done :
        The engine's DMA write channel (``DmaSignature``).
    allow : In(1)
        New writes may be taken (the queue runs; C12).
    halt : In(1)
        Abandon everything (C7, C9): a write none of which has reached the DMA engine is
        withdrawn; one that has is finished (the engine expects all of its bytes), and
        its done is still awaited.
    error : Out(1)
        Pulse: a write failed (C7), unless halted.
    published : Out(1)
        Pulse: a write marked ``publish`` was handed to the hard IP without error (also
        while halted: the host has it).
    idle : Out(1)
        Every write taken has been handed to the hard IP.
    busy : Out(1)
        Not idle: a write is being issued or its done is awaited.
    """

    def __init__(self, clients, max_writes=8):
        self._clients = clients
        self._max_writes = max_writes
        super().__init__({
            "requests": In(stream.Signature(WriteRequest)).array(clients),
            "write_cmd": Out(stream.Signature(DmaWriteCommand)),
            "write_data": Out(stream.Signature(DmaWriteBeat)),
            "write_done": In(stream.Signature(DmaWriteDone)),
            "allow": In(1),
            "halt": In(1),
            "error": Out(1),
            "published": Out(1),
            "idle": Out(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()

        held = Signal(WriteRequest)
        held_valid = Signal()
        cmd_sent = Signal()
        beats_sent = Signal(range(3))
        outstanding = Signal(range(self._max_writes + 1))

        final_beat = held.length > 8            # index of the last beat: 0 or 1
        cmd_fire = self.write_cmd.valid & self.write_cmd.ready
        beat_fire = self.write_data.valid & self.write_data.ready
        done_fire = self.write_done.valid & self.write_done.ready
        withdraw = self.halt & ~cmd_sent & (beats_sent == 0)
        beats_left = beats_sent <= final_beat

        m.d.comb += [
            self.write_cmd.valid.eq(held_valid & ~cmd_sent & ~withdraw),
            self.write_cmd.payload.address.eq(held.address),
            self.write_cmd.payload.length.eq(held.length),
            self.write_data.valid.eq(held_valid & beats_left & ~withdraw),
            self.write_data.payload.data.eq(held.data.word_select(beats_sent[0], 64)),
            self.write_data.payload.last.eq(beats_sent == final_beat),
            self.write_done.ready.eq(1),
            self.error.eq(done_fire & self.write_done.payload.error & ~self.halt),
        ]

        with m.If(held_valid):
            with m.If(withdraw | ((cmd_sent | cmd_fire) &
                                  (~beats_left | (beat_fire & self.write_data.payload.last)))):
                m.d.sync += [
                    held_valid.eq(0),
                    cmd_sent.eq(0),
                    beats_sent.eq(0),
                ]
            with m.Else():
                with m.If(cmd_fire):
                    m.d.sync += cmd_sent.eq(1)
                with m.If(beat_fire):
                    m.d.sync += beats_sent.eq(beats_sent + 1)
        with m.Elif(self.allow & ~self.halt & (outstanding < self._max_writes)):
            for index, request in enumerate(self.requests):
                with (m.If if index == 0 else m.Elif)(request.valid):
                    m.d.comb += request.ready.eq(1)
                    m.d.sync += [
                        held.eq(request.payload),
                        held_valid.eq(1),
                    ]

        m.d.sync += outstanding.eq(outstanding + cmd_fire - done_fire)
        # Dones come in command order: the publish flags of the outstanding writes.
        m.submodules.flags = flags = SyncFIFO(width=1, depth=self._max_writes)
        m.d.comb += [
            flags.w_en.eq(cmd_fire),
            flags.w_data.eq(held.publish),
            flags.r_en.eq(done_fire),
            self.published.eq(done_fire & flags.r_data & ~self.write_done.payload.error),
        ]
        m.d.comb += [
            self.idle.eq(~held_valid & (outstanding == 0)),
            self.busy.eq(~self.idle),
        ]
        return m
