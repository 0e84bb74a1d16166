"""Vendor-neutral PCIe function interfaces.

A hard-IP shim (``usp_shim.py`` for the Xilinx UltraScale+ PCIE4 block) turns the vendor's
ports into these; everything behind the shim sees only these signatures, so another hard
IP needs only a new shim (the layering of verilog-pcie's ``pcie_us_if``).

Directions are given from the shim's side: the shim drives ``Out`` members, the device
connects to the flipped signature.
"""

from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out


class ReqKind(enum.Enum, shape=2):
    MEM_READ = 0
    MEM_WRITE = 1
    #: Anything else that needs a completion (I/O, atomics, ...): answer with UR.
    UNSUPPORTED_NP = 2
    #: Anything else that is posted (messages, ...): drop.
    UNSUPPORTED_P = 3


class CplStatus(enum.Enum, shape=3):
    SC = 0      # successful completion
    UR = 1      # unsupported request
    CRS = 2     # configuration request retry
    CA = 4      # completer abort


class CompleterRequest(data.Struct):
    """One request to the function's BARs, as the completer sees it."""
    kind: ReqKind
    bar: 3
    #: Byte offset of the first dword inside the BAR (address modulo the BAR aperture;
    #: bits 1..0 are zero, the byte enables say which bytes are meant).
    offset: 32
    #: Length in dwords, 1..1024.
    dwords: 11
    first_be: 4
    last_be: 4
    requester_id: 16
    tag: 8
    tc: 3
    attr: 3
    #: A ``MEM_READ`` that is a locked read (MRdLk). Only legacy endpoints take part in
    #: locking (PCIe Base 6.5); a PCI Express endpoint answers it UR.
    locked: 1


class CompleterCompletion(data.Struct):
    """One completion TLP the function sends; ``dwords`` payload beats follow it on
    ``cpl_data`` (none when ``dwords`` is 0)."""
    requester_id: 16
    tag: 8
    tc: 3
    attr: 3
    status: CplStatus
    #: Answers a locked read: a CplLk (CplDLk with data) on the link, not a Cpl.
    locked: 1
    #: Bytes left to transfer including this completion's (PCIe byte count, 1..4096).
    byte_count: 13
    #: Address bits 6..0 of the first byte this completion returns.
    lower_address: 7
    dwords: 11


class DwordBeat(data.Struct):
    """One payload dword of a request or completion; ``last`` marks the final one."""
    data: 32
    last: 1


class CompleterSignature(wiring.Signature):
    """Requests to the BARs and their completions.

    ``req`` carries one header per TLP; a ``MEM_WRITE`` header is followed by exactly
    ``dwords`` beats on ``req_data`` (the last one with ``last`` set); other kinds carry
    no beats. A request the hard IP reports corrupt is never handed over, not even in
    part: the shim hands over a header only once the whole TLP has arrived intact. A
    completion header on ``cpl`` is followed by ``dwords`` beats on ``cpl_data``.
    """
    def __init__(self):
        super().__init__({
            "req": Out(stream.Signature(CompleterRequest)),
            "req_data": Out(stream.Signature(DwordBeat)),
            "cpl": In(stream.Signature(CompleterCompletion)),
            "cpl_data": In(stream.Signature(DwordBeat)),
        })


class ConfigExtSignature(wiring.Signature):
    """Configuration reads and writes of the part of configuration space the hard IP
    hands to user logic (the legacy window, see README "PG213 finding").

    One access at a time: ``read_received`` or ``write_received`` pulses for one cycle
    with ``register_number`` (dword index in configuration space); a read is answered by
    one cycle of ``read_data_valid`` with ``read_data``; a write needs no answer.
    """
    def __init__(self):
        super().__init__({
            "read_received": Out(1),
            "write_received": Out(1),
            "register_number": Out(10),
            "function_number": Out(8),
            "write_data": Out(32),
            "write_byte_enable": Out(4),
            "read_data": In(32),
            "read_data_valid": In(1),
        })


class MsixSignature(wiring.Signature):
    """MSI-X messages with the table held by the function (external table).

    The device holds ``address``/``data`` and raises ``valid`` for one message; the hard IP
    answers with a one-cycle ``sent`` or ``fail``; only then may the next message start.
    ``enable`` and ``function_mask`` mirror the MSI-X capability's Message Control.
    """
    def __init__(self):
        super().__init__({
            "enable": Out(1),
            "function_mask": Out(1),
            "valid": In(1),
            "address": In(64),
            "data": In(32),
            "sent": Out(1),
            "fail": Out(1),
        })


class IntxSignature(wiring.Signature):
    """Legacy INTx (INTA) of the function, as two levels the device holds (C11).

    ``pending``: an interrupt is pending in the function; it is the PCI Status register's
    Interrupt Status bit, which Interrupt Disable does not affect. ``wanted``: INTA is to
    be asserted (pending, and the command register's Interrupt Disable clear). The shim
    turns ``wanted`` into the hard IP's assert/deassert handshake.
    """
    def __init__(self):
        super().__init__({
            "pending": In(1),
            "wanted": In(1),
        })


class FunctionStatusSignature(wiring.Signature):
    """Command-register and device-control state of the function, and its resets.

    ``max_payload`` and ``max_read_request`` use the PCIe encoding (0 = 128 B .. 5 = 4096 B).
    ``flr`` is high while a function-level reset is in progress; the device raises
    ``flr_done`` for one cycle once its own reset (C9) has completed.
    """
    def __init__(self):
        super().__init__({
            "memory_enable": Out(1),
            "bus_master_enable": Out(1),
            "interrupt_disable": Out(1),
            "max_payload": Out(3),
            "max_read_request": Out(3),
            "flr": Out(1),
            "flr_done": In(1),
        })


# --- DMA (bus-master) side: what DMA clients (the virtqueue engines) see ---------------------

class DmaReadCommand(data.Struct):
    """Read ``length`` bytes (1 .. 2**20 - 1) from ``address`` (any byte alignment)."""
    address: 64
    length: 20


#: Bytes per DMA read beat: two le64 words, so a virtqueue engine can hand the balloon two
#: command words (two pages) a clock.
DMA_READ_BEAT_BYTES = 16


class DmaReadBeat(data.Struct):
    """Read data, in command order, byte-packed: byte 0 of a read is byte 0 (bits 7..0) of
    its first beat; every beat holds ``DMA_READ_BEAT_BYTES`` bytes except the last, which
    holds ``count``.

    A failed read (error completion, completion timeout, bus mastering off; C7, C12) ends
    early with one beat that has ``last`` and ``error`` set; its data is meaningless and
    the beats before it may be partial data of the read.
    """
    data: 8 * DMA_READ_BEAT_BYTES
    count: 5
    last: 1
    error: 1


class DmaWriteCommand(data.Struct):
    """Write ``length`` bytes (1 .. 2**20 - 1) at ``address``; the bytes follow as
    ``DmaWriteBeat``s packed like read data (8 per beat, the last one partial)."""
    address: 64
    length: 20


class DmaWriteBeat(data.Struct):
    data: 64
    last: 1


class DmaWriteDone(data.Struct):
    """One per write command, once all of its TLPs are handed to the hard IP (posted
    writes: PCIe keeps them in order, so a later write is seen after this one).
    ``error``: nothing or not all was written (bus mastering off, C12)."""
    error: 1


class DmaSignature(wiring.Signature):
    """A DMA client port, seen from the client (the client drives the commands)."""
    def __init__(self):
        super().__init__({
            "read_cmd": Out(stream.Signature(DmaReadCommand)),
            "read_data": In(stream.Signature(DmaReadBeat)),
            "write_cmd": Out(stream.Signature(DmaWriteCommand)),
            "write_data": Out(stream.Signature(DmaWriteBeat)),
            "write_done": In(stream.Signature(DmaWriteDone)),
        })


# --- Requester (bus-master) side of the shim: what the DMA engine sees -----------------------

class RequesterKind(enum.Enum, shape=1):
    MEM_READ = 0
    MEM_WRITE = 1


class RequesterRequest(data.Struct):
    """One memory request TLP the function sends (PCIe byte-enable rules apply: a
    one-dword request has ``last_be`` 0, a longer one non-zero ``first_be`` and ``last_be``;
    the request does not cross a 4 KiB boundary)."""
    kind: RequesterKind
    #: Byte address of the first dword; bits 1..0 are ignored (the byte enables say which
    #: bytes are meant).
    address: 64
    #: Length in dwords, 1..1024.
    dwords: 11
    first_be: 4
    last_be: 4
    #: Read tag; its completions carry it back. Ignored for writes.
    tag: 8


class CplError(enum.Enum, shape=3):
    """How the hard IP judged a completion (vendor-neutral form of its error code)."""
    NONE = 0
    #: The completion data is poisoned (EP).
    POISONED = 1
    #: Status is UR, CA or CRS (see ``status``); ends the request.
    BAD_STATUS = 2
    #: Length, address or header fields do not match the request.
    MALFORMED = 3
    #: No request with this tag is outstanding: a stray or late completion.
    UNEXPECTED = 4
    #: The hard IP gave up waiting for completions; ends the request.
    TIMEOUT = 5
    #: The request was abandoned by a function-level reset; ends the request.
    RESET = 6


class RequesterCompletion(data.Struct):
    """One completion TLP for a read request; ``dwords`` payload beats follow it on
    ``cpl_data``."""
    tag: 8
    status: CplStatus
    error: CplError
    #: Bytes of the request still to come including this completion's (1..4096).
    byte_count: 13
    #: Address bits 6..0 of the first byte this completion returns.
    lower_address: 7
    #: Payload dwords that follow on ``cpl_data`` (0 for a completion without data). The
    #: first one holds the byte at ``lower_address``, in its byte lane ``lower_address % 4``.
    dwords: 11
    #: No further completion for this tag will come: the request has ended.
    request_completed: 1


class DwordPairBeat(data.Struct):
    """Two payload dwords of a write request: dword 2k in bits 31..0, dword 2k+1 in bits
    63..32. The last beat of a payload with an odd dword count holds one dword (bits 63..32
    are meaningless); ``last`` marks the final beat."""
    data: 64
    last: 1


class CompletionBeat(data.Struct):
    """Four payload dwords of a completion: dword 4k + i in bits 32i + 31..32i, the
    completion's first dword in bits 31..0 of its first beat whatever its address. Every
    beat but the last holds four dwords; the last holds the remaining one to four (the
    bits above them are meaningless); ``last`` marks it."""
    data: 128
    last: 1
    #: On the last beat: the hard IP found the payload corrupt after passing on the header
    #: (the whole completion is to be discarded).
    corrupt: 1


class RequesterSignature(wiring.Signature):
    """Memory requests the function sends and the completions it receives.

    ``req`` carries one header per TLP; a ``MEM_WRITE`` header is followed by its
    ``dwords`` of payload on ``req_data`` (two per beat, the last with ``last`` set); the
    shim takes a write header and its first payload beat in the same cycle when both are
    there, and the next header only after the payload: 8 bytes a clock, the rate of a DMA
    client's write port. A header on ``cpl`` is followed by its ``dwords`` on ``cpl_data``
    (four per beat, none when ``dwords`` is 0); the first payload beat may be valid in the
    same cycle as its header, never before it: 16 bytes a clock, the rate of a DMA client's
    read port (``DMA_READ_BEAT_BYTES``).
    """
    def __init__(self):
        super().__init__({
            "req": In(stream.Signature(RequesterRequest)),
            "req_data": In(stream.Signature(DwordPairBeat)),
            "cpl": Out(stream.Signature(RequesterCompletion)),
            "cpl_data": Out(stream.Signature(CompletionBeat)),
        })
