"""UspShim: CQ beats to requests, completions to CC beats, requests to RQ beats, RC beats
to completions, configuration and MSI-X wiring.

Descriptors are built and parsed by small packers written from PG213; those packers are
checked against cocotbext-pcie's ``Tlp_us`` (the model the system testbench runs against),
and every CC and RQ frame the shim sends is also decoded with ``Tlp_us.unpack_us_cc`` /
``unpack_us_rq`` and checked with the model's parity function; RC frames come from
``Tlp_us.pack_us_rc``.
"""

import random

import pytest
from cocotbext.pcie.core.tlp import TlpType
from cocotbext.pcie.core.utils import PcieId
from cocotbext.pcie.xilinx.us.interface import UsPcieFrame
from cocotbext.pcie.xilinx.us.tlp import ErrorCode, Tlp_us

from amaranth.hdl import Module
from amaranth.lib import data as amaranth_data
from amaranth.lib import wiring

from memballoon.hdl.pcie.interface import (CompletionBeat, CplError, CplStatus, ReqKind,
                                           RequesterKind)
from memballoon.hdl.pcie.completer import RegCompleter
from memballoon.hdl.pcie.usp_shim import UspShim
from sim_util import simulate, stream_consumer, stream_put, wait_until

WIDTHS = [256, 512]

#: Payload dwords per neutral completion beat (``requester.cpl_data``).
CPL_BEAT_DWORDS = amaranth_data.Layout.cast(CompletionBeat)["data"].shape // 32

# PG213 request types (CQ descriptor bits 78:75)
REQ_MEM_READ, REQ_MEM_WRITE, REQ_IO_READ, REQ_IO_WRITE = 0b0000, 0b0001, 0b0010, 0b0011
REQ_FETCH_ADD, REQ_SWAP, REQ_CAS, REQ_MEM_READ_LOCKED = 0b0100, 0b0101, 0b0110, 0b0111
REQ_CFG_READ_0, REQ_CFG_WRITE_1 = 0b1000, 0b1011
REQ_MSG, REQ_MSG_VENDOR, REQ_MSG_ATS = 0b1100, 0b1101, 0b1110

EXPECTED_KIND = {
    REQ_MEM_READ: ReqKind.MEM_READ, REQ_MEM_READ_LOCKED: ReqKind.MEM_READ,
    REQ_MEM_WRITE: ReqKind.MEM_WRITE,
    REQ_IO_READ: ReqKind.UNSUPPORTED_NP, REQ_IO_WRITE: ReqKind.UNSUPPORTED_NP,
    REQ_FETCH_ADD: ReqKind.UNSUPPORTED_NP, REQ_SWAP: ReqKind.UNSUPPORTED_NP,
    REQ_CAS: ReqKind.UNSUPPORTED_NP, REQ_CFG_READ_0: ReqKind.UNSUPPORTED_NP,
    REQ_CFG_WRITE_1: ReqKind.UNSUPPORTED_NP,
    REQ_MSG: ReqKind.UNSUPPORTED_P, REQ_MSG_VENDOR: ReqKind.UNSUPPORTED_P,
    REQ_MSG_ATS: ReqKind.UNSUPPORTED_P,
}
TLP_TYPE = {REQ_MEM_READ: TlpType.MEM_READ_64, REQ_MEM_WRITE: TlpType.MEM_WRITE_64,
            REQ_IO_READ: TlpType.IO_READ, REQ_IO_WRITE: TlpType.IO_WRITE,
            REQ_FETCH_ADD: TlpType.FETCH_ADD_64, REQ_SWAP: TlpType.SWAP_64,
            REQ_CAS: TlpType.CAS_64, REQ_MEM_READ_LOCKED: TlpType.MEM_READ_LOCKED_64}


# --- packers written from PG213 ("Completer Request Descriptor Format",
#     "Completer Completion Descriptor Format") -----------------------------------------

def cq_descriptor(r):
    """Four dwords of a CQ descriptor."""
    return [
        r["address"] & 0xFFFF_FFFC | r["at"],
        r["address"] >> 32,
        r["dwords"] | r["req_type"] << 11 | r["requester_id"] << 16,
        r["tag"] | r["function"] << 8 | r["bar_id"] << 16 | r["bar_aperture"] << 19 |
        r["tc"] << 25 | r["attr"] << 28,
    ]


def cc_fields(dw):
    """Fields of a CC descriptor (three dwords)."""
    return dict(
        lower_address=dw[0] & 0x7F, at=dw[0] >> 8 & 3, byte_count=dw[0] >> 16 & 0x1FFF,
        locked=dw[0] >> 29 & 1, reserved0=dw[0] & 0xC000_FC80,
        dwords=dw[1] & 0x7FF, status=dw[1] >> 11 & 7, poisoned=dw[1] >> 14 & 1,
        reserved1=dw[1] >> 15 & 1, requester_id=dw[1] >> 16,
        tag=dw[2] & 0xFF, completer_id=dw[2] >> 8 & 0xFFFF, completer_id_enable=dw[2] >> 24 & 1,
        tc=dw[2] >> 25 & 7, attr=dw[2] >> 28 & 7, force_ecrc=dw[2] >> 31,
    )


def odd_parity(dword):
    """One bit per byte, set when the byte has an even number of ones."""
    return sum((bin(dword >> 8 * b & 0xFF).count("1") + 1) % 2 << b for b in range(4))


def cq_beats(width, frame_dwords, first_be, last_be, byte_en, discontinue=False):
    """AXI beats (tdata, tkeep, tlast, tuser) of one CQ TLP, DWORD-aligned, no straddle;
    ``discontinue`` sets that bit in the last beat."""
    lanes = width // 32
    be_at, parity_at = (16, 119) if width == 512 else (8, 53)
    discontinue_at = 96 if width == 512 else 41
    beats = []
    for start in range(0, len(frame_dwords), lanes):
        chunk = frame_dwords[start:start + lanes]
        last = start + lanes >= len(frame_dwords)
        tuser = 0
        if start == 0:
            if width == 512:    # first_be[3:0], last_be[11:8], is_sop[80]
                tuser |= first_be | last_be << 8 | 1 << 80
            else:               # first_be[3:0], last_be[7:4], sop[40]
                tuser |= first_be | last_be << 4 | 1 << 40
        if last and width == 512:   # is_eop[86], is_eop0_ptr[91:88]
            tuser |= 1 << 86 | (len(chunk) - 1) << 88
        if last and discontinue:
            tuser |= 1 << discontinue_at
        for i, dword in enumerate(chunk):
            tuser |= byte_en[start + i] << be_at + 4 * i
            tuser |= odd_parity(dword) << parity_at + 4 * i
        tdata = sum(d << 32 * i for i, d in enumerate(chunk))
        beats.append((tdata, (1 << len(chunk)) - 1, last, tuser))
    return beats


def random_cq_request(rng, req_type=None):
    req_type = rng.choice(list(EXPECTED_KIND)) if req_type is None else req_type
    dwords = rng.randint(1, 40) if req_type == REQ_MEM_WRITE else rng.randint(1, 16)
    if req_type in (REQ_IO_READ, REQ_IO_WRITE):
        dwords = 1
    aperture = rng.choice([12, 14, 20, 31, 32, 40])
    base = rng.randrange(1 << max(48 - aperture, 1)) << aperture
    address = base + 4 * rng.randrange((1 << aperture) // 4)
    first_be = rng.randrange(16) if dwords == 1 else rng.randint(1, 15)
    last_be = 0 if dwords == 1 else rng.randint(1, 15)
    has_payload = req_type in (REQ_MEM_WRITE, REQ_IO_WRITE, REQ_FETCH_ADD, REQ_SWAP,
                               REQ_CAS, REQ_MSG_VENDOR, REQ_CFG_WRITE_1)
    return dict(req_type=req_type, address=address, at=rng.randrange(4), dwords=dwords,
                requester_id=rng.randrange(1 << 16), tag=rng.randrange(256),
                function=rng.randrange(4), bar_id=rng.randrange(6), bar_aperture=aperture,
                tc=rng.randrange(8), attr=rng.randrange(8), first_be=first_be,
                last_be=last_be,
                payload=[rng.randrange(1 << 32) for _ in range(dwords)] if has_payload else [],
                discontinue=rng.random() < 0.2)


def expected_request(r):
    return dict(kind=EXPECTED_KIND[r["req_type"]], bar=r["bar_id"],
                offset=r["address"] % (1 << r["bar_aperture"]) & 0xFFFF_FFFC & 0xFFFF_FFFF,
                dwords=r["dwords"], first_be=r["first_be"], last_be=r["last_be"],
                requester_id=r["requester_id"], tag=r["tag"], tc=r["tc"], attr=r["attr"],
                locked=int(r["req_type"] == REQ_MEM_READ_LOCKED))


def cq_tlp_beats(width, r):
    """The CQ beats of request ``r`` (``random_cq_request``'s fields)."""
    n = len(r["payload"])
    byte_en = [0] * 4 + [r["first_be"] if i == 0 else r["last_be"] if i == n - 1 else 0xF
                         for i in range(n)]
    return cq_beats(width, cq_descriptor(r) + r["payload"], r["first_be"], r["last_be"],
                    byte_en, r["discontinue"])


def test_cq_descriptor_packer_matches_cocotbext():
    rng = random.Random(11)
    for _ in range(300):
        r = random_cq_request(rng, rng.choice(list(TLP_TYPE)))
        tlp = Tlp_us()
        tlp.fmt_type = TLP_TYPE[r["req_type"]]
        tlp.address, tlp.at, tlp.length = r["address"], r["at"], r["dwords"]
        tlp.requester_id = PcieId.from_int(r["requester_id"])
        tlp.completer_id = PcieId(0, 0, r["function"])
        tlp.tag, tlp.tc, tlp.attr = r["tag"], r["tc"], r["attr"]
        tlp.bar_id, tlp.bar_aperture = r["bar_id"], r["bar_aperture"]
        assert tlp.pack_us_cq().data[:4] == cq_descriptor(r)


def test_cc_parser_matches_cocotbext():
    rng = random.Random(12)
    for _ in range(300):
        tlp = Tlp_us()
        tlp.fmt_type = TlpType.CPL_DATA
        tlp.lower_address, tlp.byte_count = rng.randrange(128), rng.randrange(1 << 13)
        tlp.length, tlp.status = rng.randrange(1 << 11), rng.choice(list(CplStatus)).value
        tlp.requester_id = PcieId.from_int(rng.randrange(1 << 16))
        tlp.completer_id = PcieId.from_int(rng.randrange(1 << 16))
        tlp.tag, tlp.tc, tlp.attr = rng.randrange(256), rng.randrange(8), rng.randrange(8)
        f = cc_fields(tlp.pack_us_cc().data[:3])
        assert (f["lower_address"], f["byte_count"], f["dwords"], f["status"],
                f["requester_id"], f["completer_id"], f["tag"], f["tc"], f["attr"]) == \
            (tlp.lower_address, tlp.byte_count, tlp.length, tlp.status,
             int(tlp.requester_id), int(tlp.completer_id), tlp.tag, tlp.tc, tlp.attr)


# --- simulation helpers ----------------------------------------------------------------

async def axis_put(ctx, dut, port, beat, rng, idle, width):
    """Drive one (tdata, tkeep, tlast, tuser) beat on the IP-side stream ``port`` (e.g.
    ``"s_axis_cq"``) after seeded idle cycles; once taken, tdata turns to garbage."""
    tdata, tkeep, tlast, tuser = beat
    while rng.random() < idle:
        await ctx.tick()
    ctx.set(getattr(dut, f"{port}_tdata"), tdata)
    ctx.set(getattr(dut, f"{port}_tkeep"), tkeep)
    ctx.set(getattr(dut, f"{port}_tlast"), tlast)
    ctx.set(getattr(dut, f"{port}_tuser"), tuser)
    ctx.set(getattr(dut, f"{port}_tvalid"), 1)
    await ctx.tick().until(getattr(dut, f"{port}_tready"))
    ctx.set(getattr(dut, f"{port}_tvalid"), 0)
    ctx.set(getattr(dut, f"{port}_tdata"), rng.randrange(1 << width))


def axis_sink(dut, port, beats, rng, backpressure):
    """Consumer of the IP-side stream ``port`` (e.g. ``"m_axis_rq"``) with seeded
    backpressure: appends each (tdata, tkeep, tlast, tuser) taken to ``beats`` and checks
    the AXI-stream rule that a beat is held until taken."""
    signals = [getattr(dut, f"{port}_{name}")
               for name in ("tvalid", "tready", "tdata", "tkeep", "tlast", "tuser")]

    async def consume(ctx):
        stalled = None
        async for _, _, valid, ready, *beat in ctx.tick().sample(*signals):
            if stalled is not None:
                assert valid and beat == stalled, f"{port} beat changed under backpressure"
            if valid and ready:
                beats.append(tuple(beat))
            stalled = beat if valid and not ready else None
            ctx.set(signals[1], rng.random() >= backpressure)
    return consume


def axis_frames(width, beats, name, check_tuser):
    """Split the beats of stream ``name`` (CC, RQ) into ``UsPcieFrame``s, checking that
    tkeep is contiguous, only the last beat is short and the parity is right;
    ``check_tuser(frame, tuser, sop, tlast, count)`` checks a beat's tuser fields and
    returns the bit its parity starts at."""
    lanes = width // 32
    frames, frame = [], None
    for tdata, tkeep, tlast, tuser in beats:
        sop = frame is None
        if sop:
            frame = UsPcieFrame()
        count = bin(tkeep).count("1")
        assert tkeep == (1 << count) - 1, "tkeep not contiguous from lane 0"
        assert tlast or count == lanes, "a beat before the last one is not full"
        parity_at = check_tuser(frame, tuser, sop, tlast, count)
        for lane in range(count):
            frame.data.append(tdata >> 32 * lane & 0xFFFF_FFFF)
            frame.parity.append(tuser >> parity_at + 4 * lane & 0xF)
        if tlast:
            assert frame.check_parity(), f"{name} parity"
            frames.append(frame)
            frame = None
    assert frame is None
    return frames


# --- CQ --------------------------------------------------------------------------------

@pytest.mark.parametrize("width", WIDTHS)
def test_cq_requests(width):
    """Random requests of every type, multi-beat writes, idle on CQ and backpressure on
    req/req_data: one header per TLP, payload dwords only for memory writes; a TLP with
    discontinue on its last beat (PG213: discard the entire TLP) leaves nothing."""
    rng = random.Random(width)
    dut = UspShim(width)
    requests = [random_cq_request(rng) for _ in range(150)]
    intact = [r for r in requests if not r["discontinue"]]
    assert any(r["discontinue"] and r["req_type"] == REQ_MEM_WRITE and
               len(cq_tlp_beats(width, r)) > 2 for r in requests)
    headers, beats = [], []

    async def cq_source(ctx):
        for r in requests:
            for beat in cq_tlp_beats(width, r):
                await axis_put(ctx, dut, "s_axis_cq", beat, rng, 0.3, width)
        expected_beats = sum(len(r["payload"]) for r in intact
                             if r["req_type"] == REQ_MEM_WRITE)
        await wait_until(ctx, lambda: (len(headers), len(beats)) == (len(intact),
                                                                       expected_beats),
                         "CQ stalled")
        await ctx.tick().repeat(20)

    comp = dut.completer
    simulate(dut, cq_source, background=[stream_consumer(comp.req, headers.append, rng, 0.4),
                                         stream_consumer(comp.req_data, beats.append, rng, 0.4)])

    assert [{k: getattr(h, k) for k in ("kind", "bar", "offset", "dwords", "first_be",
                                        "last_be", "requester_id", "tag", "tc", "attr",
                                        "locked")}
            for h in headers] == [expected_request(r) for r in intact]
    expected = [(word, i == len(r["payload"]) - 1) for r in intact
                if r["req_type"] == REQ_MEM_WRITE for i, word in enumerate(r["payload"])]
    assert [(b.data, bool(b.last)) for b in beats] == expected


def cq_request(req_type, address, payload=(), dwords=None, first_be=0xF, last_be=0xF,
               tag=0, discontinue=False):
    """A request to BAR0 (16 KiB) for ``cq_tlp_beats``."""
    dwords = len(payload) if dwords is None else dwords
    return dict(req_type=req_type, address=0xFE00_0000 + address, at=0, dwords=dwords,
                requester_id=0x0100, tag=tag, function=0, bar_id=0, bar_aperture=14,
                tc=0, attr=0, first_be=first_be, last_be=0 if dwords == 1 else last_be,
                payload=list(payload), discontinue=discontinue)


@pytest.mark.parametrize("width", WIDTHS)
def test_discontinue_and_locked_read_reach_no_register(width):
    """Shim and RegCompleter over a register file: a write over several beats with
    discontinue on its last one (PG213: discard the entire TLP) changes no register, not
    even the dwords of its first beats, and neither does a one-beat one; a discontinued
    read gets no completion and reads nothing (read side effects, C2); a locked read gets
    a locked UR completion (CplLk: PCIe Base 6.5, only legacy endpoints support locking)
    without a register read; the writes and reads after them work."""
    rng = random.Random(width + 7)
    m = Module()
    m.submodules.shim = shim = UspShim(width)
    m.submodules.completer = completer = RegCompleter(addr_width=12)
    wiring.connect(m, shim.completer, completer.completer)
    bus = completer.bus
    regs = {a: rng.randrange(1 << 32) for a in range(1 << 12)}
    initial = dict(regs)
    accesses, beats = [], []

    long_write = [rng.randrange(1 << 32) for _ in range(40)]    # 3 beats at 512, 6 at 256
    requests = [
        cq_request(REQ_MEM_WRITE, 0x3000, long_write, discontinue=True),
        cq_request(REQ_MEM_WRITE, 0x0014, [0x1234_5678, 0x9ABC_DEF0], discontinue=True),
        cq_request(REQ_MEM_READ, 0x2000, dwords=1, first_be=0x1, tag=1, discontinue=True),
        cq_request(REQ_MEM_READ_LOCKED, 0x2000, dwords=1, first_be=0x1, tag=2),
        cq_request(REQ_MEM_WRITE, 0x3000, long_write),
        cq_request(REQ_MEM_READ, 0x2000, dwords=1, first_be=0x1, tag=3),
    ]

    async def cq_source(ctx):
        ctx.set(completer.max_payload, 0)
        for r in requests:
            for beat in cq_tlp_beats(width, r):
                await axis_put(ctx, shim, "s_axis_cq", beat, rng, 0.3, width)
        await wait_until(ctx, lambda: sum(b[2] for b in beats) == 2, "CC stalled")
        await ctx.tick().repeat(50)

    async def register_slave(ctx):
        async for _, _, r_stb, w_stb, addr, r_strb, w_strb, w_data in ctx.tick().sample(
                bus.r_stb, bus.w_stb, bus.addr, bus.r_strb, bus.w_strb, bus.w_data):
            ctx.set(bus.ready, 1)
            if w_stb:
                mask = sum(0xFF << 8 * b for b in range(4) if w_strb >> b & 1)
                regs[addr] = regs[addr] & ~mask | w_data & mask
                accesses.append(("w", addr))
            if r_stb:
                ctx.set(bus.r_data, regs[addr])
                accesses.append(("r", addr, r_strb))

    simulate(m, cq_source, background=[axis_sink(shim, "m_axis_cc", beats, rng, 0.3),
                                       register_slave])

    assert accesses == [("w", 0xC00 + i) for i in range(40)] + [("r", 0x800, 0x1)]
    assert regs == {**initial, **{0xC00 + i: word for i, word in enumerate(long_write)}}
    frames = cc_frames(width, beats)
    ur, sc = (cc_fields(frame.data[:3]) for frame in frames)
    assert (ur["tag"], ur["status"], ur["locked"], ur["dwords"]) == \
        (2, CplStatus.UR.value, 1, 0)
    assert Tlp_us.unpack_us_cc(frames[0]).fmt_type == TlpType.CPL_LOCKED
    assert (sc["tag"], sc["status"], sc["locked"]) == (3, CplStatus.SC.value, 0)
    assert frames[1].data[3:] == [initial[0x800]]


# --- CC --------------------------------------------------------------------------------

def random_completion(rng):
    status = rng.choice([CplStatus.SC] * 3 + [CplStatus.UR, CplStatus.CA])
    dwords = rng.choice([1, 2, 3, 4, 5, 6, 12, 13, 14, 29, 30, 64]) \
        if status == CplStatus.SC else 0
    return dict(requester_id=rng.randrange(1 << 16), tag=rng.randrange(256),
                tc=rng.randrange(8), attr=rng.randrange(8), status=status,
                byte_count=rng.randint(1, 4096), lower_address=rng.randrange(128),
                dwords=dwords, data=[rng.randrange(1 << 32) for _ in range(dwords)],
                locked=int(rng.random() < 0.2))


def cc_frames(width, beats):
    """Split CC beats into frames, checking tkeep, tlast and tuser on the way."""
    def check_tuser(frame, tuser, sop, tlast, count):
        if width != 512:
            assert tuser & 1 == 0, "discontinue"
            return 1
        assert tuser & 0x3 == int(sop), "is_sop"
        assert tuser >> 2 & 0xF == 0, "is_sop0/1_ptr"
        assert tuser >> 6 & 0x3 == int(tlast), "is_eop"
        if tlast:           # the pointer only means something with is_eop
            assert tuser >> 8 & 0xF == count - 1, "is_eop0_ptr"
        assert tuser >> 12 & 0x1F == 0, "is_eop1_ptr, discontinue"
        return 17
    return axis_frames(width, beats, "CC", check_tuser)


@pytest.mark.parametrize("width", WIDTHS)
def test_cc_completions(width):
    """Completions with 0..64 dwords under idle and CC backpressure become one
    descriptor-plus-payload frame each, decoded identically by ``Tlp_us`` (a locked one
    as CplLk/CplDLk)."""
    rng = random.Random(width + 1)
    dut = UspShim(width)
    completions = [random_completion(rng) for _ in range(120)]
    comp = dut.completer
    beats = []

    async def cpl_source(ctx):
        for c in completions:
            await stream_put(ctx, comp.cpl, {k: v for k, v in c.items() if k != "data"},
                             rng, 0.3)

    async def cpl_data_source(ctx):
        for c in completions:
            for i, word in enumerate(c["data"]):
                await stream_put(ctx, comp.cpl_data,
                                 {"data": word, "last": i == len(c["data"]) - 1}, rng, 0.3)
        await wait_until(ctx, lambda: sum(b[2] for b in beats) == len(completions),
                         "CC stalled")
        await ctx.tick().repeat(20)

    simulate(dut, cpl_source, cpl_data_source,
             background=[axis_sink(dut, "m_axis_cc", beats, rng, 0.4)])

    frames = cc_frames(width, beats)
    assert len(frames) == len(completions)
    for frame, c in zip(frames, completions):
        fields = cc_fields(frame.data[:3])
        assert fields == dict(
            lower_address=c["lower_address"], at=0, byte_count=c["byte_count"],
            locked=c["locked"],
            reserved0=0, dwords=c["dwords"], status=c["status"].value, poisoned=0,
            reserved1=0, requester_id=c["requester_id"], tag=c["tag"], completer_id=0,
            completer_id_enable=0, tc=c["tc"], attr=c["attr"], force_ecrc=0)
        assert frame.data[3:] == c["data"]
        tlp = Tlp_us.unpack_us_cc(frame, check_parity=True)
        assert (tlp.lower_address, tlp.byte_count, tlp.length, tlp.status, tlp.tag,
                int(tlp.requester_id)) == (c["lower_address"], c["byte_count"],
                                           c["dwords"], c["status"].value, c["tag"],
                                           c["requester_id"])
        assert bytes(tlp.data) == b"".join(w.to_bytes(4, "little") for w in c["data"])
        assert tlp.fmt_type in ({TlpType.CPL_LOCKED, TlpType.CPL_LOCKED_DATA} if c["locked"]
                                else {TlpType.CPL, TlpType.CPL_DATA})


# --- configuration, status, MSI-X ----------------------------------------------------

@pytest.mark.parametrize("width", WIDTHS)
def test_config_status_and_idle_requester(width):
    """cfg_ext, command/status (bus master enable for C12, INTx disable for C11, FLR for
    C9) and MSI-X sideband map 1:1 for PF0; with no DMA the requester sends nothing and
    takes completions."""
    rng = random.Random(width + 2)
    dut = UspShim(width)
    # the widths cocotbext-pcie asserts when it connects by name
    tuser = {512: [183, 81, 137, 161], 256: [88, 33, 62, 75]}[width]
    assert [len(p) for p in (dut.s_axis_cq_tuser, dut.m_axis_cc_tuser, dut.m_axis_rq_tuser,
                             dut.s_axis_rc_tuser)] == tuser
    assert len(dut.s_axis_cq_tkeep) == len(dut.m_axis_cc_tkeep) == width // 32

    async def testbench(ctx):
        for _ in range(50):
            values = dict(
                cfg_ext_read_received=rng.randrange(2), cfg_ext_write_received=rng.randrange(2),
                cfg_ext_register_number=rng.randrange(1 << 10),
                cfg_ext_function_number=rng.randrange(256),
                cfg_ext_write_data=rng.randrange(1 << 32),
                cfg_ext_write_byte_enable=rng.randrange(16),
                cfg_function_status=rng.randrange(1 << 16), cfg_max_payload=rng.randrange(4),
                cfg_max_read_req=rng.randrange(8), cfg_flr_in_process=rng.randrange(16),
                cfg_interrupt_msix_enable=rng.randrange(16),
                cfg_interrupt_msix_mask=rng.randrange(16),
                cfg_interrupt_msix_sent=rng.randrange(2), cfg_interrupt_msix_fail=rng.randrange(2))
            neutral = dict(read_data=rng.randrange(1 << 32), read_data_valid=rng.randrange(2),
                           address=rng.randrange(1 << 64), data=rng.randrange(1 << 32),
                           flr_done=rng.randrange(2))
            for name, value in values.items():
                ctx.set(getattr(dut, name), value)
            ctx.set(dut.cfg_ext.read_data, neutral["read_data"])
            ctx.set(dut.cfg_ext.read_data_valid, neutral["read_data_valid"])
            ctx.set(dut.msix.address, neutral["address"])
            ctx.set(dut.msix.data, neutral["data"])
            ctx.set(dut.status.flr_done, neutral["flr_done"])

            ext = dut.cfg_ext
            assert [ctx.get(s) for s in (ext.read_received, ext.write_received,
                                         ext.register_number, ext.function_number,
                                         ext.write_data, ext.write_byte_enable)] == \
                [values["cfg_ext_" + n] for n in ("read_received", "write_received",
                                                  "register_number", "function_number",
                                                  "write_data", "write_byte_enable")]
            assert ctx.get(dut.cfg_ext_read_data) == neutral["read_data"]
            assert ctx.get(dut.cfg_ext_read_data_valid) == neutral["read_data_valid"]

            status = values["cfg_function_status"]
            assert ctx.get(dut.status.memory_enable) == status >> 1 & 1
            assert ctx.get(dut.status.bus_master_enable) == status >> 2 & 1
            assert ctx.get(dut.status.interrupt_disable) == status >> 3 & 1
            assert ctx.get(dut.status.max_payload) == values["cfg_max_payload"]
            assert ctx.get(dut.status.max_read_request) == values["cfg_max_read_req"]
            assert ctx.get(dut.status.flr) == values["cfg_flr_in_process"] & 1
            assert ctx.get(dut.cfg_flr_done) == neutral["flr_done"]

            assert ctx.get(dut.msix.enable) == values["cfg_interrupt_msix_enable"] & 1
            assert ctx.get(dut.msix.function_mask) == values["cfg_interrupt_msix_mask"] & 1
            assert ctx.get(dut.msix.sent) == values["cfg_interrupt_msix_sent"]
            assert ctx.get(dut.msix.fail) == values["cfg_interrupt_msix_fail"]
            assert ctx.get(dut.cfg_interrupt_msix_address) == neutral["address"]
            assert ctx.get(dut.cfg_interrupt_msix_data) == neutral["data"]
            assert ctx.get(dut.cfg_interrupt_msi_function_number) == 0

            assert ctx.get(dut.pcie_cq_np_req) == 0b01
            assert ctx.get(dut.m_axis_rq_tvalid) == 0
            assert ctx.get(dut.s_axis_rc_tready) == 1
            await ctx.tick()

    simulate(dut, testbench)


@pytest.mark.parametrize("width", WIDTHS)
def test_msix_one_pulse_per_message(width):
    """C11: a held msix.valid gives one cycle of cfg_interrupt_msix_int per message; the next
    message (valid still high with new data, or raised again) pulses after sent/fail."""
    rng = random.Random(width + 3)
    dut = UspShim(width)
    msix = dut.msix
    pulses = []

    async def monitor(ctx):
        async for _, _, pulse, address, data in ctx.tick().sample(
                dut.cfg_interrupt_msix_int, dut.cfg_interrupt_msix_address,
                dut.cfg_interrupt_msix_data):
            if pulse:
                pulses.append((address, data))

    async def ip_answer(ctx, answer):
        """Answer a message after a random delay, like the IP's one-cycle sent/fail."""
        await ctx.tick().repeat(rng.randint(2, 6))
        ctx.set(answer, 1)
        await ctx.tick()
        ctx.set(answer, 0)

    async def device(ctx):
        messages = [(rng.randrange(1 << 64), rng.randrange(1 << 32)) for _ in range(6)]
        for i, (address, data) in enumerate(messages):
            ctx.set(msix.address, address)
            ctx.set(msix.data, data)
            ctx.set(msix.valid, 1)
            answer = dut.cfg_interrupt_msix_fail if i == 2 else dut.cfg_interrupt_msix_sent
            await ip_answer(ctx, answer)
            if i % 2:                   # sometimes drop valid between messages
                ctx.set(msix.valid, 0)
                await ctx.tick().repeat(3)
        ctx.set(msix.valid, 0)
        await ctx.tick().repeat(5)
        assert pulses == messages

    simulate(dut, device, background=[monitor])


@pytest.mark.parametrize("width", WIDTHS)
def test_intx_handshake(width):
    """C11, PG213 "Legacy Interrupt Mode": INTA on cfg_interrupt_int[0] follows
    intx.wanted, one edge at a time: after an edge it holds until the IP's
    cfg_interrupt_sent, so a level held for a single cycle still makes an assert and a
    deassert; cfg_interrupt_pending[0] is intx.pending, and stays up while INTA does.
    The wanted level changes after random idle, the IP answers after random delays."""
    rng = random.Random(width + 4)
    dut = UspShim(width)
    intx = dut.intx
    edges = []                  # (level, cycle) of each edge the IP took
    violations = []
    cycle = 0

    async def ip(ctx):
        """The PCIE4 block's side: take an edge, answer it with a one-cycle sent."""
        nonlocal cycle
        taken = 0
        while True:
            await ctx.tick()
            cycle += 1
            inta, pending = ctx.get(dut.cfg_interrupt_int), ctx.get(dut.cfg_interrupt_pending)
            if pending != ctx.get(intx.pending) | inta & 1 or inta >> 1 or pending >> 1:
                violations.append(f"cycle {cycle}: int {inta:#x}, pending {pending:#x}")
            if inta == taken:
                continue
            taken = inta
            edges.append((inta, cycle))
            for _ in range(rng.randint(0, 6)):
                await ctx.tick()
                cycle += 1
                if ctx.get(dut.cfg_interrupt_int) != taken:
                    violations.append(f"cycle {cycle}: INTA changed before cfg_interrupt_sent")
            ctx.set(dut.cfg_interrupt_sent, 1)
            await ctx.tick()
            cycle += 1
            ctx.set(dut.cfg_interrupt_sent, 0)

    async def device(ctx):
        # A one-cycle request: an assert and a deassert all the same.
        ctx.set(intx.pending, 1)
        ctx.set(intx.wanted, 1)
        await ctx.tick()
        ctx.set(intx.pending, 0)
        ctx.set(intx.wanted, 0)
        await ctx.tick().repeat(20)
        assert [level for level, _ in edges] == [1, 0]
        # Random levels, held for random times (Interrupt Disable: pending without wanted).
        for _ in range(200):
            pending = rng.randrange(2)
            ctx.set(intx.pending, pending)
            ctx.set(intx.wanted, pending & rng.randrange(2))
            await ctx.tick().repeat(rng.choice([1, 1, 2, 3, rng.randint(4, 20)]))
        final = ctx.get(intx.wanted)
        await ctx.tick().repeat(20)
        assert ctx.get(dut.cfg_interrupt_int) == final
        assert not violations, violations[:5]
        levels = [level for level, _ in edges]
        assert levels == [1, 0] * (len(levels) // 2) + [1] * (len(levels) % 2)
        assert len(edges) > 60, f"only {len(edges)} edges: the random levels barely moved"

    simulate(dut, device, background=[ip])


# --- RQ ---------------------------------------------------------------------------------

def rq_descriptor(r):
    """Four dwords of an RQ descriptor (PG213 "Requester Request Descriptor Format")."""
    return [
        r["address"] & 0xFFFF_FFFC | r.get("at", 0),
        r["address"] >> 32 & 0xFFFF_FFFF,
        r["dwords"] | r["req_type"] << 11 | r.get("poisoned", 0) << 15 |
        r.get("requester_id", 0) << 16,
        r["tag"] | r.get("completer_id", 0) << 8 | r.get("requester_id_enable", 0) << 24 |
        r.get("tc", 0) << 25 | r.get("attr", 0) << 28,
    ]


def test_rq_descriptor_packer_matches_cocotbext():
    rng = random.Random(13)
    for _ in range(300):
        r = dict(req_type=rng.choice([REQ_MEM_READ, REQ_MEM_WRITE]),
                 address=rng.randrange(1 << 64) & ~3, at=rng.randrange(4),
                 dwords=rng.randint(1, 1024), requester_id=rng.randrange(1 << 16),
                 completer_id=rng.randrange(1 << 16), requester_id_enable=rng.randrange(2),
                 tag=rng.randrange(256), tc=rng.randrange(8), attr=rng.randrange(8),
                 poisoned=rng.randrange(2))
        tlp = Tlp_us()
        tlp.fmt_type = TLP_TYPE[r["req_type"]]
        tlp.address, tlp.at, tlp.length, tlp.ep = r["address"], r["at"], r["dwords"], \
            bool(r["poisoned"])
        tlp.requester_id = PcieId.from_int(r["requester_id"])
        tlp.completer_id = PcieId.from_int(r["completer_id"])
        tlp.requester_id_enable = bool(r["requester_id_enable"])
        tlp.tag, tlp.tc, tlp.attr = r["tag"], r["tc"], r["attr"]
        assert tlp.pack_us_rq().data[:4] == rq_descriptor(r)


def random_rq_request(rng):
    kind = rng.choice([RequesterKind.MEM_READ, RequesterKind.MEM_WRITE])
    if kind == RequesterKind.MEM_READ:
        dwords = rng.choice([1, 2, 3, rng.randint(4, 1024), 1024])
    else:
        dwords = rng.choice([1, 2, 3, 4, 5, 11, 12, 13, rng.randint(14, 40), 64, 128])
    first_be = rng.randint(1, 15)
    last_be = 0 if dwords == 1 else rng.randint(1, 15)
    address = rng.randrange(1 << rng.choice([32, 64]))      # bits 1..0 must be ignored
    return dict(kind=kind, address=address, dwords=dwords, first_be=first_be,
                last_be=last_be, tag=rng.randrange(256),
                data=[rng.randrange(1 << 32) for _ in range(dwords)]
                if kind == RequesterKind.MEM_WRITE else [])


def rq_frames(width, beats):
    """Split RQ beats into frames, checking tkeep, tlast and every tuser field."""
    def check_tuser(frame, tuser, sop, tlast, count):
        if width != 512:
            if sop:
                frame.first_be, frame.last_be = tuser & 0xF, tuser >> 4 & 0xF
            assert tuser >> 8 & 0xFFFFF == 0, "addr_offset, discontinue, TPH, seq_num"
            assert tuser >> 60 == 0, "seq_num[5:4]"
            return 28
        if sop:
            frame.first_be, frame.last_be = tuser & 0xF, tuser >> 8 & 0xF
        assert tuser >> 4 & 0xF == 0 and tuser >> 12 & 0xFF == 0, \
            "second first/last_be, addr_offset"
        assert tuser >> 20 & 0x3 == int(sop), "is_sop"
        assert tuser >> 22 & 0xF == 0, "is_sop0/1_ptr"
        assert tuser >> 26 & 0x3 == int(tlast), "is_eop"
        if tlast:
            assert tuser >> 28 & 0xF == count - 1, "is_eop0_ptr"
        assert tuser >> 32 & (1 << 41) - 1 == 0, "is_eop1_ptr, discontinue, TPH, seq_num"
        return 73
    return axis_frames(width, beats, "RQ", check_tuser)


def run_rq(width, requests, rng, idle, backpressure):
    """Requests through the shim; returns the RQ frames and the cycles taken."""
    dut = UspShim(width)
    req, req_data = dut.requester.req, dut.requester.req_data
    beats, cycles = [], []

    async def header_source(ctx):
        for r in requests:
            await stream_put(ctx, req, {k: v for k, v in r.items() if k != "data"}, rng, idle)

    async def payload_source(ctx):
        for r in requests:
            words = r["data"] + [0] * (len(r["data"]) % 2)
            for i in range(0, len(words), 2):
                await stream_put(ctx, req_data, {"data": words[i] | words[i + 1] << 32,
                                                 "last": i + 2 >= len(words)}, rng, idle)

    async def until_sent(ctx):
        cycles.append(await wait_until(ctx, lambda: sum(b[2] for b in beats) == len(requests),
                                       "RQ stalled"))
        await ctx.tick().repeat(10)

    simulate(dut, header_source, payload_source, until_sent,
             background=[axis_sink(dut, "m_axis_rq", beats, rng, backpressure)])
    return rq_frames(width, beats), cycles[0]


@pytest.mark.parametrize("width", WIDTHS)
def test_rq_requests(width):
    """Reads and writes of 1..1024 dwords with idle on req/req_data and RQ backpressure:
    one descriptor-plus-payload frame each, decoded identically by ``Tlp_us``; requester
    ID 0 with requester ID enable 0, so the IP supplies its own for PF0."""
    rng = random.Random(width + 4)
    requests = [random_rq_request(rng) for _ in range(150)]
    frames, _ = run_rq(width, requests, rng, idle=0.3, backpressure=0.4)
    assert len(frames) == len(requests)
    for frame, r in zip(frames, requests):
        req_type = REQ_MEM_WRITE if r["kind"] == RequesterKind.MEM_WRITE else REQ_MEM_READ
        assert frame.data[:4] == rq_descriptor(dict(r, req_type=req_type))
        assert (frame.first_be, frame.last_be) == (r["first_be"], r["last_be"])
        assert frame.data[4:] == r["data"]
        tlp = Tlp_us.unpack_us_rq(frame, check_parity=True)
        assert tlp.fmt_type == {(REQ_MEM_READ, False): TlpType.MEM_READ,
                                (REQ_MEM_READ, True): TlpType.MEM_READ_64,
                                (REQ_MEM_WRITE, False): TlpType.MEM_WRITE,
                                (REQ_MEM_WRITE, True): TlpType.MEM_WRITE_64}[
            req_type, r["address"] > 0xFFFF_FFFF]
        assert (tlp.address, tlp.length, tlp.first_be, tlp.last_be, tlp.tag) == \
            (r["address"] & ~3, r["dwords"], r["first_be"], r["last_be"], r["tag"])
        assert int(tlp.requester_id) == 0 and not tlp.requester_id_enable
        assert bytes(tlp.data) == b"".join(w.to_bytes(4, "little") for w in r["data"])


@pytest.mark.parametrize("width", WIDTHS)
def test_rq_payload_rate(width):
    """Back-to-back writes without idle or backpressure: a header is taken with its first
    payload beat and a full beat leaves while the next one fills, so the payload flows at
    two dwords a clock."""
    rng = random.Random(width + 5)
    requests = [dict(kind=RequesterKind.MEM_WRITE, address=0x1000 * i, dwords=dwords,
                     first_be=0xF, last_be=0xF, tag=0,
                     data=[rng.randrange(1 << 32) for _ in range(dwords)])
                for i, dwords in enumerate([64, 32, 33, 2, 128, 31, 64] * 3)]
    frames, cycles = run_rq(width, requests, rng, idle=0, backpressure=0)
    assert [f.data[4:] for f in frames] == [r["data"] for r in requests]
    beats = sum((r["dwords"] + 1) // 2 for r in requests)
    assert cycles <= beats + 3, f"{cycles} cycles for {beats} payload beats"


# --- RC ---------------------------------------------------------------------------------

def rc_descriptor(c):
    """Three dwords of an RC descriptor (PG213 "Requester Completion Descriptor Format")."""
    return [
        c["lower_address"] | c["error_code"] << 12 | c["byte_count"] << 16 |
        c.get("locked", 0) << 29 | c["request_completed"] << 30,
        c["dwords"] | c["status"] << 11 | c.get("poisoned", 0) << 14 |
        c.get("requester_id", 0) << 16,
        c["tag"] | c.get("completer_id", 0) << 8 | c.get("tc", 0) << 25 |
        c.get("attr", 0) << 28,
    ]


EXPECTED_ERROR = {
    ErrorCode.NORMAL_TERMINATION: CplError.NONE, ErrorCode.POISONED: CplError.POISONED,
    ErrorCode.BAD_STATUS: CplError.BAD_STATUS, ErrorCode.INVALID_LENGTH: CplError.MALFORMED,
    ErrorCode.MISMATCH: CplError.MALFORMED, ErrorCode.INVALID_ADDRESS: CplError.MALFORMED,
    ErrorCode.INVALID_TAG: CplError.UNEXPECTED, ErrorCode.TIMEOUT: CplError.TIMEOUT,
    ErrorCode.FLR: CplError.RESET,
}


def random_rc_completion(rng):
    """A ``Tlp_us`` completion, its RC frame and the neutral header and dwords expected."""
    error = rng.choice([ErrorCode.NORMAL_TERMINATION] * 6 + list(EXPECTED_ERROR))
    status = CplStatus.SC
    if error == ErrorCode.BAD_STATUS:
        status = rng.choice([CplStatus.UR, CplStatus.CA])
    no_payload = status != CplStatus.SC or error in (ErrorCode.TIMEOUT, ErrorCode.FLR)
    dwords = 0 if no_payload else \
        rng.choice([1, 2, 3, 4, 12, 13, 14, 15, 29, 30, 31, 32, rng.randint(33, 128)])
    tlp = Tlp_us()
    tlp.fmt_type = TlpType.CPL_DATA if dwords else TlpType.CPL
    tlp.status, tlp.error_code = status.value, error
    tlp.tag = rng.randrange(256)
    tlp.requester_id = PcieId.from_int(rng.randrange(1 << 16))
    tlp.completer_id = PcieId.from_int(rng.randrange(1 << 16))
    tlp.lower_address = rng.randrange(1 << 12)
    tlp.byte_count = rng.randint(max(1, 4 * dwords - 6), 4096)
    tlp.request_completed = rng.random() < 0.5
    data = [rng.randrange(1 << 32) for _ in range(dwords)]
    if dwords:
        tlp.set_data(b"".join(w.to_bytes(4, "little") for w in data))
    frame = tlp.pack_us_rc()
    frame.discontinue = dwords != 0 and rng.random() < 0.1
    if error in (ErrorCode.TIMEOUT, ErrorCode.FLR):
        # the IP's own report: a descriptor only, whatever its dword count says
        frame.data[1] |= rng.randint(1, 8)
    expected = dict(tag=tlp.tag, status=status, error=EXPECTED_ERROR[error],
                    byte_count=tlp.byte_count, lower_address=tlp.lower_address & 0x7F,
                    dwords=len(data), request_completed=int(tlp.request_completed))
    assert frame.data[:3] == rc_descriptor(dict(
        expected, lower_address=tlp.lower_address, error_code=error, status=status.value,
        dwords=frame.data[1] & 0x7FF, requester_id=int(tlp.requester_id),
        completer_id=int(tlp.completer_id)))
    return frame, expected, data


def rc_beats(width, frame, short_beats=None):
    """AXI beats (tdata, tkeep, tlast, tuser) of one RC frame, DWORD-aligned, no straddle
    (PG213 RC tuser: byte_en, is_sop, is_eop and pointer, discontinue on the last beat,
    parity). With the random generator ``short_beats``, beats before the last are cut
    short at random (the first one after the descriptor at the earliest): the IP never
    does that, it checks that any tkeep has a defined result."""
    lanes = width // 32
    if width == 512:
        sop_at, eop_at, eop_ptr_at, discontinue_at, parity_at = 64, 76, 80, 96, 97
    else:
        sop_at, eop_at, eop_ptr_at, discontinue_at, parity_at = 32, 34, 35, 42, 43
    beats = []
    start = 0
    while start < len(frame.data):
        size = lanes if short_beats is None else short_beats.randint(3 if start == 0 else 1,
                                                                     lanes)
        chunk = frame.data[start:start + size]
        last = start + size >= len(frame.data)
        tuser = int(start == 0) << sop_at
        if last:
            tuser |= 1 << eop_at | (len(chunk) - 1) << eop_ptr_at
            tuser |= int(frame.discontinue) << discontinue_at
        for lane in range(lanes):
            byte_en = frame.byte_en[start + lane] if lane < len(chunk) else 0
            parity = frame.parity[start + lane] if lane < len(chunk) else 0xF
            tuser |= byte_en << 4 * lane | parity << parity_at + 4 * lane
        tdata = sum(d << 32 * i for i, d in enumerate(chunk))
        beats.append((tdata, (1 << len(chunk)) - 1, last, tuser))
        start += size
    return beats


def test_rc_descriptor_packer_matches_cocotbext():
    rng = random.Random(14)
    for _ in range(300):
        random_rc_completion(rng)          # asserts the packer against Tlp_us


def run_rc(width, completions, rng, idle, backpressure, short_beats=False):
    """RC frames through the shim (their beats cut short at random with ``short_beats``);
    returns headers and data beats (with the cycle each was taken and the cycle each
    header was first presented) and the cycles taken."""
    dut = UspShim(width)
    cpl, cpl_data = dut.requester.cpl, dut.requester.cpl_data
    headers, beats, presented, cycles = [], [], [], []
    clock = [0]

    async def rc_source(ctx):
        for frame, _, _ in completions:
            for beat in rc_beats(width, frame, rng if short_beats else None):
                await axis_put(ctx, dut, "s_axis_rc", beat, rng, idle, width)

    async def sink(ctx):
        stalled = {}
        previous_valid = False
        async for _, _, hv, hr, hp, dv, dr, dp in ctx.tick().sample(
                cpl.valid, cpl.ready, cpl.payload, cpl_data.valid, cpl_data.ready,
                cpl_data.payload):
            clock[0] += 1
            for name, valid, ready, payload in (("h", hv, hr, hp), ("d", dv, dr, dp)):
                if name in stalled:
                    assert valid and payload == stalled[name], "changed under backpressure"
                stalled.pop(name, None)
                if valid and not ready:
                    stalled[name] = payload
            if hv and not previous_valid:
                presented.append(clock[0])
            previous_valid = hv and not hr
            if hv and hr:
                headers.append(hp)
            if dv and dr:
                beats.append((dp, clock[0]))
            ctx.set(cpl.ready, rng.random() >= backpressure)
            ctx.set(cpl_data.ready, rng.random() >= backpressure)

    async def until_received(ctx):
        expected_beats = sum(completion_beats(d) for _, _, d in completions)
        cycles.append(await wait_until(
            ctx, lambda: (len(headers), len(beats)) == (len(completions), expected_beats),
            "RC stalled"))
        await ctx.tick().repeat(10)

    simulate(dut, rc_source, until_received, background=[sink])
    return headers, beats, presented, cycles[0]


def completion_beats(data):
    """Neutral payload beats of a completion with the dwords ``data``."""
    return -(-len(data) // CPL_BEAT_DWORDS)


def check_rc(completions, headers, beats, presented):
    """Headers as expected; each completion's payload in ``CPL_BEAT_DWORDS``-dword beats,
    byte-exact, never before its header, ``last`` (and ``corrupt`` after discontinue) on
    its final beat only."""
    assert [{k: getattr(h, k) for k in ("tag", "status", "error", "byte_count",
                                        "lower_address", "dwords", "request_completed")}
            for h in headers] == [e for _, e, _ in completions]
    beat_bytes = 4 * CPL_BEAT_DWORDS
    beats = iter(beats)
    for (frame, _, data), shown in zip(completions, presented):
        count = completion_beats(data)
        received = b""
        for i in range(count):
            beat, cycle = next(beats)
            last = i == count - 1
            assert cycle >= shown, "payload before its header"
            assert (bool(beat.last), bool(beat.corrupt)) == (last, last and frame.discontinue)
            received += beat.data.to_bytes(beat_bytes, "little")
        assert received[:4 * len(data)] == b"".join(w.to_bytes(4, "little") for w in data)
    assert next(beats, None) is None


@pytest.mark.parametrize("width", WIDTHS)
def test_rc_completions(width):
    """Completions with 0..128 dwords, every error code, idle on RC and backpressure on
    cpl/cpl_data: one neutral header each, its payload in four-dword beats never before it;
    the IP's timeout and FLR reports carry no payload; discontinue marks the last beat
    corrupt."""
    rng = random.Random(width + 6)
    completions = [random_rc_completion(rng) for _ in range(150)]
    check_rc(completions, *run_rc(width, completions, rng, idle=0.3, backpressure=0.4)[:3])


def sized_rc_completion(rng, dwords, start_lane):
    """A successful completion of ``dwords`` dwords whose first byte is in dword lane
    ``start_lane`` of a completion beat (address bits 3..2, any byte in that dword), its RC
    frame (one time in ten with discontinue) and the neutral header expected."""
    lower_address = 16 * rng.randrange(8) + 4 * start_lane + rng.randrange(4)
    tlp = Tlp_us()
    tlp.fmt_type = TlpType.CPL_DATA
    tlp.tag = rng.randrange(256)
    tlp.lower_address = lower_address
    tlp.byte_count = rng.randint(4 * dwords - (lower_address & 3), 4096)
    tlp.request_completed = rng.random() < 0.5
    data = [rng.randrange(1 << 32) for _ in range(dwords)]
    tlp.set_data(b"".join(w.to_bytes(4, "little") for w in data))
    frame = tlp.pack_us_rc()
    frame.discontinue = rng.random() < 0.1
    expected = dict(tag=tlp.tag, status=CplStatus.SC, error=CplError.NONE,
                    byte_count=tlp.byte_count, lower_address=lower_address,
                    dwords=dwords, request_completed=int(tlp.request_completed))
    return frame, expected, data


@pytest.mark.parametrize("idle, backpressure", [(0, 0), (0.3, 0.4), (0.6, 0.1), (0.1, 0.6)])
@pytest.mark.parametrize("width", WIDTHS)
def test_rc_every_size_and_start_lane(width, idle, backpressure):
    """Completions of 1..40 dwords starting in every dword lane of a completion beat, so
    their payload spans one to six RC beats and ends in every lane of both the RC beat and
    the completion beat, back to back and with RC idle and cpl/cpl_data backpressure: each
    payload arrives byte-exact in four-dword beats, discontinue marks the last one corrupt."""
    rng = random.Random(width * 100 + int(10 * idle) * 10 + int(10 * backpressure))
    completions = [sized_rc_completion(rng, dwords, start_lane)
                   for dwords in range(1, 41) for start_lane in range(CPL_BEAT_DWORDS)]
    rng.shuffle(completions)
    check_rc(completions, *run_rc(width, completions, rng, idle, backpressure)[:3])


@pytest.mark.parametrize("width", WIDTHS)
def test_rc_short_beats(width):
    """RC beats before a TLP's last one that are not full (which the IP never sends) still
    give each payload in order in four-dword beats, whatever is held when they come."""
    rng = random.Random(width + 8)
    completions = [sized_rc_completion(rng, rng.randint(1, 40), rng.randrange(4))
                   for _ in range(200)]
    check_rc(completions, *run_rc(width, completions, rng, idle=0.2, backpressure=0.3,
                                  short_beats=True)[:3])


@pytest.mark.parametrize("width", WIDTHS)
def test_rc_payload_rate(width):
    """Back-to-back completions without idle or backpressure: four dwords a clock, the
    next header and first beat in the cycle after the previous payload ends."""
    rng = random.Random(width + 7)
    completions = []
    for dwords in [32, 16, 13, 64, 1, 29, 128, 2] * 3:
        tlp = Tlp_us()
        tlp.fmt_type = TlpType.CPL_DATA
        tlp.tag, tlp.byte_count, tlp.request_completed = 1, 4 * dwords, True
        data = [rng.randrange(1 << 32) for _ in range(dwords)]
        tlp.set_data(b"".join(w.to_bytes(4, "little") for w in data))
        completions.append((tlp.pack_us_rc(), dict(
            tag=1, status=CplStatus.SC, error=CplError.NONE, byte_count=4 * dwords,
            lower_address=0, dwords=dwords, request_completed=1), data))
    headers, beats, presented, cycles = run_rc(width, completions, rng, idle=0,
                                               backpressure=0)
    check_rc(completions, headers, beats, presented)
    expected = sum(completion_beats(d) for _, _, d in completions)
    assert cycles <= expected + 3, f"{cycles} cycles for {expected} payload beats"
    payload = 4 * sum(len(d) for _, _, d in completions)
    print(f"\n{width} bits: RC payload {payload / cycles:.2f} B/clock back to back")
