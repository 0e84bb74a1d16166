"""Between the balloon core and the host management port (C10).

The management port owns the host's registers and the AXI4-Lite protocol; the balloon
core owns the balloon state (C8), the counters and the commands that change them. This
signature is the wiring between them, so the device connects the two with one
``wiring.connect``.
"""

from amaranth.hdl import signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out


class PageRange(data.Struct):
    """Pages ``first`` .. ``first + count - 1`` of the tracked window (C8)."""
    first: 32
    count: 32


class BalloonCounters(data.Struct):
    """The host-side statistics of C10, one per ``MGMT_*`` counter register. Each is 32
    bits and wraps; a virtio reset or FLR does not clear them (a host statistic outlives
    the driver instance it counts)."""
    cmd_give: 32
    cmd_get: 32
    cmd_exchange: 32
    cmd_malformed: 32
    violation_misaligned: 32
    violation_out_of_window: 32
    violation_double_give: 32
    violation_not_in_balloon: 32
    get_short: 32
    pages_entered: 32
    pages_left: 32
    fromdevq_malformed: 32
    min_sent: 32
    min_dropped: 32


class BalloonHostSignature(wiring.Signature):
    """The balloon core's host side (C10), seen from the management port.

    Members
    -------
    window_base : Out(64)
        Byte address of the tracked window's first page (C8).
    min_balloon : Out(stream.Signature(signed(64), always_ready=True))
        A committed minimum in signed bytes: sent on fromdevq (C6).
    return_budget_write : Out(stream.Signature(32, always_ready=True))
        A new return budget (pages GET may still grant; all-ones = unlimited).
    extra_range_write : Out(stream.Signature(PageRange, always_ready=True))
        A committed extra-memory range: its pages become host-owned (C8).
    bitmap_read : Out(stream.Signature(32))
        Read 32-bit word ``payload`` of the bitmap (bit ``i`` = page ``32 * payload + i``).
    bitmap_data : In(stream.Signature(32, always_ready=True))
        The word asked for, once per ``bitmap_read``; 0 past the end of the bitmap.
    bitmap_pages : In(32)
        Pages the bitmap tracks (build parameter).
    balloon_pages : In(signed(32))
        +1 per page entering the balloon, -1 per page leaving (C8).
    return_budget : In(32)
        The budget left.
    counters : In(BalloonCounters)
    busy : In(1)
        A bitmap clear (C9) or fill (C8) is running; commands wait.
    """

    def __init__(self):
        super().__init__({
            "window_base": Out(64),
            "min_balloon": Out(stream.Signature(signed(64), always_ready=True)),
            "return_budget_write": Out(stream.Signature(32, always_ready=True)),
            "extra_range_write": Out(stream.Signature(PageRange, always_ready=True)),
            "bitmap_read": Out(stream.Signature(32)),
            "bitmap_data": In(stream.Signature(32, always_ready=True)),
            "bitmap_pages": In(32),
            "balloon_pages": In(signed(32)),
            "return_budget": In(32),
            "counters": In(BalloonCounters),
            "busy": In(1),
        })
