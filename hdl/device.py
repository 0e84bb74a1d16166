"""The memballoon virtio-pci function behind any PCIe hard IP (vendor neutral)."""

from amaranth.hdl import Module, ResetInserter
from amaranth.lib import wiring
from amaranth.lib.wiring import In

from ..params import DeviceParams
from .axi_lite import AxiLiteSignature
from .mgmt import MgmtPort
from .pcie.completer import RegCompleter
from .pcie.interface import (CompleterSignature, ConfigExtSignature, FunctionStatusSignature,
                             MsixSignature)
from .pcie.msix import MsixTable
from .regbus_arbiter import RegBusArbiter
from .regbus_decoder import RegBusDecoder
from .virtio.cap_window import VirtioCapWindow
from .virtio.common_cfg import CommonCfg
from .virtio.irq_router import IrqRouter
from .virtio.isr import VirtioIsr
from .virtio.notify import VirtioNotify
from .. import constants as c


class MemballoonDevice(wiring.Component):
    """The virtio transport (C2..C4, C9, C11) and the management port (C10).

    BAR0 requests come through the completer, the capability window through ``cfg_ext``;
    both reach BAR0's registers over one register bus (the PCI_CFG window's accesses go
    first, they are rare and a configuration read waits on them).
    """

    def __init__(self, params: DeviceParams):
        self._params = params
        super().__init__({
            "completer": In(CompleterSignature()),
            "cfg_ext": In(ConfigExtSignature()),
            "msix": In(MsixSignature()),
            "status": In(FunctionStatusSignature()),
            "mgmt": In(AxiLiteSignature(c.MGMT_ADDR_WIDTH)),
        })

    def elaborate(self, platform):
        params = self._params
        bar = params.bar
        bar_addr_width = (bar.size // 4).bit_length() - 1
        m = Module()

        m.submodules.completer = completer = RegCompleter(bar_addr_width)
        m.submodules.cap_window = cap_window = VirtioCapWindow(params)
        m.submodules.arbiter = arbiter = RegBusArbiter(bar_addr_width, 2)
        m.submodules.decoder = decoder = RegBusDecoder(bar_addr_width, {
            "common_cfg": (bar.common_cfg, 0x40),
            "notify": (bar.notify, 0x1000),
            "isr": (bar.isr, 0x1000),
            "msix": (bar.msix_table, 0x1000),
        })
        m.submodules.common_cfg = common_cfg = CommonCfg(params)
        m.submodules.notify = notify = VirtioNotify(params)
        m.submodules.isr = isr = VirtioIsr()
        msix = MsixTable(params.msix_vectors, pba_offset=bar.msix_pba - bar.msix_table)
        # The MSI-X table belongs to PCI, not to virtio: a function-level reset clears it,
        # a virtio reset (device_status = 0) does not.
        m.submodules.msix = ResetInserter(self.status.flr)(msix)
        m.submodules.irq_router = irq_router = IrqRouter(params.msix_vectors)
        m.submodules.mgmt = mgmt = MgmtPort()

        wiring.connect(m, wiring.flipped(self.completer), completer.completer)
        wiring.connect(m, wiring.flipped(self.cfg_ext), cap_window.cfg_ext)
        wiring.connect(m, cap_window.bar, arbiter.requesters[0])
        wiring.connect(m, completer.bus, arbiter.requesters[1])
        wiring.connect(m, arbiter.bus, decoder.bus)
        wiring.connect(m, decoder.common_cfg, common_cfg.bus)
        wiring.connect(m, decoder.notify, notify.bus)
        wiring.connect(m, decoder.isr, isr.bus)
        wiring.connect(m, decoder.msix, msix.bus)
        wiring.connect(m, wiring.flipped(self.msix), msix.msix)
        wiring.connect(m, irq_router.msix_request, msix.request)
        wiring.connect(m, wiring.flipped(self.mgmt), mgmt.axil)

        m.d.comb += [
            completer.max_payload.eq(self.status.max_payload),
            msix.bus_master_enable.eq(self.status.bus_master_enable),

            common_cfg.flr.eq(self.status.flr),
            self.status.flr_done.eq(common_cfg.flr_done),
            # Nothing outside the common configuration holds state a reset must clear
            # over several cycles yet; the balloon core's bitmap clear will (C9).
            common_cfg.reset_busy.eq(0),
            common_cfg.set_needs_reset.eq(mgmt.request_reset),

            irq_router.config_event.eq(mgmt.request_reset),
            irq_router.config_vector.eq(common_cfg.config_msix_vector),
            irq_router.clear.eq(common_cfg.reset_request),
            isr.set_config.eq(irq_router.isr_config),
            isr.set_queue.eq(irq_router.isr_queue),
            isr.clear.eq(common_cfg.reset_request),

            mgmt.device_status.eq(common_cfg.device_status),
            mgmt.driver_features.eq(common_cfg.driver_features),
            mgmt.notify.eq(notify.notify),
            mgmt.msix_sent.eq(msix.sent_count),
            mgmt.msix_failed.eq(msix.fail_count),
        ]
        for q in range(c.NUM_QUEUES):
            m.d.comb += irq_router.queue_vectors[q].eq(common_cfg.queues[q].msix_vector)
        return m
