"""The memballoon virtio-pci function behind any PCIe hard IP (vendor neutral)."""

from amaranth.hdl import Cat, Module, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In

from ..params import DeviceParams
from .axi_lite import AxiLiteSignature
from .balloon.core import BalloonCore
from .mgmt import MgmtPort
from .pcie.completer import RegCompleter
from .pcie.dma import DmaEngine
from .pcie.dma_mux import DmaMux
from .pcie.interface import (CompleterSignature, ConfigExtSignature, FunctionStatusSignature,
                             IntxSignature, MsixSignature, RequesterSignature)
from .pcie.msix import MsixTable
from .regbus_arbiter import RegBusArbiter
from .regbus_decoder import RegBusDecoder
from .virtio.cap_window import VirtioCapWindow
from .virtio.common_cfg import CommonCfg
from .virtio.irq_router import IrqRouter
from .virtio.isr import VirtioIsr
from .virtio.notify import VirtioNotify
from .virtqueue.split.engine import VirtqueueEngine
from .. import constants as c


class MemballoonDevice(wiring.Component):
    """The memballoon function: virtio transport (C2..C4, C9, C11), one split-ring engine
    per queue over one DMA engine (C7, C12), the balloon core (C5, C6, C8) and the
    management port (C10). Interrupts (C11) are MSI-X messages, or with MSI-X disabled
    the ISR byte's INTx.

    BAR0 requests come through the completer, the capability window through ``cfg_ext``;
    both reach BAR0's registers over one register bus (the PCI_CFG window's accesses go
    first, they are rare and a configuration read waits on them). The engines reach host
    memory through ``requester``.
    """

    def __init__(self, params: DeviceParams):
        self._params = params
        super().__init__({
            "completer": In(CompleterSignature()),
            "requester": In(RequesterSignature()),
            "cfg_ext": In(ConfigExtSignature()),
            "msix": In(MsixSignature()),
            "intx": In(IntxSignature()),
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
        m.submodules.dma = dma = DmaEngine()
        m.submodules.dma_mux = dma_mux = DmaMux(c.NUM_QUEUES)
        m.submodules.balloon = balloon = BalloonCore(params.bitmap_pages,
                                                     grant_limit=params.get_grant_limit)
        engines = []
        for queue in range(c.NUM_QUEUES):
            # fromdevq parks the buffers held for a minimum (C6); todevq completes in order.
            engine = VirtqueueEngine(params, parking=queue == c.FROMDEVQ)
            m.submodules[f"virtqueue{queue}"] = engine
            engines.append(engine)

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
        wiring.connect(m, wiring.flipped(self.intx), isr.intx)
        wiring.connect(m, irq_router.msix_request, msix.request)
        wiring.connect(m, wiring.flipped(self.mgmt), mgmt.axil)
        wiring.connect(m, mgmt.balloon, balloon.host)
        wiring.connect(m, wiring.flipped(self.requester), dma.requester)
        wiring.connect(m, dma_mux.dma, dma.client)
        wiring.connect(m, engines[c.FROMDEVQ].command, balloon.fromdevq)
        wiring.connect(m, engines[c.TODEVQ].command, balloon.todevq)

        features = common_cfg.driver_features
        fault = Signal()
        m.d.comb += fault.eq(Cat(engine.fault for engine in engines).any())
        for queue, engine in enumerate(engines):
            config = common_cfg.queues[queue]
            wiring.connect(m, engine.dma, dma_mux.clients[queue])
            m.d.comb += [
                engine.config.eq(config),
                # C12: nothing before DRIVER_OK or while Bus Master Enable is clear (the
                # work waits: the engine drains when `run` rises); a reset stops everything.
                engine.run.eq(config.enable & common_cfg.driver_ok & ~common_cfg.resetting &
                              self.status.bus_master_enable),
                engine.event_idx.eq(features[c.VIRTIO_F_RING_EVENT_IDX]),
                engine.indirect.eq(features[c.VIRTIO_F_INDIRECT_DESC]),
                engine.notify.eq(notify.notify[queue]),
                engine.reset.eq(common_cfg.reset_request),
                irq_router.queue_event[queue].eq(engine.interrupt),
                irq_router.queue_vectors[queue].eq(config.msix_vector),
                mgmt.ring_fault[queue].eq(engine.fault),
                mgmt.ring_fault_kind[queue].eq(engine.fault_kind),
            ]

        m.d.comb += [
            completer.max_payload.eq(self.status.max_payload),
            dma.max_payload.eq(self.status.max_payload),
            dma.max_read_request.eq(self.status.max_read_request),
            # C12: no DMA while Bus Master Enable is clear or before DRIVER_OK.
            dma.enable.eq(self.status.bus_master_enable & common_cfg.driver_ok),
            msix.bus_master_enable.eq(self.status.bus_master_enable),

            common_cfg.flr.eq(self.status.flr),
            self.status.flr_done.eq(common_cfg.flr_done),
            # C9: device_status reads 0 only once the bitmap is clear and the engines
            # have drained their DMA.
            common_cfg.reset_busy.eq(balloon.busy | Cat(e.busy for e in engines).any()),
            balloon.reset.eq(common_cfg.reset_request),
            # C7: todevq's commands commit once published; a todevq fault undoes the rest.
            balloon.commit.eq(engines[c.TODEVQ].committed),
            balloon.abort.eq(engines[c.TODEVQ].fault),
            balloon.todevq_busy.eq(engines[c.TODEVQ].busy),
            balloon.page_shift.eq(common_cfg.page_shift),
            balloon.extra_mem.eq(common_cfg.features_ok &
                                 features[c.VIRTIO_MEMBALLOON_F_EXTRA_MEM]),
            # C7: a ring fault, or the host asking, sets DEVICE_NEEDS_RESET and raises the
            # configuration-change interrupt.
            common_cfg.set_needs_reset.eq(mgmt.request_reset | fault),
            irq_router.config_event.eq(mgmt.request_reset | fault),
            irq_router.config_vector.eq(common_cfg.config_msix_vector),
            irq_router.clear.eq(common_cfg.reset_request),
            isr.set_config.eq(irq_router.isr_config),
            isr.set_queue.eq(irq_router.isr_queue),
            isr.clear.eq(common_cfg.reset_request),
            isr.msix_enable.eq(self.msix.enable),
            isr.interrupt_disable.eq(self.status.interrupt_disable),

            mgmt.device_status.eq(common_cfg.device_status),
            mgmt.driver_features.eq(common_cfg.driver_features),
            mgmt.page_shift.eq(common_cfg.page_shift),
            mgmt.notify.eq(notify.notify),
            mgmt.msix_sent.eq(msix.sent_count),
            mgmt.msix_failed.eq(msix.fail_count),
        ]
        return m
