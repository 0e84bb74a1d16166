"""DmaEngine against a Python host on the vendor-neutral requester interface.

The host model plays host memory and the hard IP. It checks every request against PCIe
rules (max payload and read request size, 4 KiB boundaries, byte enables, a tag is not
reused while its request is outstanding, no request decided while ``enable`` is low),
writes posted payload into its memory, and answers reads with completions split at
random RCB (64 or 128 byte) boundaries up to its max payload (or at every one), out of
order across tags, after random latency (by default a server's). It counts what it still
owes (requests, completions, bytes, receive-buffer credits) and keeps the peaks. It can
inject UR, CA and poisoned completions, stray completions, and lost or late completions
(timeouts). The clients check read data byte for byte, the error beat of C7, the written
memory, the order of write TLPs and of write_done.

Every stream has seeded random idle or backpressure; the seeds are in the test ids.
"""

import itertools
import random

import pytest
from amaranth.hdl import Module
from amaranth.lib import data, wiring

from cocotbext.pcie.core.tlp import Tlp, TlpType
from cocotbext.pcie.xilinx.us.tlp import Tlp_us
from test_usp_shim import rc_beats, rq_frames

from memballoon.hdl.pcie.dma import (CPL_HEADER_BUDGET, READ_BUFFER_BYTES,
                                     READ_COMMANDS_HELD, TAGS, DmaEngine)
from memballoon.hdl.pcie.interface import (DMA_READ_BEAT_BYTES, CompletionBeat, CplError,
                                           CplStatus, RequesterKind)
from memballoon.hdl.pcie.usp_shim import UspShim
from memballoon.tb.dma_memory_sim import SERVER_READ_LATENCY_CYCLES
from sim_util import simulate, stream_consumer, stream_put, wait_until

BASE = 0xFEDC_BA98_7654_0000           # 64-bit host addresses, 64 KiB aligned
READ_REGION = 0x10000                   # reads from BASE .. BASE + 64 KiB
WRITE_BASE = BASE + READ_REGION         # writes to the next 64 KiB
PAGE = 4096
CPL_FIELDS = ("tag", "status", "error", "byte_count", "lower_address", "dwords",
              "request_completed")
#: A real host's read latency in user_clk cycles: 500 ns and 1000 ns at 250 MHz.
HOST_LATENCY_CYCLES = (125, 250)
#: cocotbext-pcie's PCIE4 receive buffer drops completions past this many 16-byte data
#: credits, a completion costing its data credits plus one (usp_model.py).
MODEL_CPL_DATA_CREDITS = 32768 // 16
#: Payload bytes per completion beat on the requester interface.
CPL_BEAT_BYTES = data.Layout.cast(CompletionBeat)["data"].shape // 8


def size_bytes(encoding):
    return 128 << min(encoding, 5)


def encoding_of(size):
    return (size // 128).bit_length() - 1


def be_bytes(address, dwords, first_be, last_be):
    """Addresses of the enabled bytes of a request (PCIe byte-enable rules)."""
    enables = [first_be] + [0xF] * (dwords - 2) + [last_be] if dwords > 1 else [first_be]
    return [address + 4 * i + b for i, be in enumerate(enables) for b in range(4)
            if be >> b & 1]


def check_byte_enables(h):
    assert h.dwords >= 1
    if h.dwords == 1:
        assert h.last_be == 0 and h.first_be != 0
        assert h.first_be in {(0xF << a) & (0xF >> b) & 0xF for a in range(4)
                              for b in range(4)}, "first_be not contiguous"
    else:
        assert h.first_be in (0xF, 0xE, 0xC, 0x8) and h.last_be in (0xF, 0x7, 0x3, 0x1), \
            "byte enables leave a gap in a contiguous request"


class HostModel:
    """Host memory and hard IP on the requester side of a DmaEngine."""

    def __init__(self, dut, rng, *, mps, mrrs, rcb, host_mps=512,
                 latency=SERVER_READ_LATENCY_CYCLES,
                 req_backpressure=0.3, cpl_idle=0.3, faults=None, timeout=None, strays=0.0,
                 late_delay=None, split_every_rcb=False):
        self.dut, self.rng = dut, rng
        self.mps, self.mrrs, self.rcb, self.host_mps = mps, mrrs, rcb, host_mps
        self.split_every_rcb = split_every_rcb
        self.latency, self.req_backpressure, self.cpl_idle = latency, req_backpressure, cpl_idle
        # page index (from BASE) -> "ur", "ca", "poison", "misplaced", "corrupt" (error
        # completions), "lost", "late" (timeouts) or "slow" (700 cycles more latency)
        self.faults = faults or {}
        self.timeout = timeout
        self.late_delay = late_delay
        self.strays = strays
        self.memory = bytearray(rng.randbytes(2 * READ_REGION))
        self.initial = bytes(self.memory)
        self.cycle = 0
        self.outstanding = {}           # tag -> cycle from which the tag may be reused (or None)
        self.queues = {}                # tag -> [(due, completion)], in request order
        self.write_tlps = []            # (first enabled byte address, bytes) per write TLP
        self.reads = 0
        # owed: requests taken whose last completion is not sent, their completions not
        # sent, the bytes those carry and the credits the IP's receive buffer counts for
        # them (cocotbext-pcie: per completion its data credits plus one); peak: the most
        self.owed = dict(requests=0, completions=0, bytes=0, credits=0)
        self.peak = dict(self.owed)
        self.enable_low_since = None
        self.headers_while_low = []

    # --- requests ----------------------------------------------------------------------

    def on_request(self, h):
        """A request header was taken; returns the payload collector for a write."""
        address = h.address & ~3
        assert (address & 0xFFF) + 4 * h.dwords <= PAGE, "request crosses 4 KiB"
        check_byte_enables(h)
        if self.enable_low_since is not None and self.cycle > self.enable_low_since + 1:
            self.headers_while_low.append((self.enable_low_since, h.kind))
        if h.kind == RequesterKind.MEM_WRITE:
            assert 4 * h.dwords <= self.mps, "write larger than max payload"
            return dict(address=address, dwords=h.dwords, first_be=h.first_be,
                        last_be=h.last_be, data=[])
        assert 4 * h.dwords <= self.mrrs, "read larger than max read request"
        assert h.tag < TAGS
        free_at = self.outstanding.get(h.tag, -1)
        assert free_at is not None and self.cycle >= free_at, \
            f"tag {h.tag} reused while its request is outstanding"
        self.reads += 1
        self.answer(h, address)
        return None

    def on_payload(self, write, beat):
        write["data"] += [beat.data & 0xFFFF_FFFF, beat.data >> 32]
        if beat.last:
            assert len(write["data"]) in (write["dwords"], write["dwords"] + 1)
            enabled = be_bytes(write["address"], write["dwords"], write["first_be"],
                               write["last_be"])
            payload = b"".join(d.to_bytes(4, "little") for d in write["data"])
            for a in enabled:
                self.memory[a - BASE] = payload[a - write["address"]]
            self.write_tlps.append((enabled[0], len(enabled)))
            return True
        assert len(write["data"]) < write["dwords"]
        return False

    def answer(self, h, address):
        """Plan the completions of a read request."""
        rng = self.rng
        enabled = be_bytes(address, h.dwords, h.first_be, h.last_be)
        first, count = enabled[0], len(enabled)
        end = first + count
        fault = self.faults.get((first - BASE) // PAGE)
        due = self.cycle + rng.randint(*self.latency) + (700 if fault == "slow" else 0)
        queue = self.queues.setdefault(h.tag, [])
        assert not queue
        self.owe(requests=1)
        if fault in ("ur", "ca"):
            status = CplStatus.UR if fault == "ur" else CplStatus.CA
            self.send_later(queue, due, dict(
                tag=h.tag, status=status, error=CplError.BAD_STATUS, byte_count=count,
                lower_address=first & 0x7F, dwords=0, request_completed=1, data=[], bytes=0))
            self.outstanding[h.tag] = None
            return
        if fault == "lost":
            self.outstanding[h.tag] = self.cycle + 7 * (self.timeout // 4) + 1
            return
        if fault == "late" and self.late_delay == "at release":
            # Header half a completion before the engine releases the timed-out tag: the
            # engine's timeout ticks come every timeout/4 cycles, at cycles -1 mod that
            # from reset (cycle 0 here is cycle 1 of the host), the release at the 8th.
            period = self.timeout // 4
            issued = self.cycle - 1
            release = ((issued + 1) // period + 1) * period - 1 + 7 * period
            due = release - 32 + 1
        elif fault == "late":
            due = self.cycle + rng.randint(self.timeout * 11 // 10, self.timeout * 16 // 10)
        pieces = []
        start = first
        while start < end:
            limit = (start & ~3) + self.host_mps
            ends = [b for b in range((start // self.rcb + 1) * self.rcb, limit + 1, self.rcb)
                    if b < end]
            if end <= limit:
                ends.append(end)
            if self.split_every_rcb:
                stop = ends[0]
            else:
                stop = rng.choice(ends) if rng.random() < 0.5 else ends[-1]
            dword0, dword_end = start & ~3, (stop + 3) & ~3
            pieces.append(dict(tag=h.tag, status=CplStatus.SC, error=CplError.NONE,
                               byte_count=end - start, lower_address=start & 0x7F,
                               dwords=(dword_end - dword0) // 4,
                               request_completed=int(stop == end),
                               data=list(self.memory[dword0 - BASE:dword_end - BASE]),
                               bytes=stop - start))
            start = stop
        if fault == "poison":
            victim = rng.choice(pieces)
            victim["error"] = CplError.POISONED
            victim["data"] = list(rng.randbytes(len(victim["data"])))
        if fault == "misplaced":                # a lower address the request cannot have
            rng.choice(pieces)["lower_address"] ^= 4
        if fault == "corrupt":                  # the IP signals discontinue at the end
            rng.choice(pieces)["corrupt"] = 1
        for piece in pieces:
            self.send_later(queue, due, piece)
            due += rng.randint(0, 4)
        self.outstanding[h.tag] = None

    def send_later(self, queue, due, completion):
        """Queue a completion for its tag, sent from cycle ``due``; it is owed till then."""
        queue.append((due, completion))
        self.owe(**self.cost(completion))

    @staticmethod
    def cost(completion):
        """What a completion adds to what is owed."""
        return dict(completions=1, bytes=completion["bytes"],
                    credits=(completion["dwords"] + 3) // 4 + 1)

    def owe(self, sign=1, **amounts):
        """Add (``sign`` -1: take) ``amounts`` to what is owed; keep the peaks."""
        for key, amount in amounts.items():
            self.owed[key] += sign * amount
            self.peak[key] = max(self.peak[key], self.owed[key])

    def stray(self):
        """A completion nobody asked for (the IP flags it UNEXPECTED)."""
        dwords = self.rng.randint(0, 5)
        return dict(tag=self.rng.randrange(2 * TAGS), status=CplStatus.SC,
                    error=CplError.UNEXPECTED,
                    byte_count=self.rng.randint(1, 4096), lower_address=self.rng.randrange(128),
                    dwords=dwords, request_completed=1,
                    data=list(self.rng.randbytes(4 * dwords)))

    def next_completion(self):
        if self.rng.random() < self.strays:
            return self.stray()
        ready = [tag for tag, q in self.queues.items() if q and q[0][0] <= self.cycle]
        if not ready:
            return None
        tag = self.rng.choice(ready)
        return self.queues[tag].pop(0)[1]

    # --- the per-cycle process -----------------------------------------------------------

    async def run(self, ctx):
        dut, rng = self.dut, self.rng
        req, req_data = dut.requester.req, dut.requester.req_data
        cpl, cpl_data = dut.requester.cpl, dut.requester.cpl_data
        write = None                    # payload being collected
        held = {}                       # stream -> payload presented but not taken
        header = None                   # completion header being presented
        data_queue = []                 # completions whose header was presented: beats left
        beat = None
        driven = {}
        serial = 0                      # tells presented completions apart
        beat_serial = 0                 # and presented payload beats

        def drive(signal, value, token=None):
            """Set only what changes: every set makes the simulator settle again."""
            token = value if token is None else token
            if driven.get(id(signal)) != token:
                ctx.set(signal, value)
                driven[id(signal)] = token

        while True:
            self.cycle += 1
            if ctx.get(dut.enable):
                self.enable_low_since = None
            elif self.enable_low_since is None:
                self.enable_low_since = self.cycle

            # requests: headers, then a write's payload (the shim's order)
            for stream in (req, req_data):
                if stream in held:
                    assert ctx.get(stream.valid) and ctx.get(stream.payload) == held[stream], \
                        "request stream changed under backpressure"
            take_header = write is None and rng.random() >= self.req_backpressure
            take_data = write is not None and rng.random() >= self.req_backpressure
            drive(req.ready, take_header)
            drive(req_data.ready, take_data)
            header_in = ctx.get(req.payload) if ctx.get(req.valid) else None
            data_in = ctx.get(req_data.payload) if ctx.get(req_data.valid) else None

            # completions: a header, and the payload of headers already presented
            if header is None and rng.random() >= self.cpl_idle:
                header = self.next_completion()
                if header is not None:
                    serial += 1
                    payload = bytes(header["data"])
                    beats = [dict(data=int.from_bytes(payload[i:i + CPL_BEAT_BYTES], "little"),
                                  last=i + CPL_BEAT_BYTES >= len(payload), corrupt=0)
                             for i in range(0, len(payload), CPL_BEAT_BYTES)]
                    if beats and header.get("corrupt"):
                        beats[-1]["corrupt"] = 1
                    data_queue.append(beats)
            drive(cpl.valid, header is not None)
            if header is not None:
                drive(cpl.payload, {k: header[k] for k in CPL_FIELDS}, serial)
            if beat is None and data_queue and data_queue[0] and rng.random() >= self.cpl_idle:
                beat = data_queue[0][0]
                beat_serial += 1
            drive(cpl_data.valid, beat is not None)
            if beat is not None:
                drive(cpl_data.payload, beat, beat_serial)
            header_taken = header is not None and ctx.get(cpl.ready)
            beat_taken = beat is not None and ctx.get(cpl_data.ready)

            await ctx.tick()

            held = {}
            for stream, value, taken in ((req, header_in, take_header),
                                         (req_data, data_in, take_data)):
                if value is not None and not taken:
                    held[stream] = value
            if header_in is not None and take_header:
                write = self.on_request(header_in)
            elif data_in is not None and take_data:
                if self.on_payload(write, data_in):
                    write = None
            if header_taken:
                if header["error"] != CplError.UNEXPECTED:      # not a stray
                    self.owe(-1, **self.cost(header), requests=header["request_completed"])
                if header["request_completed"] and header["error"] != CplError.UNEXPECTED \
                        and self.outstanding.get(header["tag"], 0) is None:
                    self.outstanding[header["tag"]] = self.cycle
                if header["dwords"] == 0:
                    data_queue.pop()
                header = None
            if beat_taken:
                data_queue[0].pop(0)
                if not data_queue[0]:
                    data_queue.pop(0)
                beat = None


# --- clients ---------------------------------------------------------------------------

def random_length(rng, small=16, large=3000):
    r = rng.random()
    if r < 0.3:
        return rng.randint(1, small)
    if r < 0.8:
        return rng.randint(small + 1, 700)
    return rng.randint(701, large)


def random_reads(rng, n, **kw):
    reads = []
    for _ in range(n):
        length = random_length(rng, **kw)
        offset = rng.randrange(READ_REGION - length)
        reads.append((BASE + offset, length))
    return reads


def random_writes(rng, n, **kw):
    writes = []
    for _ in range(n):
        length = random_length(rng, **kw)
        offset = rng.randrange(READ_REGION - length)
        writes.append((WRITE_BASE + offset, length, rng.randbytes(length)))
    return writes


def beats_of(data):
    return [dict(data=int.from_bytes(data[i:i + 8].ljust(8, b"\0"), "little"),
                 last=i + 8 >= len(data)) for i in range(0, len(data), 8)]


def run_engine(host_kw, *, reads=(), writes=(), seed, enable_pattern=None, read_starts=None,
               timeout_cycles=2**17, read_buffer_bytes=max(READ_BUFFER_BYTES),
               client_idle=0.3, backpressure=0.3, max_cycles=200_000, size_pattern=None):
    """Run read and write commands through a DmaEngine against a HostModel; return the
    host, the read results (beats per command with their cycles), write_done payloads
    with cycles and the cycle each command was taken. ``read_starts``: read index ->
    cycle before which the client does not present it. ``size_pattern``: (mps, mrrs,
    cycles) settings the engine is given in turn, over and over (the host checks against
    its own ``mps`` and ``mrrs``, the largest of them)."""
    rng = random.Random(seed)
    dut = DmaEngine(timeout_cycles=timeout_cycles, read_buffer_bytes=read_buffer_bytes)
    host = HostModel(dut, random.Random(seed + 1), **host_kw)
    client = dut.client
    read_beats, dones, accepted = [], [], {}
    finished, clock = [], [0]

    def keep(sink, fields):
        """Keep ``fields`` of each payload as a dict, with the cycle it arrived."""
        return lambda payload: sink.append(({f: getattr(payload, f) for f in fields},
                                            clock[0]))

    async def clock_count(ctx):
        async for _ in ctx.tick():
            clock[0] += 1

    async def settings(ctx):
        ctx.set(dut.max_payload, encoding_of(host.mps))
        ctx.set(dut.max_read_request, encoding_of(host.mrrs))
        ctx.set(dut.enable, 1)
        while size_pattern:
            for mps, mrrs, cycles in size_pattern:
                ctx.set(dut.max_payload, encoding_of(mps))
                ctx.set(dut.max_read_request, encoding_of(mrrs))
                for _ in range(cycles):
                    await ctx.tick()
        if enable_pattern:
            for level, cycles in enable_pattern:
                ctx.set(dut.enable, level)
                for _ in range(cycles):
                    await ctx.tick()

    async def read_commands(ctx):
        for i, (address, length) in enumerate(reads):
            while clock[0] < (read_starts or {}).get(i, 0):
                await ctx.tick()
            await stream_put(ctx, client.read_cmd, dict(address=address, length=length),
                             rng, client_idle)
            accepted[("r", i)] = clock[0]

    async def write_commands(ctx):
        for i, (address, length, _) in enumerate(writes):
            await stream_put(ctx, client.write_cmd, dict(address=address, length=length),
                             rng, client_idle)
            accepted[("w", i)] = clock[0]

    async def write_data(ctx):
        for _, _, data in writes:
            for beat in beats_of(data):
                await stream_put(ctx, client.write_data, beat, rng, client_idle)

    async def wait_done(ctx):
        ends, seen = 0, 0
        for _ in range(max_cycles):
            ends += sum(1 for b, _ in read_beats[seen:] if b["last"])
            seen = len(read_beats)
            if ends == len(reads) and len(dones) == len(writes):
                break
            await ctx.tick()
        else:
            raise AssertionError(f"engine stalled: {ends}/{len(reads)} reads, "
                                 f"{len(dones)}/{len(writes)} writes")
        await ctx.tick().repeat(30)
        finished.append(clock[0])

    simulate(dut, read_commands, write_commands, write_data, wait_done, background=[
        settings, clock_count, host.run,
        stream_consumer(client.read_data, keep(read_beats, ("data", "count", "last", "error")),
                        rng, backpressure),
        stream_consumer(client.write_done, keep(dones, ("error",)), rng, backpressure)])
    assert finished

    results, current = [], []
    for beat, cycle in read_beats:
        current.append((beat, cycle))
        if beat["last"]:
            results.append(current)
            current = []
    assert not current and len(results) == len(reads)
    return host, results, dones, accepted


def check_read(host, address, length, beats, must_fail=False, may_fail=False):
    """Byte-packed data of one read; an error beat ends a failed read after a prefix."""
    data = b""
    for i, (beat, _) in enumerate(beats):
        last = i == len(beats) - 1
        assert bool(beat["last"]) == last
        if beat["error"]:
            assert last, "error beat before the end"
            break
        count = beat["count"] if last else DMA_READ_BEAT_BYTES
        assert not last or 1 <= count <= DMA_READ_BEAT_BYTES
        assert beat["count"] == count
        data += beat["data"].to_bytes(DMA_READ_BEAT_BYTES, "little")[:count]
    failed = bool(beats[-1][0]["error"])
    expected = bytes(host.memory[address - BASE:address - BASE + length])
    if failed:
        assert must_fail or may_fail, f"read {address:#x}+{length} failed"
        assert len(data) < length and data == expected[:len(data)], "bad data before error"
    else:
        assert not must_fail, f"read {address:#x}+{length} did not fail"
        assert data == expected, f"read {address:#x}+{length}: wrong data"
    return failed


def check_writes(host, writes, dones):
    """Memory after the writes, the TLP order (command order, ascending addresses) and
    write_done per command."""
    expected = bytearray(host.initial)
    tiles = []
    for address, length, data in writes:
        expected[address - BASE:address - BASE + length] = data
        tiles.append((address, length))
    assert host.memory == expected
    assert [bool(d["error"]) for d, _ in dones] == [False] * len(writes)
    # the TLPs tile every command in order, each ascending
    tlps = iter(host.write_tlps)
    for address, length in tiles:
        covered = address
        while covered < address + length:
            start, count = next(tlps)
            assert start == covered, "write TLPs out of order"
            covered += count
        assert covered == address + length
    assert next(tlps, None) is None


# --- tests -------------------------------------------------------------------------------

CONFIGS = [  # (mps, mrrs, rcb)
    (128, 128, 64), (256, 512, 128), (128, 4096, 64), (256, 1024, 64),
]


@pytest.mark.parametrize("mps,mrrs,rcb", CONFIGS)
def test_random_reads_and_writes(mps, mrrs, rcb):
    """Random lengths and alignments both ways at once, with idle and backpressure on
    every stream and out-of-order, randomly split completions, and stray completions
    (flagged UNEXPECTED by the IP) that must change nothing."""
    seed = mps + mrrs + rcb
    rng = random.Random(seed)
    reads, writes = random_reads(rng, 16), random_writes(rng, 12)
    host, results, dones, _ = run_engine(dict(mps=mps, mrrs=mrrs, rcb=rcb, strays=0.02),
                                         reads=reads, writes=writes, seed=seed)
    for (address, length), beats in zip(reads, results):
        check_read(host, address, length, beats)
    check_writes(host, writes, dones)


def test_tags_are_reused():
    """Many short reads wrap the tags several times; the host checks that no tag is
    reused while its request is outstanding; every byte offset in a beat is a start."""
    rng = random.Random(7)
    reads = [(BASE + 16 * rng.randrange(2048) + i % 16, rng.randint(1, 40))
             for i in range(7 * TAGS)]
    host, results, _, _ = run_engine(dict(mps=128, mrrs=128, rcb=64, latency=(20, 200)),
                                     reads=reads, seed=7, client_idle=0.0)
    for (address, length), beats in zip(reads, results):
        check_read(host, address, length, beats)
    assert host.reads >= len(reads) > 6 * TAGS


def test_short_reads_every_alignment():
    """Every start byte within a client beat and every length 1..40 (up to two beats and
    a half, so every count of the last beat and the extra beat an unaligned start costs),
    some across a max-read-request or 4 KiB boundary, under heavy backpressure on the read
    data and idle on the completions."""
    seed = 71
    rng = random.Random(seed)
    reads = []
    for offset in range(DMA_READ_BEAT_BYTES):
        for length in range(1, 41):
            start = rng.choice([0, 128 - 16, 128 - 32, PAGE - 16, PAGE - 32,
                                16 * rng.randrange(256)])
            reads.append((BASE + PAGE * rng.randrange(15) + start + offset, length))
    rng.shuffle(reads)
    host, results, _, _ = run_engine(dict(mps=128, mrrs=128, rcb=64, cpl_idle=0.5),
                                     reads=reads, seed=seed, client_idle=0.1,
                                     backpressure=0.6)
    for (address, length), beats in zip(reads, results):
        check_read(host, address, length, beats)


def test_long_reads_around_boundaries():
    """Lengths just under, at and over request and page multiples at starts across a
    client beat: the realignment carries over the joins between requests."""
    seed = 73
    rng = random.Random(seed)
    reads = [(BASE + PAGE * rng.randrange(12) + rng.choice([0, PAGE - 64]) + offset, length)
             for offset in (0, 1, 3, 4, 8, 12, 15)
             for length in (127, 128, 129, 143, 144, 145, 511, 512, 513, 4095, 4096, 4097)]
    rng.shuffle(reads)
    host, results, _, _ = run_engine(dict(mps=256, mrrs=512, rcb=64, strays=0.02),
                                     reads=reads, seed=seed)
    for (address, length), beats in zip(reads, results):
        check_read(host, address, length, beats)


def test_many_reads_in_flight_at_host_latency():
    """A host answering after 500-1000 ns and splitting every completion at each 64-byte
    RCB boundary: queued descriptor-sized reads (16-32 bytes) keep every tag in flight;
    512-byte reads are held to the completion-header budget (never more completions
    owed by the host than CPL_HEADER_BUDGET) and to the buffer (never more bytes owed than
    it holds), within the model's receive buffer; the data is right, and the engine holds
    at most READ_COMMANDS_HELD commands unanswered (DmaMux's depth)."""
    seed = 81
    rng = random.Random(seed)

    def small(n):
        return [(BASE + rng.randrange(READ_REGION - 32), rng.randint(16, 32))
                for _ in range(n)]

    def large(n):       # most aligned, some across a max-read-request boundary
        return [(BASE + 512 * rng.randrange(READ_REGION // 512 - 1) +
                 rng.choice([0, 0, 0, 44]), 512) for _ in range(n)]

    mixed = small(48) + large(16)
    rng.shuffle(mixed)
    reads = small(3 * TAGS) + large(48) + mixed
    host, results, _, accepted = run_engine(
        dict(mps=256, mrrs=512, rcb=64, split_every_rcb=True, latency=HOST_LATENCY_CYCLES,
             req_backpressure=0, cpl_idle=0),
        reads=reads, seed=seed, client_idle=0)
    for (address, length), beats in zip(reads, results):
        check_read(host, address, length, beats)
    peak = host.peak
    print(f"\npeak owed by the host: {peak['requests']} requests, {peak['completions']} "
          f"completions, {peak['bytes']} bytes, {peak['credits']} receive credits")
    assert peak["requests"] == TAGS
    assert peak["completions"] <= CPL_HEADER_BUDGET
    assert peak["bytes"] <= max(READ_BUFFER_BYTES)
    assert peak["credits"] <= MODEL_CPL_DATA_CREDITS
    # commands taken and not answered, an answer counted before a command in the same cycle
    events = sorted([(accepted[("r", i)], 1) for i in range(len(reads))] +
                    [(beats[-1][1], -1) for beats in results])
    held = max(itertools.accumulate(change for _, change in events))
    print(f"read commands held unanswered: {held}")
    assert TAGS < held <= READ_COMMANDS_HELD


def test_pieces_at_every_boundary_offset():
    """Reads and writes whose first or last piece crosses (or just meets) a Max_Payload,
    Max_Read_Request or 4 KiB boundary, by every length up to a little more than the
    largest write planned from the command itself, from both sides of each boundary;
    the 4 KiB completion buffer runs full."""
    seed = 91
    rng = random.Random(seed)
    places = []
    for length in [*range(1, 20), *range(56, 72), *range(120, 136), 255, 256, 257, 700]:
        for boundary in (128, 256, PAGE):
            before = rng.choice([1, 2, 3, 4, 7, 8, 63, 64, 65, 127, length, length - 1,
                                 length + 1])
            places.append((PAGE * rng.randrange(1, 14) - before % boundary, length))
    rng.shuffle(places)
    reads = [(BASE + offset, length) for offset, length in places]
    writes = [(WRITE_BASE + offset, length, rng.randbytes(length))
              for offset, length in places]
    host, results, dones, _ = run_engine(dict(mps=128, mrrs=256, rcb=64, cpl_idle=0.2),
                                         reads=reads, writes=writes, seed=seed,
                                         read_buffer_bytes=4096, client_idle=0.05)
    for (address, length), beats in zip(reads, results):
        check_read(host, address, length, beats)
    check_writes(host, writes, dones)


def test_sizes_changed_mid_command():
    """Max_Payload_Size and Max_Read_Request_Size switch between their smallest and larger
    values every few clocks while long reads and writes are split: every request keeps to
    4 KiB and to the largest setting, the byte enables are right and so is the data."""
    seed = 93
    rng = random.Random(seed)
    reads, writes = random_reads(rng, 24), random_writes(rng, 16)
    pattern = [(128, 128, 3), (512, 1024, 5), (256, 128, 2), (128, 1024, 7)]
    host, results, dones, _ = run_engine(dict(mps=512, mrrs=1024, rcb=64),
                                         reads=reads, writes=writes, seed=seed,
                                         size_pattern=pattern)
    for (address, length), beats in zip(reads, results):
        check_read(host, address, length, beats)
    check_writes(host, writes, dones)


@pytest.mark.parametrize("fault", ["ur", "ca", "poison", "misplaced", "corrupt"])
def test_error_completions(fault):
    """C7: a read with an error completion (UR, CA, poisoned data, a lower address that
    does not match the request, payload the IP marks corrupt at its end) ends with an
    error beat after a correct prefix; reads around it are unaffected."""
    seed = {"ur": 11, "ca": 12, "poison": 13, "misplaced": 14, "corrupt": 15}[fault]
    rng = random.Random(seed)
    bad_pages = {3, 9}
    # Failing requests before, after and among good ones in a command. The good ones of
    # a failed command after the failure are dropped while their (slow) completions are
    # still to come, and the reads after it reuse their buffer space (a 4 KiB buffer).
    reads = random_reads(rng, 14) + [(BASE + 3 * PAGE - 100, 300), (BASE + 9 * PAGE, 1)]
    rng.shuffle(reads)
    reads += [(BASE + 4 * PAGE - 200, 1500)] + random_reads(rng, 6)
    host, results, _, _ = run_engine(
        dict(mps=128, mrrs=512, rcb=64, faults={3: fault, 4: "slow", 9: fault}),
        reads=reads, seed=seed, read_buffer_bytes=4096)
    failed = 0
    for (address, length), beats in zip(reads, results):
        pages = range((address - BASE) // PAGE, (address + length - 1 - BASE) // PAGE + 1)
        failed += check_read(host, address, length, beats,
                             must_fail=any(p in bad_pages for p in pages))
    assert failed >= 2


def test_completion_timeout():
    """C7: requests whose completions never come, or come after the timeout, end their
    read with an error beat; late completions are dropped and their tag is not reused
    before they arrive (the host checks); later reads still work."""
    seed = 21
    rng = random.Random(seed)
    timeout = 800
    faults = {2: "lost", 5: "late"}
    reads = random_reads(rng, 12, large=1500)
    reads[3:3] = [(BASE + 2 * PAGE + 10, 700)]
    reads[6:6] = [(BASE + 5 * PAGE - 64, 2000)]
    reads += [(BASE + 5 * PAGE + 1000, 64), (BASE + 7 * PAGE + 3, 900)]
    host, results, _, _ = run_engine(
        dict(mps=128, mrrs=512, rcb=64, faults=faults, timeout=timeout),
        reads=reads, seed=seed, timeout_cycles=timeout)
    for (address, length), beats in zip(reads, results):
        pages = range((address - BASE) // PAGE, (address + length - 1 - BASE) // PAGE + 1)
        check_read(host, address, length, beats, must_fail=any(p in faults for p in pages))
    first_beat_of_late = results[-2][0][1]
    assert first_beat_of_late > timeout, "a timed-out read ended before the timeout"


def test_tag_released_during_late_completion():
    """A 64-beat completion arrives late, its payload flowing when the engine would
    release its timed-out tag, and the next read waits for that tag: the tag is not handed
    out before that payload has ended, so the late completion cannot end the new request."""
    timeout = 256
    reads = [(BASE + PAGE, 512)] + [(BASE + 8 * i, 8) for i in range(15)] + [(BASE, 512)]
    host, results, _, _ = run_engine(
        dict(mps=128, mrrs=512, rcb=64, faults={1: "late"}, timeout=timeout,
             late_delay="at release", latency=(4, 10), cpl_idle=0, req_backpressure=0),
        reads=reads, seed=61, timeout_cycles=timeout, client_idle=0, backpressure=0)
    check_read(host, *reads[0], results[0], must_fail=True)
    for (address, length), beats in zip(reads[1:], results[1:]):
        check_read(host, address, length, beats)


def test_disabled_reads_and_writes():
    """C12: with enable low nothing is requested; each read ends at once with an error
    beat and each write completes with error after taking its data."""
    rng = random.Random(31)
    reads, writes = random_reads(rng, 6), random_writes(rng, 6)
    host, results, dones, accepted = run_engine(
        dict(mps=128, mrrs=512, rcb=64), reads=reads, writes=writes, seed=31,
        enable_pattern=[(0, 10**6)])
    assert host.reads == 0 and host.write_tlps == [] and host.memory == host.initial
    for i, beats in enumerate(results):
        assert len(beats) == 1 and beats[0][0]["error"] and beats[0][0]["last"]
        assert beats[0][1] - accepted[("r", i)] <= 12, "a disabled read did not end at once"
    assert [d["error"] for d, _ in dones] == [1] * len(writes)


def test_disable_ends_reads_in_flight():
    """C12: when enable drops, reads waiting for completions end at once with an error
    beat; their completions, arriving later, are dropped, and reads after enable rises
    again get their own data."""
    rng = random.Random(35)
    reads = random_reads(rng, 18)
    drop, rise, later = 150, 600, 700
    host, results, _, _ = run_engine(
        dict(mps=128, mrrs=512, rcb=64, latency=(300, 400)), reads=reads, seed=35,
        enable_pattern=[(1, drop), (0, rise - drop), (1, 10**6)],
        read_starts={12: later}, max_cycles=5000)
    for beats in results[:12]:
        assert beats[-1][0]["error"] and beats[-1][1] <= drop + 60
    for (address, length), beats in zip(reads[12:], results[12:]):
        check_read(host, address, length, beats)


def test_enable_toggling():
    """C12: enable drops and rises while commands run: no request is decided while it is
    low; every read is either complete and correct or ends with an error beat after a
    correct prefix; a write that reports no error was written in full, and a failed one
    left a TLP-aligned prefix written and the rest untouched."""
    seed = 41
    rng = random.Random(seed)
    reads = random_reads(rng, 16)
    writes = []
    for i in range(12):                     # disjoint, so each one can be checked alone
        length = rng.randint(1, 2000)
        address = WRITE_BASE + i * 0x1400 + rng.randrange(0x1400 - length)
        writes.append((address, length, rng.randbytes(length)))
    pattern = []
    for _ in range(40):
        pattern += [(1, rng.randint(50, 600)), (0, rng.randint(1, 80))]
    host, results, dones, _ = run_engine(dict(mps=256, mrrs=512, rcb=64), reads=reads,
                                         writes=writes, seed=seed, enable_pattern=pattern)
    # only the header of each kind decided before enable dropped may still go out
    for low_since, kind in host.headers_while_low:
        assert host.headers_while_low.count((low_since, kind)) == 1
    failed_reads = sum(check_read(host, a, n, beats, may_fail=True)
                       for (a, n), beats in zip(reads, results))
    failed_writes = 0
    for (address, length, data), (done, _) in zip(writes, dones):
        written = host.memory[address - BASE:address - BASE + length]
        original = host.initial[address - BASE:address - BASE + length]
        if not done["error"]:
            assert written == data
            continue
        failed_writes += 1
        prefix = next((i for i in range(length) if written[i] != data[i]), length)
        assert prefix < length or written == data
        assert written[prefix:] == original[prefix:]
        assert prefix == 0 or (address + prefix) % 128 == 0 or prefix == length
    assert failed_reads and failed_writes and failed_reads < len(reads)


# --- throughput through the UltraScale+ shim ----------------------------------------------

def completions_for(request, memory, base, max_payload=512):
    """Completions of a memory read as cocotbext-pcie's root complex makes them (largest
    possible TLPs up to its max payload, RCB 64)."""
    first = request.address + request.get_first_be_offset()
    count = request.get_be_byte_count()
    data = memory[(request.address - base):(request.address - base) + 4 * request.length]
    completions, done_dwords, done_bytes, address = [], 0, 0, first
    while done_dwords < request.length:
        dwords = request.length - done_dwords
        if dwords > max_payload // 4:
            dwords = max_payload // 4 - ((address & 0x3C) >> 2)
        cpl = Tlp_us(Tlp.create_completion_data_for_tlp(request, request.requester_id))
        cpl.byte_count, cpl.lower_address = count - done_bytes, address & 0xFFF
        cpl.request_completed = dwords == request.length - done_dwords
        cpl.set_data(data[4 * done_dwords:4 * (done_dwords + dwords)])
        completions.append(cpl.pack_us_rc())
        done_dwords += dwords
        done_bytes += 4 * dwords - (address & 3)
        address += 4 * dwords - (address & 3)
    return completions


def run_through_shim(width, reads, writes, *, latency=64, mps=256, mrrs=512):
    """A DmaEngine behind the UltraScale+ shim, against an always-ready host that answers
    each read after ``latency`` cycles. Returns the memory, read data and the cycles from
    the first command to the last read beat and to the last write_done."""
    shim, engine = UspShim(width), DmaEngine()
    m = Module()
    m.submodules.shim, m.submodules.engine = shim, engine
    wiring.connect(m, shim.requester, engine.requester)
    client = engine.client
    memory = bytearray(random.Random(width).randbytes(2 * READ_REGION))
    clock, rc_queue, read_data, done_at = [0], [], [], []
    read_bytes = sum(n for _, n in reads)

    async def host_rq(ctx):
        ctx.set(shim.m_axis_rq_tready, 1)
        beats = []
        async for _, _, valid, *beat in ctx.tick().sample(
                shim.m_axis_rq_tvalid, shim.m_axis_rq_tdata, shim.m_axis_rq_tkeep,
                shim.m_axis_rq_tlast, shim.m_axis_rq_tuser):
            clock[0] += 1
            if not valid:
                continue
            beats.append(tuple(beat))
            if not beat[2]:
                continue
            tlp = Tlp_us.unpack_us_rq(rq_frames(width, beats)[0], check_parity=True)
            beats = []
            if tlp.fmt_type in (TlpType.MEM_READ, TlpType.MEM_READ_64):
                for frame in completions_for(tlp, memory, BASE):
                    rc_queue.append((clock[0] + latency, rc_beats(width, frame)))
            else:
                start = tlp.address + tlp.get_first_be_offset() - BASE
                data = tlp.get_data()[tlp.get_first_be_offset():]
                memory[start:start + tlp.get_be_byte_count()] = \
                    data[:tlp.get_be_byte_count()]

    async def host_rc(ctx):
        while True:
            if not rc_queue or rc_queue[0][0] > clock[0]:
                await ctx.tick()
                continue
            for tdata, tkeep, tlast, tuser in rc_queue.pop(0)[1]:
                ctx.set(shim.s_axis_rc_tdata, tdata)
                ctx.set(shim.s_axis_rc_tkeep, tkeep)
                ctx.set(shim.s_axis_rc_tlast, tlast)
                ctx.set(shim.s_axis_rc_tuser, tuser)
                ctx.set(shim.s_axis_rc_tvalid, 1)
                await ctx.tick().until(shim.s_axis_rc_tready)
                ctx.set(shim.s_axis_rc_tvalid, 0)

    async def commands(ctx):
        ctx.set(engine.max_payload, encoding_of(mps))
        ctx.set(engine.max_read_request, encoding_of(mrrs))
        ctx.set(engine.enable, 1)
        ctx.set(client.read_data.ready, 1)
        ctx.set(client.write_done.ready, 1)
        for address, length in reads:
            await stream_put(ctx, client.read_cmd, dict(address=address, length=length))

    async def write_commands(ctx):
        for address, length, _ in writes:
            await stream_put(ctx, client.write_cmd, dict(address=address, length=length))

    async def write_data(ctx):
        for _, _, data in writes:
            for beat in beats_of(data):
                await stream_put(ctx, client.write_data, beat)

    async def monitor(ctx):
        received = 0
        async for _, _, valid, payload, done in ctx.tick().sample(
                client.read_data.valid, client.read_data.payload, client.write_done.valid):
            if valid:
                assert not payload.error
                if not read_data:
                    done_at.append(("first read", clock[0]))
                read_data.append(payload.data.to_bytes(DMA_READ_BEAT_BYTES,
                                                       "little")[:payload.count])
                received += payload.count
                if received == read_bytes:
                    done_at.append(("read", clock[0]))
            if done:
                done_at.append(("write", clock[0]))

    async def until_done(ctx):
        await wait_until(ctx, lambda: len(done_at) == (2 if reads else 0) + len(writes),
                         "stalled", 200_000)
        await ctx.tick().repeat(20)

    simulate(m, commands, write_commands, write_data, until_done,
             background=[host_rq, host_rc, monitor])
    ends = {kind: max(c for k, c in done_at if k == kind) for kind, _ in done_at}
    return memory, b"".join(read_data), ends


@pytest.mark.parametrize("width", [256, 512])
def test_throughput_through_shim(width):
    """Rate of 4 KiB reads and writes (MPS 256, MRRS 512, 64-cycle read latency, host
    always ready) behind the shim, from the first command (and, sustained, from the first
    read beat) to the last read beat or write_done; measured and printed, the data
    checked. Ceilings: 16 bytes a clock for reads (the client beat), 8 for writes, and
    the requester interface's completion beat for reads."""
    rng = random.Random(width + 51)
    n = 8
    reads = [(BASE + PAGE * i, PAGE) for i in range(n)]
    writes = [(WRITE_BASE + PAGE * i, PAGE, rng.randbytes(PAGE)) for i in range(n)]
    memory, data, ends = run_through_shim(width, reads, [])
    assert data == memory[:n * PAGE]
    read_rate = n * PAGE / ends["read"]
    sustained = n * PAGE / (ends["read"] - ends["first read"] + 1)
    memory, _, ends = run_through_shim(width, [], writes)
    assert memory[READ_REGION:READ_REGION + n * PAGE] == b"".join(w[2] for w in writes)
    write_rate = n * PAGE / ends["write"]
    print(f"\n{width} bits: 4 KiB reads {read_rate:.2f} B/clock ({sustained:.2f} sustained), "
          f"4 KiB writes {write_rate:.2f} B/clock")


@pytest.mark.parametrize("width", [256, 512])
def test_read_throughput_at_host_latency(width):
    """Rate of back-to-back 16-byte reads (descriptor-sized: bound by the tags, TAGS a
    round trip) and of 4 KiB reads (bound by the client beat) against a host answering
    after 500 ns (MPS 256, MRRS 512), from the first command (and, sustained, from the
    first read beat) to the last read beat; measured and printed, the data checked."""
    latency = HOST_LATENCY_CYCLES[0]
    rates = []
    for length, n in ((16, 8 * TAGS), (PAGE, 8)):
        reads = [(BASE + length * i, length) for i in range(n)]
        memory, data, ends = run_through_shim(width, reads, [], latency=latency)
        assert data == memory[:n * length]
        rates.append((n * length / ends["read"],
                      n * length / (ends["read"] - ends["first read"] + 1)))
    (small, small_sustained), (large, large_sustained) = rates
    print(f"\n{width} bits, host latency {latency}: 16-byte reads {small:.2f} B/clock "
          f"({small_sustained:.2f} sustained), 4 KiB reads {large:.2f} B/clock "
          f"({large_sustained:.2f} sustained)")
