"""RegCompleter: BAR requests against a register-file model, completions against PCIe rules.

The BAR carries the virtio structures and MSI-X table (C2); read strobes matter because
the ISR status clears on read (C11, virtio 1.2 4.1.4.5).

The register slave in the testbench records every access (address, strobes, data); the
expected accesses and completions come from an independent Python computation over byte
addresses (first/last enabled byte), cross-checked against cocotbext-pcie's ``Tlp``.
"""

import random

import pytest
from cocotbext.pcie.core.tlp import Tlp

from memballoon.hdl.pcie.completer import RegCompleter
from memballoon.hdl.pcie.interface import CplStatus, ReqKind
from sim_util import simulate, stream_consumer, stream_put, wait_until

ADDR_WIDTH = 7          # 128 registers: random BAR offsets wrap around the register space
OUR_BAR = 0
OTHER_BAR = 2
BAR_SIZE = 0x4000


# --- Python reference ------------------------------------------------------------------

def strobes(dwords, first_be, last_be):
    """PCIe byte enables per dword of a request."""
    return [first_be if i == 0 else last_be if i == dwords - 1 else 0xF
            for i in range(dwords)]


def enabled_span(offset, dwords, first_be, last_be):
    """Byte offsets (inside the BAR) of the first and last enabled byte, or None for a
    zero-length read."""
    enabled = [offset + 4 * i + b
               for i, be in enumerate(strobes(dwords, first_be, last_be))
               for b in range(4) if be >> b & 1]
    return (enabled[0], enabled[-1]) if enabled else None


def expected_completions(req, mps_bytes):
    """Completion headers (without requester fields) and the dword index range each one
    returns, for a memory read to our BAR."""
    offset, dwords = req["offset"], req["dwords"]
    span = enabled_span(offset, dwords, req["first_be"], req["last_be"])
    if span is None:                        # zero-length read: 1 byte, 1 dword (PCIe 2.2.5)
        return [dict(status=CplStatus.SC, byte_count=1, lower_address=offset & 0x7F,
                     dwords=1, first=0)]
    first_byte, last_byte = span
    cpls = []
    start = offset                          # dword-aligned address of the next dword
    byte = first_byte
    end = offset + 4 * dwords
    while start < end:
        stop = min(end, (start // mps_bytes + 1) * mps_bytes)
        cpls.append(dict(status=CplStatus.SC, byte_count=last_byte + 1 - byte,
                         lower_address=byte & 0x7F, dwords=(stop - start) // 4,
                         first=(start - offset) // 4))
        start = byte = stop
    return cpls


def ur_completion(req):
    if req["kind"] == ReqKind.MEM_READ:     # a memory read completion keeps its counts
        span = enabled_span(req["offset"], req["dwords"], req["first_be"], req["last_be"])
        first_byte, last_byte = span if span else (req["offset"], req["offset"])
        return dict(status=CplStatus.UR, byte_count=last_byte + 1 - first_byte,
                    lower_address=first_byte & 0x7F, dwords=0)
    return dict(status=CplStatus.UR, byte_count=4, lower_address=0, dwords=0)


def test_byte_count_reference_matches_cocotbext():
    """The reference byte count equals cocotbext-pcie's for every byte-enable pair."""
    for dwords in (1, 2, 3):
        for first_be in range(16):
            for last_be in range(16) if dwords > 1 else (0,):
                if dwords > 1 and (first_be == 0 or last_be == 0):
                    continue                # not a legal PCIe request
                tlp = Tlp()
                tlp.length, tlp.first_be, tlp.last_be = dwords, first_be, last_be
                span = enabled_span(0, dwords, first_be, last_be)
                ours = span[1] + 1 - span[0] if span else 1
                assert ours == tlp.get_be_byte_count(), (dwords, first_be, last_be)


# --- request generation ----------------------------------------------------------------

def random_request(rng, max_dwords):
    dwords = rng.randint(1, max_dwords)
    offset = 4 * rng.randrange(BAR_SIZE // 4)
    offset -= max(0, offset % 4096 + 4 * dwords - 4096)  # no 4 KiB crossing (PCIe 2.2.7)
    if dwords == 1:
        first_be, last_be = rng.randrange(16), 0
    else:
        first_be, last_be = rng.randint(1, 15), rng.randint(1, 15)
    kind = rng.choice([ReqKind.MEM_READ] * 4 + [ReqKind.MEM_WRITE] * 4 +
                      [ReqKind.UNSUPPORTED_NP, ReqKind.UNSUPPORTED_P])
    bar = OUR_BAR if rng.random() < 0.8 else OTHER_BAR
    return dict(kind=kind, bar=bar, offset=offset, dwords=dwords, first_be=first_be,
                last_be=last_be, requester_id=rng.randrange(1 << 16),
                tag=rng.randrange(256), tc=rng.randrange(8), attr=rng.randrange(8))


# --- simulation ------------------------------------------------------------------------

def run_completer(requests, *, max_payload, seed, idle=0.3, backpressure=0.3,
                  bus_stall=0.2):
    """Run the requests through a RegCompleter; return the register accesses, the
    completions, their payload beats, the initial and final register contents and the
    write payloads."""
    rng = random.Random(seed)
    dut = RegCompleter(ADDR_WIDTH, bar=OUR_BAR)
    comp = dut.completer
    regs = {a: rng.randrange(1 << 32) for a in range(1 << ADDR_WIDTH)}
    initial = dict(regs)
    payloads = [[rng.randrange(1 << 32) for _ in range(r["dwords"])]
                for r in requests if r["kind"] == ReqKind.MEM_WRITE]
    accesses, cpls, beats = [], [], []
    our_reads = [r for r in requests if r["kind"] == ReqKind.MEM_READ and r["bar"] == OUR_BAR
                 and not r.get("locked")]
    expected_cpls = sum(len(expected_completions(r, 128 << max_payload)) for r in our_reads)
    expected_cpls += sum(r["kind"] in (ReqKind.MEM_READ, ReqKind.UNSUPPORTED_NP)
                         for r in requests if r not in our_reads)
    expected_beats = sum(r["dwords"] for r in our_reads)
    done = []

    async def request_producer(ctx):
        for r in requests:
            await stream_put(ctx, comp.req, r, rng, idle)

    async def data_producer(ctx):
        for payload in payloads:
            for i, word in enumerate(payload):
                await stream_put(ctx, comp.req_data,
                                 {"data": word, "last": i == len(payload) - 1}, rng, idle)

    async def register_slave(ctx):
        bus = dut.bus
        async for _, _, r_stb, w_stb, ready, addr, r_strb, w_strb, w_data in \
                ctx.tick().sample(bus.r_stb, bus.w_stb, bus.ready, bus.addr, bus.r_strb,
                                  bus.w_strb, bus.w_data):
            assert not (r_stb and w_stb)
            # r_data is valid only in the cycle after the read: garbage otherwise
            ctx.set(bus.r_data, rng.randrange(1 << 32))
            if ready and w_stb:
                mask = sum(0xFF << 8 * b for b in range(4) if w_strb >> b & 1)
                regs[addr] = regs[addr] & ~mask | w_data & mask
                accesses.append(("w", addr, w_strb, w_data))
            if ready and r_stb:
                ctx.set(bus.r_data, regs[addr])
                accesses.append(("r", addr, r_strb, regs[addr]))
            ctx.set(bus.ready, rng.random() >= bus_stall)

    async def wait_done(ctx):
        ctx.set(dut.max_payload, max_payload)
        await wait_until(ctx, lambda: (len(cpls), len(beats)) == (expected_cpls, expected_beats)
                         and not any(ctx.get(s.valid) for s in (comp.req, comp.req_data)),
                         "completer stalled", 200_000)
        await ctx.tick().repeat(20)
        done.append(True)

    simulate(dut, request_producer, data_producer, wait_done, background=[
        stream_consumer(comp.cpl, cpls.append, rng, backpressure),
        stream_consumer(comp.cpl_data, beats.append, rng, backpressure), register_slave])
    assert done
    return accesses, cpls, beats, initial, regs, payloads


def check(requests, accesses, cpls, beats, initial, final, payloads, max_payload):
    """Replay the requests on a Python register file and compare everything."""
    regs = dict(initial)
    mask = (1 << ADDR_WIDTH) - 1
    exp_accesses, exp_cpls, exp_beats = [], [], []
    payloads = iter(payloads)
    for r in requests:
        ours = r["bar"] == OUR_BAR
        addrs = [(r["offset"] // 4 + i) & mask for i in range(r["dwords"])]
        strbs = strobes(r["dwords"], r["first_be"], r["last_be"])
        ids = {**{k: r[k] for k in ("requester_id", "tag", "tc", "attr")},
               "locked": r.get("locked", 0)}
        if r["kind"] == ReqKind.MEM_WRITE:
            words = next(payloads)
            if ours:
                for addr, strb, word in zip(addrs, strbs, words):
                    bmask = sum(0xFF << 8 * b for b in range(4) if strb >> b & 1)
                    regs[addr] = regs[addr] & ~bmask | word & bmask
                    exp_accesses.append(("w", addr, strb, word))
        elif r["kind"] == ReqKind.MEM_READ and ours and not ids["locked"]:
            words = []
            for addr, strb in zip(addrs, strbs):
                exp_accesses.append(("r", addr, strb, regs[addr]))
                words.append(regs[addr])
            for c in expected_completions(r, 128 << max_payload):
                first = c.pop("first")
                exp_cpls.append({**c, **ids})
                chunk = words[first:first + c["dwords"]]
                exp_beats += [(w, i == len(chunk) - 1) for i, w in enumerate(chunk)]
        elif r["kind"] in (ReqKind.MEM_READ, ReqKind.UNSUPPORTED_NP):
            exp_cpls.append({**ur_completion(r), **ids})

    assert accesses == exp_accesses
    assert final == regs
    got_cpls = [{k: getattr(c, k) for k in ("status", "byte_count", "lower_address",
                                            "dwords", *ids)} for c in cpls]
    assert got_cpls == exp_cpls
    assert [(b.data, bool(b.last)) for b in beats] == exp_beats


@pytest.mark.parametrize("max_payload", [0, 1])        # 128 and 256 bytes
@pytest.mark.parametrize("seed", [1, 2])
def test_random_requests(max_payload, seed):
    rng = random.Random(seed * 7919 + max_payload)
    requests = [random_request(rng, 64) for _ in range(120)]
    result = run_completer(requests, max_payload=max_payload, seed=seed)
    check(requests, *result, max_payload)


def request(kind, offset, dwords, first_be, last_be=0, bar=OUR_BAR, tag=0, locked=0):
    return dict(kind=kind, bar=bar, offset=offset, dwords=dwords, first_be=first_be,
                last_be=last_be, requester_id=0x0100, tag=tag, tc=0, attr=0, locked=locked)


def test_long_read_split_on_max_payload_boundaries():
    """1024 dwords (4 KiB) from an unaligned start: completions end at 128-byte
    boundaries, the byte count counts down to the last enabled byte."""
    requests = [request(ReqKind.MEM_READ, 0x1000, 1024, 0xE, 0x7),
                request(ReqKind.MEM_READ, 0x0044, 70, 0xC, 0x3, tag=1)]
    result = run_completer(requests, max_payload=0, seed=3, idle=0, backpressure=0.1)
    check(requests, *result, 0)
    cpls = result[1]
    assert [c.dwords for c in cpls] == [32] * 32 + [15, 32, 23]   # 4 KiB; 0x44..0x15C
    assert [c.byte_count for c in cpls[32:]] == [70 * 4 - 2 - 2, 0x15A - 0x80, 0x15A - 0x100]
    assert [c.lower_address for c in cpls[32:]] == [0x46, 0x00, 0x00]
    assert cpls[0].byte_count == 4096 - 1 - 1 and cpls[0].lower_address == 1


def test_zero_length_read_and_read_strobes():
    """A zero-length read accesses the register with strobe 0 and returns one dword with
    byte count 1; single-byte reads carry only that byte's strobe."""
    requests = [request(ReqKind.MEM_READ, 0x2000, 1, 0x0),
                request(ReqKind.MEM_READ, 0x2000, 1, 0x2, tag=1),
                request(ReqKind.MEM_READ, 0x2004, 2, 0x8, 0x1, tag=2)]
    result = run_completer(requests, max_payload=0, seed=4)
    check(requests, *result, 0)
    accesses, cpls = result[:2]
    assert [(a[0], a[2]) for a in accesses] == [("r", 0x0), ("r", 0x2), ("r", 0x8), ("r", 0x1)]
    assert [(c.byte_count, c.lower_address, c.dwords) for c in cpls] == \
        [(1, 0x00, 1), (1, 0x01, 1), (2, 0x07, 2)]


def test_unsupported_requests():
    """Reads to another BAR, locked reads to ours (PCIe Base 6.5: only legacy endpoints
    support locking) and other non-posted requests get one UR completion without data,
    locked for the locked read; writes to another BAR and other posted requests vanish
    without an access."""
    requests = [request(ReqKind.MEM_READ, 0x0010, 4, 0xF, 0xF, bar=OTHER_BAR),
                request(ReqKind.UNSUPPORTED_NP, 0x0020, 1, 0xF, tag=1),
                request(ReqKind.MEM_WRITE, 0x0030, 3, 0xF, 0xF, bar=OTHER_BAR, tag=2),
                request(ReqKind.UNSUPPORTED_P, 0x0040, 1, 0xF, tag=3),
                request(ReqKind.MEM_READ, 0x0060, 2, 0xE, 0x7, tag=5, locked=1),
                request(ReqKind.MEM_WRITE, 0x0050, 1, 0x3, tag=4)]
    result = run_completer(requests, max_payload=0, seed=5)
    check(requests, *result, 0)
    accesses, cpls, beats = result[:3]
    assert [a[:3] for a in accesses] == [("w", 0x14, 0x3)]
    assert [(c.status, c.dwords, c.byte_count, c.tag, c.locked) for c in cpls] == \
        [(CplStatus.UR, 0, 16, 0, 0), (CplStatus.UR, 0, 4, 1, 0), (CplStatus.UR, 0, 6, 5, 1)]
    assert beats == []
