"""Between a virtqueue engine and the device function that executes its buffers.

The engine owns the ring (avail, descriptors, indirect tables, used, event index, C7
faults); the function sees one *command* per available buffer (C5: each descriptor chain
is one command): a header with the chain's byte counts, then the chain's device-readable
bytes as a packed stream of le64 words (two a beat), and it answers with one *result* that the engine
writes into the chain's device-writable bytes before it publishes the used element.

An engine built with ``parking`` (fromdevq, C6) also lets the function *park* a command
instead of completing it, and later *unpark* the oldest parked one: its chain is walked
again and comes back as a new command with ``parked`` set. Used elements then leave the
ring order; without ``parking`` every command is completed in order.
"""

from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out


class CommandHeader(data.Struct):
    """One available buffer: ``head`` is its descriptor chain's head index (the used
    element's id); ``readable``/``writable`` are the chain's total device-readable and
    device-writable byte counts; ``parked``: the chain of a parked command, walked again
    (only from an engine built with ``parking``)."""
    head: 16
    readable: 32
    writable: 32
    parked: 1


#: Command words per beat: two le64 words, so the balloon executes two pages a clock.
COMMAND_LANES = 2


class CommandWords(data.Struct):
    """Up to ``COMMAND_LANES`` le64 words of the current command's device-readable bytes
    (byte 0 = bits 7..0 of ``data[0]``), whatever descriptor boundaries they came across
    (C5): ``data[0] .. data[count - 1]`` are valid.

    The first beat of a command holds its first word (the command code) alone; every
    later beat holds ``COMMAND_LANES`` words but the last, so payload word ``i`` is lane
    ``i % COMMAND_LANES`` of beat ``1 + i // COMMAND_LANES``. ``ceil(readable / 8)`` words
    follow each header (no beat when ``readable`` is 0); the last beat has ``last`` set and
    its last word is zero-padded past the readable bytes.

    A beat with ``error`` says the rest of the command could not be read (C7): it is the
    command's last, its words mean nothing, and no beat follows until the engine is
    reset. The function must then not complete the command."""
    data: data.ArrayLayout(64, COMMAND_LANES)
    count: range(COMMAND_LANES + 1)
    last: 1
    error: 1


class CommandResult(data.Struct):
    """How to complete the current command: write ``write_count`` (0..16) bytes of
    ``write_data`` (byte 0 = bits 7..0) at the start of the chain's writable bytes, then
    publish the used element with ``used_len``. Sent after the command's last word was
    taken (or at once when it has none). ``park`` (only to an engine built with
    ``parking``): write nothing, publish nothing, keep the command for ``unpark``."""
    used_len: 32
    write_data: 128
    write_count: 5
    park: 1


class CommandSignature(wiring.Signature):
    """Seen from the virtqueue engine. With ``parking``, ``unpark`` asks for the oldest
    parked command again (ready while one is parked); its header follows, behind the
    headers already on their way."""
    def __init__(self, *, parking=False):
        members = {
            "header": Out(stream.Signature(CommandHeader)),
            "words": Out(stream.Signature(CommandWords)),
            "result": In(stream.Signature(CommandResult)),
        }
        if parking:
            members["unpark"] = In(stream.Signature(0))
        super().__init__(members)
