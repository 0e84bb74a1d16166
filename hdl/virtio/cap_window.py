"""The virtio vendor-specific capabilities (C2) in the configuration-space window the hard
IP hands to user logic, and the PCI_CFG access path into BAR0 (virtio 1.2 4.1.4.9)."""

from amaranth.hdl import Cat, Module, Shape, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from memballoon import constants as c
from memballoon.constants import PciCapType
from memballoon.hdl.pcie.interface import ConfigExtSignature
from memballoon.hdl.regbus import RegBusSignature
from memballoon.params import DeviceParams

#: Every structure lives in BAR0 (C2); PCI_CFG accesses to any other BAR do nothing.
STRUCTURES_BAR = 0
#: A queue notification without VIRTIO_F_NOTIFICATION_DATA is a le16 queue index
#: (virtio 1.2 4.1.5.2), so each notify address spans 2 bytes.
NOTIFY_WRITE_BYTES = 2


class VirtioPciCap(data.Struct):
    """``struct virtio_pci_cap`` (virtio 1.2 4.1.4); the first field is the lowest byte."""
    cap_vndr: 8
    cap_next: 8
    cap_len: 8
    cfg_type: PciCapType
    bar: 8
    id: 8
    padding: 16
    offset: 32
    length: 32


class VirtioPciNotifyCap(data.Struct):
    """``struct virtio_pci_notify_cap`` (virtio 1.2 4.1.4.4)."""
    cap: VirtioPciCap
    notify_off_multiplier: 32


class VirtioPciCfgCap(data.Struct):
    """``struct virtio_pci_cfg_cap`` (virtio 1.2 4.1.4.9)."""
    cap: VirtioPciCap
    pci_cfg_data: 32


def _byte_span(layout, *path):
    """(first byte, byte count) of the field at ``path`` inside ``layout``."""
    offset = 0
    for name in path:
        field = data.Layout.cast(layout)[name]
        offset += field.offset
        layout = field.shape
    return offset // 8, Shape.cast(layout).width // 8


#: Fields of the PCI_CFG capability the driver may write (virtio 1.2 4.1.4.9).
_PCI_CFG_WRITABLE = [("cap", "bar"), ("cap", "offset"), ("cap", "length"), ("pci_cfg_data",)]


class VirtioCapWindow(wiring.Component):
    """The capability chain COMMON_CFG -> NOTIFY_CFG -> ISR_CFG -> PCI_CFG (C2), starting at
    ``params.cfg_ext_base`` in configuration space; no DEVICE_CFG (C2: no device
    configuration layout). The bytes are built here from ``params`` and ``constants`` and
    served by the RTL; the window after the chain reads 0. The hard IP's own capability
    list must point at ``params.cfg_ext_base``.

    Every read of a window register is answered by one cycle of ``read_data_valid``;
    writes change only the writable PCI_CFG fields (bar, offset, length, pci_cfg_data),
    byte by byte as the byte enables say. Accesses outside the window are left to the
    hard IP and are neither answered nor held.

    PCI_CFG (virtio 1.2 4.1.4.9): a write that enables any byte of ``pci_cfg_data`` writes
    the first ``cap.length`` bytes of ``pci_cfg_data`` to ``cap.offset`` in BAR0; a read of
    ``pci_cfg_data`` reads ``cap.length`` bytes from there into ``pci_cfg_data`` (upper bytes
    0) and answers with it only once the BAR read is done. The access must name BAR0, a
    length of 1, 2 or 4, an offset aligned to it and inside the BAR; otherwise nothing is
    accessed and a read answers with ``pci_cfg_data`` as it is.

    The hard IP completes a configuration write without waiting for user logic, so one
    more access may arrive while a BAR write waits for the arbiter: it is held and served
    next. The arbiter's stalls are far shorter than two configuration requests; were a
    third to arrive anyway, the newest replaces the held one, so a read (after which the
    hard IP sends nothing until answered) is always answered. The device is a single
    function, so ``function_number`` is not looked at.

    Attributes
    ----------
    cfg_ext : In(ConfigExtSignature())
        Configuration accesses from the hard IP.
    bar : Out(RegBusSignature(addr_width))
        BAR0 (dword addresses, sized by ``params.bar.size``), for PCI_CFG accesses; goes
        through an arbiter shared with the PCIe completer.
    """

    def __init__(self, params: DeviceParams):
        self._params = params
        self._image, self._pci_cfg_position = self._chain_image(params)
        super().__init__({
            "cfg_ext": In(ConfigExtSignature()),
            "bar": Out(RegBusSignature(ceil_log2(params.bar.size // 4))),
        })

    @staticmethod
    def _chain_image(params):
        """Bytes of the window, and the window byte where the PCI_CFG capability starts."""
        bar = params.bar
        notify_length = (c.NUM_QUEUES - 1) * bar.notify_off_multiplier + NOTIFY_WRITE_BYTES
        caps = [
            (VirtioPciCap, PciCapType.COMMON_CFG, bar.common_cfg, c.VIRTIO_PCI_COMMON_CFG_SIZE,
             {}),
            (VirtioPciNotifyCap, PciCapType.NOTIFY_CFG, bar.notify, notify_length,
             {"notify_off_multiplier": bar.notify_off_multiplier}),
            (VirtioPciCap, PciCapType.ISR_CFG, bar.isr, 1, {}),
            (VirtioPciCfgCap, PciCapType.PCI_CFG, 0, 0, {}),
        ]
        sizes = [layout.as_shape().size // 8 for layout, *_ in caps]
        if sum(sizes) > params.cfg_ext_size:
            raise ValueError(f"the virtio capabilities need {sum(sizes)} bytes; the cfg_ext "
                             f"window has {params.cfg_ext_size}")
        positions = [sum(sizes[:i]) for i in range(len(caps))]
        next_pointers = [params.cfg_ext_base + p for p in positions[1:]] + [0]
        image = bytearray(params.cfg_ext_size)
        for (layout, cfg_type, offset, length, extra), size, position, next_cap in \
                zip(caps, sizes, positions, next_pointers):
            header = {
                "cap_vndr": c.PCI_CAP_ID_VNDR,
                "cap_next": next_cap,
                "cap_len": size,
                "cfg_type": cfg_type,
                "bar": STRUCTURES_BAR,
                "offset": offset,
                "length": length,
            }
            fields = header if layout is VirtioPciCap else {"cap": header, **extra}
            image[position:position + size] = \
                layout.const(fields).as_bits().to_bytes(size, "little")
        pci_cfg_index = [cfg_type for _, cfg_type, *_ in caps].index(PciCapType.PCI_CFG)
        return bytes(image), positions[pci_cfg_index]

    def elaborate(self, platform):
        m = Module()
        params = self._params
        cfg_ext, bar = self.cfg_ext, self.bar
        first_register, dwords = params.cfg_ext_dwords

        # The window as one register: read-only bytes are never written and stay
        # constants, so only the PCI_CFG fields become flip-flops.
        window = Signal(8 * len(self._image), init=int.from_bytes(self._image, "little"))
        cfg_cap_bytes = VirtioPciCfgCap.as_shape().size // 8
        position = self._pci_cfg_position
        pci_cfg = VirtioPciCfgCap(window[8 * position:8 * (position + cfg_cap_bytes)])
        writable = set()
        for path in _PCI_CFG_WRITABLE:
            first, count = _byte_span(VirtioPciCfgCap, *path)
            writable.update(range(position + first, position + first + count))
        data_dword = (position + _byte_span(VirtioPciCfgCap, "pci_cfg_data")[0]) // 4

        # Hold each access to the window until it is served.
        held = Signal(data.StructLayout({
            "write": 1,
            "index": range(dwords),     # dword inside the window
            "data": 32,
            "byte_enable": 4,
        }))
        held_valid = Signal()
        register = cfg_ext.register_number
        in_window = (register >= first_register) & (register < first_register + dwords)

        # The BAR access pci_cfg describes.
        lane = pci_cfg.cap.offset[:2]
        lanes = Signal(4)
        with m.Switch(pci_cfg.cap.length):
            for length in (1, 2, 4):
                with m.Case(length):
                    m.d.comb += lanes.eq((1 << length) - 1)
        access_ok = ((pci_cfg.cap.bar == STRUCTURES_BAR) & (lanes != 0) &
                     ((lane & (pci_cfg.cap.length[:2] - 1)) == 0) &
                     (pci_cfg.cap.offset < params.bar.size))
        strobe = (lanes << lane)[:4]
        read_value = (bar.r_data >> lane * 8) & Cat(lanes[i].replicate(8) for i in range(4))
        # Registered in Check-Access: the access's lanes and shifted data do not follow
        # the window's fields into the BAR's register decode (timing).
        bar_strobe = Signal(4)
        m.d.comb += [
            bar.w_strb.eq(bar_strobe),
            bar.r_strb.eq(bar_strobe),
        ]

        bar_read = Signal()             # the PCI_CFG access in progress is a read
        with m.FSM():
            with m.State("Idle"):
                with m.If(held_valid):
                    m.d.sync += held_valid.eq(0)
                    is_data = held.index == data_dword
                    with m.If(held.write):
                        for byte in sorted(writable):
                            with m.If((held.index == byte // 4) & held.byte_enable[byte % 4]):
                                m.d.sync += window[8 * byte:8 * byte + 8].eq(
                                    held.data.word_select(byte % 4, 8))
                        with m.If(is_data & held.byte_enable.any()):
                            m.d.sync += bar_read.eq(0)
                            m.next = "Check-Access"
                    with m.Elif(is_data):
                        m.d.sync += bar_read.eq(1)
                        m.next = "Check-Access"
                    with m.Else():
                        m.d.comb += [
                            cfg_ext.read_data.eq(window.word_select(held.index, 32)),
                            cfg_ext.read_data_valid.eq(1),
                        ]
            with m.State("Check-Access"):
                m.d.sync += [
                    bar.addr.eq(pci_cfg.cap.offset[2:]),
                    bar.w_data.eq(pci_cfg.pci_cfg_data << lane * 8),
                    bar_strobe.eq(strobe),
                ]
                with m.If(access_ok & bar_read):
                    m.next = "Bar-Read"
                with m.Elif(access_ok):
                    m.next = "Bar-Write"
                with m.Else():
                    with m.If(bar_read):
                        m.d.comb += [
                            cfg_ext.read_data.eq(pci_cfg.pci_cfg_data),
                            cfg_ext.read_data_valid.eq(1),
                        ]
                    m.next = "Idle"
            with m.State("Bar-Write"):
                m.d.comb += bar.w_stb.eq(1)
                with m.If(bar.ready):
                    m.next = "Idle"
            with m.State("Bar-Read"):
                m.d.comb += bar.r_stb.eq(1)
                with m.If(bar.ready):
                    m.next = "Bar-Read-Data"
            with m.State("Bar-Read-Data"):
                m.d.sync += pci_cfg.pci_cfg_data.eq(read_value)
                m.d.comb += [
                    cfg_ext.read_data.eq(read_value),
                    cfg_ext.read_data_valid.eq(1),
                ]
                m.next = "Idle"

        # After the FSM's release of the held access: a new one replaces it.
        with m.If((cfg_ext.read_received | cfg_ext.write_received) & in_window):
            m.d.sync += [
                held_valid.eq(1),
                held.write.eq(cfg_ext.write_received),
                held.index.eq(register - first_register),
                held.data.eq(cfg_ext.write_data),
                held.byte_enable.eq(cfg_ext.write_byte_enable),
            ]

        return m
