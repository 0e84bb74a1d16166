"""Address decoder: one register-bus master, several power-of-two windows."""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .regbus import RegBusSignature


class RegBusDecoder(wiring.Component):
    """Routes each access to the window holding its address.

    ``windows`` maps a member name to ``(byte_base, byte_size)``; sizes are powers of two
    of at least 4 bytes and bases are aligned to their size. Each window becomes an
    ``Out(RegBusSignature(log2(size / 4)))`` member carrying window-local dword addresses.
    Accesses outside every window complete at once: writes are dropped, reads return 0.
    """

    def __init__(self, addr_width, windows):
        self._addr_width = addr_width
        self._windows = {}
        for name, (base, size) in windows.items():
            if size < 4 or size & (size - 1) or base % size or base + size > 4 << addr_width:
                raise ValueError(f"window {name} ({base:#x}, {size:#x}) is not a size-aligned "
                                 f"power of two inside the bus")
            self._windows[name] = (base >> 2, (size >> 2).bit_length() - 1)
        spans = sorted((b, b + (1 << w)) for b, w in self._windows.values())
        if any(end > nxt for (_, end), (nxt, _) in zip(spans, spans[1:])):
            raise ValueError("register-bus windows overlap")
        super().__init__({
            "bus": In(RegBusSignature(addr_width)),
            **{name: Out(RegBusSignature(width)) for name, (_, width) in self._windows.items()},
        })

    def elaborate(self, platform):
        m = Module()
        read_from = {name: Signal(name=f"read_from_{name}") for name in self._windows}
        hit_any = Signal()
        m.d.comb += self.bus.ready.eq(1)

        for name, (base, width) in self._windows.items():
            window = getattr(self, name)
            hit = Signal(name=f"hit_{name}")
            m.d.comb += [
                hit.eq((self.bus.addr >> width) == (base >> width)),
                window.addr.eq(self.bus.addr[:width] if width else 0),
                window.r_stb.eq(self.bus.r_stb & hit),
                window.r_strb.eq(self.bus.r_strb),
                window.w_stb.eq(self.bus.w_stb & hit),
                window.w_strb.eq(self.bus.w_strb),
                window.w_data.eq(self.bus.w_data),
            ]
            with m.If(hit):
                m.d.comb += [hit_any.eq(1), self.bus.ready.eq(window.ready)]
            m.d.sync += read_from[name].eq(window.r_stb & window.ready)
            with m.If(read_from[name]):
                m.d.comb += self.bus.r_data.eq(window.r_data)
        return m
