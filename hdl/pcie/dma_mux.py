"""DMA port multiplexer: several clients (the virtqueue engines) share one DmaEngine.

Commands are granted round-robin, separately for reads and writes, so a client waiting on
one kind never holds up the other. The engine answers in command order, so the mux keeps
the client of every granted command in a FIFO per kind and routes read data, write data
and ``write_done`` by it. Read data and write_done of one client never wait for another
client's commands; they wait only for the answers to earlier commands, which come first.
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from .dma import READ_COMMANDS_HELD
from .interface import DmaSignature


class DmaMux(wiring.Component):
    """``n`` client DMA ports onto one.

    Attributes
    ----------
    clients : In(DmaSignature()).array(n)
        The clients' ports.
    dma : Out(DmaSignature())
        To the DmaEngine's ``client`` port.

    Parameters
    ----------
    n : int
        Number of clients, at least 2.
    depth : int
        Commands of each kind the engine may hold unanswered before the mux waits. The
        default is the most read commands a DmaEngine holds (``READ_COMMANDS_HELD``: one
        per tag, one being split, two in its read-out), so that one client's short reads
        can occupy every tag and the mux never limits what is in flight (the engine takes
        one write command at a time: writes have room to spare).
    """

    def __init__(self, n, *, depth=READ_COMMANDS_HELD):
        if n < 2:
            raise ValueError(f"a DmaMux needs at least 2 clients, not {n}")
        self._n = n
        self._depth = depth
        super().__init__({
            "clients": In(DmaSignature()).array(n),
            "dma": Out(DmaSignature()),
        })

    def elaborate(self, platform):
        m = Module()
        id_width = (self._n - 1).bit_length()
        m.submodules.read_route = read_route = SyncFIFO(width=id_width, depth=self._depth)
        m.submodules.data_route = data_route = SyncFIFO(width=id_width, depth=self._depth)
        m.submodules.done_route = done_route = SyncFIFO(width=id_width, depth=self._depth)

        granted = self._arbitrate(m, "read", [c.read_cmd for c in self.clients],
                                  self.dma.read_cmd, read_route.w_rdy)
        m.d.comb += [read_route.w_data.eq(granted), read_route.w_en.eq(
            self.dma.read_cmd.valid & self.dma.read_cmd.ready)]

        granted = self._arbitrate(m, "write", [c.write_cmd for c in self.clients],
                                  self.dma.write_cmd, data_route.w_rdy & done_route.w_rdy)
        write_granted = self.dma.write_cmd.valid & self.dma.write_cmd.ready
        m.d.comb += [
            data_route.w_data.eq(granted),
            data_route.w_en.eq(write_granted),
            done_route.w_data.eq(granted),
            done_route.w_en.eq(write_granted),
        ]

        # Read data to the client of the oldest read, until its last beat; write data from
        # the client of the oldest write, until its last beat; one write_done per write.
        dma = self.dma
        self._steer(m, "read", read_route,
                    [(dma.read_data, c.read_data) for c in self.clients],
                    dma.read_data.payload.last)
        self._steer(m, "data", data_route,
                    [(c.write_data, dma.write_data) for c in self.clients],
                    dma.write_data.payload.last, pop_late=True)
        self._steer(m, "done", done_route,
                    [(dma.write_done, c.write_done) for c in self.clients], 1)
        return m

    def _arbitrate(self, m, name, inputs, output, room):
        """Round-robin grant of ``inputs`` onto ``output`` while ``room``; a presented
        command keeps its grant until taken. Returns the granted index."""
        n = self._n
        last = Signal(range(n), name=f"{name}_last")
        locked = Signal(name=f"{name}_locked")
        locked_index = Signal(range(n), name=f"{name}_locked_index")
        choice = Signal(range(n), name=f"{name}_choice")
        with m.Switch(last):
            for previous in range(n):
                with m.Case(previous):
                    # the client after the last granted one first (the last assignment wins)
                    for offset in reversed(range(1, n + 1)):
                        index = (previous + offset) % n
                        with m.If(inputs[index].valid):
                            m.d.comb += choice.eq(index)
        granted = Signal(range(n), name=f"{name}_granted")
        m.d.comb += granted.eq(Mux(locked, locked_index, choice))
        with m.Switch(granted):
            for index, stream in enumerate(inputs):
                with m.Case(index):
                    m.d.comb += [
                        output.valid.eq(stream.valid & room),
                        output.payload.eq(stream.payload),
                        stream.ready.eq(output.ready & room),
                    ]
        with m.If(output.valid & ~output.ready):
            m.d.sync += [locked.eq(1), locked_index.eq(granted)]
        with m.If(output.valid & output.ready):
            m.d.sync += [locked.eq(0), last.eq(granted)]
        return granted

    def _steer(self, m, name, route, pairs, ends, *, pop_late=False):
        """Connect the (source, sink) pair the route FIFO names; pop the FIFO when a
        transfer with ``ends`` set goes through, or with ``pop_late`` in the clock after
        it (nothing is connected in that clock), so that the pop is a register and not the
        sink's ``ready`` through the route (timing). The write data of a command may wait
        that clock: the engine takes its next write command only after this one's done."""
        ending = Signal(name=f"{name}_ending")
        connected = route.r_rdy
        if pop_late:
            ended = Signal(name=f"{name}_ended")
            m.d.sync += ended.eq(ending)
            m.d.comb += route.r_en.eq(ended)
            connected &= ~ended
        else:
            m.d.comb += route.r_en.eq(ending)
        with m.If(connected):
            with m.Switch(route.r_data):
                for index, (source, sink) in enumerate(pairs):
                    with m.Case(index):
                        m.d.comb += [
                            sink.valid.eq(source.valid),
                            sink.payload.eq(source.payload),
                            source.ready.eq(sink.ready),
                            ending.eq(source.valid & sink.ready & ends),
                        ]
