"""Host memory behind a ``DmaSignature`` port, for Amaranth simulator testbenches.

The model plays the DMA engine's side of ``hdl/pcie/interface.py``: reads are answered in
command order with byte-packed beats (``DMA_READ_BEAT_BYTES`` each, at most one a clock,
the last one ``count``), as the engine's client port delivers them (the engine puts the
host's out-of-order completions back in order; ``tests/test_dma.py``'s host sends them out
of order), writes take ``ceil(length / 8)`` beats and answer one ``DmaWriteDone``.
Latency (by default a server's, ``SERVER_READ_LATENCY_CYCLES``), backpressure and idle
beats are random (seeded by the caller); reads or writes that touch an address range marked as failing fail as the
docstrings say (a read ends early with an error beat, a write writes nothing and reports
``error``). It checks the client's side of the streams (payload held while ``valid`` and
not ``ready``, ``last`` on the right beat) and logs every command with its cycle.
"""

from collections import deque
from dataclasses import dataclass

from ..hdl.pcie.interface import DMA_READ_BEAT_BYTES

#: A server answers a device's read after roughly 400-1000 ns (Neugebauer et al., SIGCOMM
#: 2018: about 500 ns median on Xeon): in user_clk cycles at 250 MHz.
SERVER_READ_LATENCY_CYCLES = (100, 250)


@dataclass
class ReadRecord:
    cycle: int          # when the command was accepted
    address: int
    length: int
    data: bytes         # what the memory held then (the bytes returned, unless failed)
    failed: bool


@dataclass
class WriteRecord:
    cycle: int          # when the command was accepted
    address: int
    length: int
    data: bytes = b""
    done_cycle: int = None      # when its last beat arrived (and the memory changed)
    failed: bool = False


def _overlaps(ranges, address, length):
    """Offset of the first byte of ``address .. address + length - 1`` inside one of
    ``ranges`` (``(start, end)`` pairs, end excluded), or None."""
    hits = [max(start, address) - address for start, end in ranges
            if start < address + length and address < end]
    return min(hits) if hits else None


class DmaMemory:
    """Serves ``port`` (a ``DmaSignature`` client port of the DUT) from ``memory``
    (a bytearray; address 0 is its byte 0).

    ``read_latency`` and ``done_latency`` are (min, max) cycles; ``stall`` is the chance a
    ``ready`` is low in a cycle, ``idle`` the chance a read beat or done is held back.
    ``fail_reads`` / ``fail_writes`` are lists of ``(start, end)`` ranges; tests may change
    them at any time. A failing read first returns some of the whole beats before its
    first failing byte: a random number of them, or with ``partial_reads="all"`` all of
    them. ``hold_writes`` (tests may set it any time) keeps the write command and data
    streams not ready. ``reads`` and ``writes`` log the commands; ``cycle`` counts clocks.
    """

    def __init__(self, port, memory, rng, *, read_latency=SERVER_READ_LATENCY_CYCLES,
                 done_latency=(0, 6), stall=0.2, idle=0.2, partial_reads="random"):
        self.port = port
        self.memory = memory
        self.rng = rng
        self.read_latency = read_latency
        self.done_latency = done_latency
        self.stall = stall
        self.idle = idle
        self.partial_reads = partial_reads
        self.hold_writes = False
        self.fail_reads = []
        self.fail_writes = []
        self.reads = []
        self.writes = []
        self.cycle = 0
        self._beats = deque()           # (first cycle it may go, data, count, last, error)
        self._writes = deque()          # WriteRecords waiting for beats
        self._dones = deque()           # (first cycle it may go, error)

    @property
    def outstanding(self):
        """Read beats or write dones the DUT has not taken yet, or writes still open."""
        return bool(self._beats or self._writes or self._dones)

    def _accept_read(self, address, length):
        assert 1 <= length < 1 << 20, f"read length {length}"
        assert address + length <= len(self.memory), f"read {address:#x}+{length} off the end"
        data = bytes(self.memory[address:address + length])
        failing = _overlaps(self.fail_reads, address, length)
        self.reads.append(ReadRecord(self.cycle, address, length, data, failing is not None))
        start = self.cycle + self.rng.randint(*self.read_latency)
        step = DMA_READ_BEAT_BYTES
        if failing is not None:
            # Some whole beats before the failing byte may come, then the error beat.
            good = failing // step
            if self.partial_reads == "random":
                good = self.rng.randint(0, good)
            beats = [(data[step * i:step * (i + 1)], step, False, False) for i in range(good)]
            beats.append((b"", self.rng.randrange(2 * step), True, True))
        else:
            beats = [(data[i:i + step], min(step, length - i), i + step >= length, False)
                     for i in range(0, length, step)]
        for chunk, count, last, error in beats:
            payload = (int.from_bytes(chunk, "little") if not error
                       else self.rng.getrandbits(8 * DMA_READ_BEAT_BYTES))
            self._beats.append((start, payload, count, last, error))

    def _accept_write_beat(self, data, last):
        write = self._writes[0]
        remaining = write.length - len(write.data)
        count = min(8, remaining)
        write.data += data.to_bytes(8, "little")[:count]
        complete = len(write.data) == write.length
        assert bool(last) == complete, \
            f"write {write.address:#x}+{write.length}: last={last} after {len(write.data)} bytes"
        if complete:
            self._writes.popleft()
            write.done_cycle = self.cycle
            write.failed = _overlaps(self.fail_writes, write.address, write.length) is not None
            if not write.failed:
                self.memory[write.address:write.address + write.length] = write.data
            self._dones.append((self.cycle + self.rng.randint(*self.done_latency), write.failed))

    def _chance(self, probability):
        return self.rng.random() >= probability

    async def serve(self, ctx):
        """The model's process: ``sim.add_process(memory.serve)``."""
        port = self.port
        rc, rd, wc, wd, done = (port.read_cmd, port.read_data, port.write_cmd,
                                port.write_data, port.write_done)
        held = {}                       # stream -> payload offered and not taken
        async for sample in ctx.tick().sample(
                rc.valid, rc.ready, rc.payload.address, rc.payload.length,
                rd.valid, rd.ready,
                wc.valid, wc.ready, wc.payload.address, wc.payload.length,
                wd.valid, wd.ready, wd.payload.data, wd.payload.last,
                done.valid, done.ready):
            (_, _, rc_valid, rc_ready, rc_address, rc_length, rd_valid, rd_ready,
             wc_valid, wc_ready, wc_address, wc_length, wd_valid, wd_ready, wd_data, wd_last,
             done_valid, done_ready) = sample
            self.cycle += 1

            for name, valid, ready, payload in (
                    ("read_cmd", rc_valid, rc_ready, (rc_address, rc_length)),
                    ("write_cmd", wc_valid, wc_ready, (wc_address, wc_length)),
                    ("write_data", wd_valid, wd_ready, (wd_data, wd_last))):
                if name in held and valid:
                    assert held[name] == payload, f"{name} payload changed while not taken"
                held.pop(name, None)
                if valid and not ready:
                    held[name] = payload

            if rc_valid and rc_ready:
                self._accept_read(rc_address, rc_length)
            if wc_valid and wc_ready:
                assert 1 <= wc_length < 1 << 20, f"write length {wc_length}"
                assert wc_address + wc_length <= len(self.memory), \
                    f"write {wc_address:#x}+{wc_length} off the end"
                self._writes.append(WriteRecord(self.cycle, wc_address, wc_length))
                self.writes.append(self._writes[-1])
            if wd_valid and wd_ready:
                assert self._writes, "write beat without a write command"
                self._accept_write_beat(wd_data, wd_last)
            if rd_valid and rd_ready:
                self._beats.popleft()
            if done_valid and done_ready:
                self._dones.popleft()

            # Outputs for the next cycle; an offered beat or done stays until taken.
            ctx.set(rc.ready, self._chance(self.stall))
            ctx.set(wc.ready, not self.hold_writes and self._chance(self.stall))
            ctx.set(wd.ready, not self.hold_writes and bool(self._writes) and
                    self._chance(self.stall))
            offer_beat = bool(self._beats) and self._beats[0][0] <= self.cycle and (
                (rd_valid and not rd_ready) or self._chance(self.idle))
            ctx.set(rd.valid, offer_beat)
            if offer_beat:
                _, payload, count, last, error = self._beats[0]
                ctx.set(rd.payload.data, payload)
                ctx.set(rd.payload.count, count)
                ctx.set(rd.payload.last, last)
                ctx.set(rd.payload.error, error)
            offer_done = bool(self._dones) and self._dones[0][0] <= self.cycle and (
                (done_valid and not done_ready) or self._chance(self.idle))
            ctx.set(done.valid, offer_done)
            if offer_done:
                ctx.set(done.payload.error, self._dones[0][1])
