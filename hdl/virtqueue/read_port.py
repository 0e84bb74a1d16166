"""The DMA read channel of one virtqueue engine, shared by its blocks."""

from amaranth.hdl import Cat, Module, ResetInserter, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from ..pcie.interface import DMA_READ_BEAT_BYTES, DmaReadBeat, DmaReadCommand
from ..stream_slice import StreamSlice


class ReadRequest(data.Struct):
    """A read a block asks for; ``mark`` comes back with each of its beats."""
    command: DmaReadCommand
    mark: 1


class ReadResponse(data.Struct):
    """One beat of a read, byte-packed as ``DmaReadBeat`` says: ``DMA_READ_BEAT_BYTES``
    bytes but for the read's last beat, which holds ``count`` (``error``: the read failed,
    this is its last beat and its data is meaningless)."""
    data: 8 * DMA_READ_BEAT_BYTES
    count: range(DMA_READ_BEAT_BYTES + 1)
    last: 1
    error: 1
    mark: 1


class ReadPort(wiring.Component):
    """Issues the reads of several blocks on one DMA read channel and hands each its beats.

    The DMA engine returns beats in command order, so a FIFO of who asked for each read
    routes them. A block must take its beats without waiting on anything but itself: the
    channel is in order, a block that stalls stalls everyone behind it.

    Attributes
    ----------
    requests : In(stream.Signature(ReadRequest)).array(clients)
        Reads to issue; the lowest index wins.
    responses : Out(stream.Signature(ReadResponse)).array(clients)
        The beats of each block's reads, in order, failed reads included (C7: the block
        that asked knows what the failure means).
    read_cmd, read_data :
        The engine's DMA read channel (``DmaSignature``).
    allow : In(1)
        New reads may be taken (the queue runs; C12).
    halt : In(1)
        Abandon everything (reset, C9; a fault, C7): a read not yet issued is withdrawn,
        the beats of issued ones are consumed and dropped until none is left, and no new
        read is taken before that.
    busy : Out(1)
        Issued reads whose last beat has not arrived.
    """

    def __init__(self, clients, max_reads=16):
        self._clients = clients
        self._max_reads = max_reads
        super().__init__({
            "requests": In(stream.Signature(ReadRequest)).array(clients),
            "responses": Out(stream.Signature(ReadResponse)).array(clients),
            "read_cmd": Out(stream.Signature(DmaReadCommand)),
            "read_data": In(stream.Signature(DmaReadBeat)),
            "allow": In(1),
            "halt": In(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        client_bits = max(1, (self._clients - 1).bit_length())
        m.submodules.issued = issued = SyncFIFO(width=client_bits + 1, depth=self._max_reads)

        # --- Issue: one registered command at a time ------------------------------------
        slot = Signal(ReadRequest)
        slot_client = Signal(client_bits)
        slot_valid = Signal()
        draining = Signal()
        issue = self.read_cmd.valid & self.read_cmd.ready
        m.d.comb += [
            self.read_cmd.valid.eq(slot_valid & ~self.halt),
            self.read_cmd.payload.eq(slot.command),
            issued.w_en.eq(issue),
            issued.w_data.eq(Cat(slot_client, slot.mark)),
        ]
        with m.If(issue):
            m.d.sync += slot_valid.eq(0)
        # Each client's request through a register slice, taken only while the port
        # could take it: one client's valid logic no longer reaches another's ready through
        # the priority below (timing), at one clock per read.
        takes_requests = self.allow & ~self.halt
        requests = []
        for index, client in enumerate(self.requests):
            request_slice = ResetInserter(self.halt)(StreamSlice(ReadRequest))
            m.submodules[f"request{index}"] = request_slice
            m.d.comb += [
                request_slice.input.payload.eq(client.payload),
                request_slice.input.valid.eq(client.valid & takes_requests),
                client.ready.eq(request_slice.input.ready & takes_requests),
            ]
            requests.append(request_slice.output)
        # One entry of the FIFO stays free for the command in the slot.
        can_take = ((~slot_valid | issue) & takes_requests & ~draining &
                    (issued.level < self._max_reads - 1))
        with m.If(can_take):
            for index, request in enumerate(requests):
                with (m.If if index == 0 else m.Elif)(request.valid):
                    m.d.comb += request.ready.eq(1)
                    m.d.sync += [
                        slot.eq(request.payload),
                        slot_client.eq(index),
                        slot_valid.eq(1),
                    ]
        with m.If(self.halt):
            m.d.sync += slot_valid.eq(0)

        # --- Beats back to whoever asked -----------------------------------------------
        # Through a register slice: the clients' ready logic and the DMA engine's read-out
        # would otherwise form one path through the DmaMux (timing).
        m.submodules.beats = beats = StreamSlice(DmaReadBeat)
        wiring.connect(m, wiring.flipped(self.read_data), beats.input)
        read_data = beats.output
        beat = read_data.payload
        owner = issued.r_data[:client_bits]
        mark = issued.r_data[client_bits]
        with m.If(self.halt):
            m.d.sync += draining.eq(1)
        with m.Elif(~issued.r_rdy):
            m.d.sync += draining.eq(0)

        for index, response in enumerate(self.responses):
            m.d.comb += [
                response.payload.data.eq(beat.data),
                response.payload.count.eq(beat.count),
                response.payload.last.eq(beat.last),
                response.payload.error.eq(beat.error),
                response.payload.mark.eq(mark),
            ]
        with m.If(self.halt | draining):
            m.d.comb += read_data.ready.eq(1)
        with m.Elif(issued.r_rdy):
            for index, response in enumerate(self.responses):
                with m.If(owner == index):
                    m.d.comb += [
                        response.valid.eq(read_data.valid),
                        read_data.ready.eq(response.ready),
                    ]
        m.d.comb += [
            issued.r_en.eq(read_data.valid & read_data.ready & beat.last),
            self.busy.eq(issued.r_rdy),
        ]
        return m
