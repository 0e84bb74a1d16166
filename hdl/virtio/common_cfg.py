"""The virtio common configuration structure (virtio 1.2 4.1.4.3) of the memballoon function.

A register-bus slave for ``struct virtio_pci_common_cfg``: feature negotiation (C3, C4),
device status and the reset handshake (C9), MSI-X vector mapping (C11) and the
configuration of the two virtqueues (C2). Its outputs are what the rest of the device
needs to know about the driver's choices.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from memballoon import constants as c
from memballoon.params import DeviceParams

from ..regbus import RegBusSignature


class QueueConfig(data.Struct):
    """What the driver configured for one virtqueue (virtio 1.2 4.1.4.3)."""
    #: Entries: a power of two, at most ``DeviceParams.max_queue_size``.
    size: 16
    enable: 1
    #: MSI-X vector of used-buffer notifications, or ``VIRTIO_MSI_NO_VECTOR``.
    msix_vector: 16
    #: Guest addresses of the Descriptor, Driver (available ring) and Device (used ring) Areas.
    desc: 64
    driver: 64
    device: 64


#: Status bits the driver sets by writing them; FEATURES_OK is granted by the C4 check and
#: DEVICE_NEEDS_RESET is the device's own.
_DRIVER_STATUS_BITS = (c.DeviceStatus.ACKNOWLEDGE | c.DeviceStatus.DRIVER |
                       c.DeviceStatus.DRIVER_OK | c.DeviceStatus.FAILED).value


def _field_write(bus, enable, offset, size, current):
    """Whether an accepted write touches the ``size``-byte field at byte ``offset`` of the
    structure, and the field's new value: written bytes where the strobe is set, ``current``
    elsewhere (several fields share a dword, so partial writes are merged)."""
    lane = offset % 4
    current = Cat(current, Const(0, 8 * size - len(current)))
    hit = enable & (bus.addr == offset // 4) & bus.w_strb[lane:lane + size].any()
    merged = Cat(Mux(bus.w_strb[lane + i], bus.w_data.word_select(lane + i, 8),
                     current.word_select(i, 8))
                 for i in range(size))
    return hit, merged


def _to_init(register):
    """Assignment of a register's reset value (the port or signal ``init``)."""
    register = Value.cast(register)
    return register.eq(register.init)


class CommonCfg(wiring.Component):
    """``struct virtio_pci_common_cfg`` behind the BAR decoder.

    Device status bits are only ever set until reset: the driver must not clear them
    (virtio 1.2 3.1.1), and keeping them keeps the negotiated features and page size fixed
    until reset (C4). Reserved status bits read 0.

    Reset (C9): a write of 0 to ``device_status`` or a rising ``flr`` resets every register
    here at once and starts the handshake with the blocks that clear larger state (the
    bitmap, the queues). ``device_status`` keeps reading non-zero until they are done: the
    status held when the reset began, or DEVICE_NEEDS_RESET if that was 0 (any non-zero
    value satisfies virtio 1.2 4.1.4.3.2; the driver waits for 0). Every write is ignored
    while resetting. Power-on starts with the same handshake, so the first reads of
    ``device_status`` also wait for the other blocks' initial clear.

    Attributes
    ----------
    bus : In(RegBusSignature(4))
        Dword ``i`` holds bytes ``4 * i`` .. ``4 * i + 3`` of the structure; always ready.
        A write merges its strobed bytes into each field it touches; vectors and queue
        sizes are checked on the merged value (drivers use natural-width accesses,
        virtio 1.2 4.1.3.1). Reads return the whole dword.
    set_needs_reset : In(1)
        Pulse: set DEVICE_NEEDS_RESET (C7 ring faults, the management port). It stays set
        until reset; it is ignored while resetting.
    flr : In(1)
        Function-level reset in progress (from the hard IP); its rising edge resets.
    reset_busy : In(1)
        High while another block is still clearing after ``reset_request``. A block that
        needs time raises it at the latest in the cycle after ``reset_request`` and keeps
        it high until it is done; the reset completes in the first cycle after the
        request in which it is low.
    device_status : Out(8)
        The value ``device_status`` reads.
    driver_features : Out(64)
        The features the driver accepted; fixed while ``features_ok``.
    features_ok : Out(1)
        FEATURES_OK is set: ``driver_features`` passed the C4 check.
    driver_ok : Out(1)
        The driver is running the device: DRIVER_OK and FEATURES_OK set, FAILED clear, not
        resetting. A failed C4 check latches until reset and FEATURES_OK never sets again,
        so DRIVER_OK then has no effect. DEVICE_NEEDS_RESET does not drop it: C7 stops
        only the faulting queue, the rest of the device keeps working.
    page_shift : Out(6)
        log2 of the negotiated page size (C4); valid while ``features_ok``.
    config_msix_vector : Out(16)
        MSI-X vector of configuration changes, or ``VIRTIO_MSI_NO_VECTOR``.
    queues : Out(data.ArrayLayout(QueueConfig, NUM_QUEUES))
        0 = fromdevq, 1 = todevq (C2).
    reset_request : Out(1)
        One-cycle pulse at the start of a reset: clear your state.
    resetting : Out(1)
        A reset is in progress; ``device_status`` reads non-zero.
    flr_done : Out(1)
        One-cycle pulse when a reset that an FLR started has completed.
    """

    #: 16 dwords: the 0x3C-byte structure rounded up to a power of two.
    ADDR_WIDTH = (c.VIRTIO_PCI_COMMON_CFG_SIZE - 1).bit_length() - 2

    def __init__(self, params: DeviceParams):
        self._params = params
        queue_init = {"size": params.max_queue_size, "msix_vector": c.VIRTIO_MSI_NO_VECTOR}
        super().__init__({
            "bus": In(RegBusSignature(self.ADDR_WIDTH)),
            "set_needs_reset": In(1),
            "flr": In(1),
            "reset_busy": In(1),
            # Power-on is a reset that began with status 0.
            "device_status": Out(8, init=c.VIRTIO_CONFIG_S_NEEDS_RESET),
            "driver_features": Out(64),
            "features_ok": Out(1),
            "driver_ok": Out(1),
            "page_shift": Out(6),
            "config_msix_vector": Out(16, init=c.VIRTIO_MSI_NO_VECTOR),
            "queues": Out(data.ArrayLayout(QueueConfig, c.NUM_QUEUES),
                          init=[queue_init] * c.NUM_QUEUES),
            "reset_request": Out(1),
            "resetting": Out(1),
            "flr_done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        params = self._params
        bus = self.bus
        status = self.device_status

        device_feature_select = Signal(32)
        driver_feature_select = Signal(32)
        queue_select = Signal(16)
        features_failed = Signal()      # C4 check failed: no FEATURES_OK until reset
        flr_seen = Signal()
        flr_pending = Signal()

        running = Signal()
        m.d.comb += [
            bus.ready.eq(1),
            self.resetting.eq(~running),
        ]

        def field_write(offset, size, current):
            return _field_write(bus, bus.w_stb & running, offset, size, current)

        def msix_vector(vector):
            """virtio 1.2 4.1.5.1.2: an unmapped vector reads back as NO_VECTOR."""
            mappable = (vector < params.msix_vectors) | (vector == c.VIRTIO_MSI_NO_VECTOR)
            return Mux(mappable, vector, c.VIRTIO_MSI_NO_VECTOR)

        # --- Features (virtio 1.2 2.2, 4.1.4.3; C3, C4) ---------------------------------
        has_features_ok = (status & c.VIRTIO_CONFIG_S_FEATURES_OK).any()
        for register, offset in ((device_feature_select, c.VIRTIO_PCI_COMMON_DFSELECT),
                                 (driver_feature_select, c.VIRTIO_PCI_COMMON_GFSELECT)):
            hit, merged = field_write(offset, 4, register)
            with m.If(hit):
                m.d.sync += register.eq(merged)

        offered = Const(params.offered_features, 64)
        device_feature_word = Signal(32)
        driver_feature_word = Signal(32)
        for word in range(2):
            accepted_word = self.driver_features.word_select(word, 32)
            with m.If(device_feature_select == word):
                m.d.comb += device_feature_word.eq(offered.word_select(word, 32))
            with m.If(driver_feature_select == word):
                m.d.comb += driver_feature_word.eq(accepted_word)
            hit, merged = field_write(c.VIRTIO_PCI_COMMON_GF, 4, accepted_word)
            with m.If(hit & (driver_feature_select == word) & ~has_features_ok):
                m.d.sync += accepted_word.eq(merged)

        accepted = self.driver_features
        page_bits = accepted & c.PAGE_SIZE_FEATURE_MASK
        features_acceptable = (
            ((accepted & ~offered) == 0) &
            accepted[c.VIRTIO_F_VERSION_1] &
            (page_bits != 0) & ((page_bits & (page_bits - 1)) == 0))
        # Registered: the balloon's address arithmetic starts from it, not from the feature
        # decode; the features settle at least one write before FEATURES_OK is set.
        accepted_page_shift = Signal.like(self.page_shift)
        for bit in c.PAGE_SIZE_FEATURE_BITS:
            with m.If(accepted[bit]):
                m.d.comb += accepted_page_shift.eq(c.page_shift_of_feature(bit))
        m.d.sync += self.page_shift.eq(accepted_page_shift)

        # --- Device status (virtio 1.2 2.1, 3.1.1; C4, C9) ------------------------------
        status_written, written_status = field_write(c.VIRTIO_PCI_COMMON_STATUS, 1, status)
        features_ok_requested = (status_written & ~has_features_ok &
                                 (written_status & c.VIRTIO_CONFIG_S_FEATURES_OK).any())
        features_ok_granted = features_ok_requested & ~features_failed & features_acceptable

        m.d.sync += flr_seen.eq(self.flr)
        flr_rise = self.flr & ~flr_seen
        reset_start = flr_rise | (status_written & (written_status == 0))

        m.d.comb += [
            self.features_ok.eq(running & has_features_ok),
            self.driver_ok.eq(self.features_ok &
                              (status & c.VIRTIO_CONFIG_S_DRIVER_OK).any() &
                              ~(status & c.VIRTIO_CONFIG_S_FAILED).any()),
        ]

        m.d.sync += self.flr_done.eq(0)
        with m.FSM(init="Reset-Request"):
            with m.State("Reset-Request"):
                m.d.comb += self.reset_request.eq(1)
                m.next = "Reset-Wait"

            with m.State("Reset-Wait"):
                with m.If(flr_rise):
                    m.next = "Reset-Request"
                with m.Elif(~self.reset_busy):
                    m.d.sync += [
                        status.eq(0),
                        self.flr_done.eq(flr_pending),
                        flr_pending.eq(0),
                    ]
                    m.next = "Running"

            with m.State("Running"):
                m.d.comb += running.eq(1)
                with m.If(reset_start):
                    m.next = "Reset-Request"
                with m.Else():
                    m.d.sync += status.eq(
                        status |
                        Mux(status_written, written_status & _DRIVER_STATUS_BITS, 0) |
                        Mux(features_ok_granted, c.VIRTIO_CONFIG_S_FEATURES_OK, 0) |
                        Mux(self.set_needs_reset, c.VIRTIO_CONFIG_S_NEEDS_RESET, 0))
                    with m.If(features_ok_requested & ~features_ok_granted):
                        m.d.sync += features_failed.eq(1)

        # --- Configuration vector (C11) --------------------------------------------------
        hit, merged = field_write(c.VIRTIO_PCI_COMMON_MSIX, 2, self.config_msix_vector)
        with m.If(hit):
            m.d.sync += self.config_msix_vector.eq(msix_vector(merged))

        # --- Virtqueues (virtio 1.2 2.7, 4.1.4.3; C2) -------------------------------------
        hit, merged = field_write(c.VIRTIO_PCI_COMMON_Q_SELECT, 2, queue_select)
        with m.If(hit):
            m.d.sync += queue_select.eq(merged)

        selected = Signal(QueueConfig)      # all 0 for a queue that does not exist
        for index in range(c.NUM_QUEUES):
            queue = self.queues[index]
            is_selected = queue_select == index
            with m.If(is_selected):
                m.d.comb += selected.eq(queue)

            # Split ring (RING_PACKED is not offered): the size is a power of two
            # (virtio 1.2 2.7; 2**0 = 1 included), at most the reset value.
            hit, merged = field_write(c.VIRTIO_PCI_COMMON_Q_SIZE, 2, queue.size)
            size_valid = ((merged != 0) & ((merged & (merged - 1)) == 0) &
                          (merged <= params.max_queue_size))
            with m.If(hit & is_selected & ~queue.enable & size_valid):
                m.d.sync += queue.size.eq(merged)

            hit, merged = field_write(c.VIRTIO_PCI_COMMON_Q_MSIX, 2, queue.msix_vector)
            with m.If(hit & is_selected):
                m.d.sync += queue.msix_vector.eq(msix_vector(merged))

            # Writing 0 is ignored: without RING_RESET only a device reset disables a
            # queue (virtio 1.2 4.1.4.3.2, the driver MUST NOT write 0).
            hit, merged = field_write(c.VIRTIO_PCI_COMMON_Q_ENABLE, 2, queue.enable)
            with m.If(hit & is_selected & (merged == 1)):
                m.d.sync += queue.enable.eq(1)

            for area, low, high in ((queue.desc, c.VIRTIO_PCI_COMMON_Q_DESCLO,
                                     c.VIRTIO_PCI_COMMON_Q_DESCHI),
                                    (queue.driver, c.VIRTIO_PCI_COMMON_Q_AVAILLO,
                                     c.VIRTIO_PCI_COMMON_Q_AVAILHI),
                                    (queue.device, c.VIRTIO_PCI_COMMON_Q_USEDLO,
                                     c.VIRTIO_PCI_COMMON_Q_USEDHI)):
                for word, offset in enumerate((low, high)):
                    hit, merged = field_write(offset, 4, area.word_select(word, 32))
                    with m.If(hit & is_selected & ~queue.enable):
                        m.d.sync += area.word_select(word, 32).eq(merged)

        notify_off = Mux(queue_select < c.NUM_QUEUES, queue_select, 0)

        # --- Reset (C9): every register back to its reset value at once --------------------
        with m.If(reset_start):
            m.d.sync += [
                _to_init(device_feature_select),
                _to_init(driver_feature_select),
                _to_init(self.driver_features),
                _to_init(features_failed),
                _to_init(self.config_msix_vector),
                _to_init(queue_select),
                _to_init(self.queues),
                status.eq(Mux(status == 0, c.VIRTIO_CONFIG_S_NEEDS_RESET, status)),
            ]
        with m.If(flr_rise):
            m.d.sync += flr_pending.eq(1)

        # --- Reads: registered, whole dword, no side effects -------------------------------
        # The dword after the structure reads 0.
        readable = (
            (c.VIRTIO_PCI_COMMON_DFSELECT, device_feature_select),
            (c.VIRTIO_PCI_COMMON_DF, device_feature_word),
            (c.VIRTIO_PCI_COMMON_GFSELECT, driver_feature_select),
            (c.VIRTIO_PCI_COMMON_GF, driver_feature_word),
            (c.VIRTIO_PCI_COMMON_MSIX, self.config_msix_vector),
            (c.VIRTIO_PCI_COMMON_NUMQ, Const(c.NUM_QUEUES, 16)),
            (c.VIRTIO_PCI_COMMON_STATUS, status),
            # Stable: there is no device configuration (C2).
            (c.VIRTIO_PCI_COMMON_CFGGENERATION, Const(0, 8)),
            (c.VIRTIO_PCI_COMMON_Q_SELECT, queue_select),
            (c.VIRTIO_PCI_COMMON_Q_SIZE, selected.size),
            (c.VIRTIO_PCI_COMMON_Q_MSIX, selected.msix_vector),
            (c.VIRTIO_PCI_COMMON_Q_ENABLE, selected.enable),
            (c.VIRTIO_PCI_COMMON_Q_NOFF, notify_off),
            (c.VIRTIO_PCI_COMMON_Q_DESCLO, selected.desc[:32]),
            (c.VIRTIO_PCI_COMMON_Q_DESCHI, selected.desc[32:]),
            (c.VIRTIO_PCI_COMMON_Q_AVAILLO, selected.driver[:32]),
            (c.VIRTIO_PCI_COMMON_Q_AVAILHI, selected.driver[32:]),
            (c.VIRTIO_PCI_COMMON_Q_USEDLO, selected.device[:32]),
            (c.VIRTIO_PCI_COMMON_Q_USEDHI, selected.device[32:]),
            # NOTIF_CONFIG_DATA and RING_RESET are not offered; writes are ignored.
            (c.VIRTIO_PCI_COMMON_Q_NDATA, Const(0, 16)),
            (c.VIRTIO_PCI_COMMON_Q_RESET, Const(0, 16)),
        )
        dwords = {}
        for offset, value in readable:
            dwords[offset // 4] = dwords.get(offset // 4, 0) | (value << 8 * (offset % 4))

        with m.If(bus.r_stb):
            with m.Switch(bus.addr):
                for dword, value in dwords.items():
                    with m.Case(dword):
                        m.d.sync += bus.r_data.eq(value)
                with m.Default():
                    m.d.sync += bus.r_data.eq(0)

        return m
