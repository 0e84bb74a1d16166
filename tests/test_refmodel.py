"""The reference model (sw/refmodel.py) against the contract: C1..C12, register by register
and command by command, driven through RefBackend with virtio_pci_modern and the ring's
low-level API (so malformed chains reach the device unfiltered)."""

import struct

import pytest

from memballoon.constants import (PCI_DEVICE_ID, PCI_REVISION_ID, PCI_SUBSYSTEM_ID,
                                  PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID, VRING_AVAIL_IDX,
                                  VRING_AVAIL_RING, VRING_USED_RING)
from memballoon import constants as c
from memballoon.backend import BackendError
from memballoon.backend_ref import MSI_ADDRESS, RefBackend
from memballoon.lspci import format_dump, parse_lspci, read_config_space, run_lspci
from memballoon.params import BarLayout, DeviceParams
from memballoon.refmodel import (COUNTER_NAMES, DEFAULT_RING_FEATURES, MSIX_CAP_POS,
                                 HostMemory, Malformed, MemballoonRef)
from memballoon.tb.scenarios import cmd
from memballoon.virtio_memballoon import DeviceNeedsReset, VirtioMemballoon
from memballoon.virtio_pci_modern import DeviceTimeout, VirtioPciModernDevice
from memballoon.virtio_ring import VringDesc, sg_split, vring_avail_event_offset
from model_util import asynctest, live

PAGE = 4096
GIVE = c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES
GET = c.VIRTIO_MEMBALLOON_GCMD_GET_PAGES
EXCHANGE = c.VIRTIO_MEMBALLOON_GCMD_EXCHANGE_PAGES
F = c.RingFault
ALL_FEATURES = (1 << 64) - 1


def nonzero(counters):
    return {name: value for name, value in counters.items() if value}


async def send(vq, sgs, indirect=None):
    """Add one buffer, kick, and return (token, len) of the next used buffer or None."""
    token = object()
    await vq.virtqueue_add_sgs(sgs, token, indirect)
    await vq.virtqueue_kick()
    return await vq.virtqueue_get_buf()


async def command(dev, data, writable=0, indirect=None):
    """One todevq command; (used.len, the writable bytes after completion)."""
    result = bytearray(b"\xAA" * writable)
    sgs = [(data, False)] + ([(result, True)] if writable else [])
    got = await send(dev.todevq, sgs, indirect)
    assert got is not None, "the command was not used"
    return got[1], bytes(result)


# --- C1, C2: identity and configuration space -----------------------------------------------

@asynctest
async def test_identity_and_header():
    be = RefBackend()
    rd = be.config_read
    assert await rd(PCI_VENDOR_ID, 2) == c.PCI_VENDOR_ID_REDHAT_QUMRANET
    assert await rd(PCI_DEVICE_ID, 2) == c.MEMBALLOON_PCI_DEVICE_ID
    assert await rd(PCI_REVISION_ID, 1) == c.MEMBALLOON_PCI_REVISION_ID
    assert await rd(PCI_REVISION_ID, 4) >> 8 == c.PCI_CLASS_MEMORY_OTHER
    assert await rd(PCI_SUBSYSTEM_VENDOR_ID, 2) == c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID
    assert await rd(PCI_SUBSYSTEM_ID, 2) == c.MEMBALLOON_PCI_SUBSYSTEM_ID
    # Read-only fields ignore writes; only Memory, Bus Master and Interrupt Disable of the
    # command register stick.
    await be.config_write(PCI_VENDOR_ID, 0x1234, 2)
    await be.config_write(c.PCI_COMMAND, 0xFFFF, 2)
    assert await rd(PCI_VENDOR_ID, 2) == c.PCI_VENDOR_ID_REDHAT_QUMRANET
    assert await rd(c.PCI_COMMAND, 2) == (c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER |
                                          c.PCI_COMMAND_INTX_DISABLE)
    # C11: INTA, its Interrupt Line writable (the platform's routing), no INTx pending.
    assert await rd(c.PCI_INTERRUPT_PIN, 1) == c.PCI_INTERRUPT_PIN_INTA
    await be.config_write(c.PCI_INTERRUPT_LINE, 0x2B, 1)
    assert await rd(c.PCI_INTERRUPT_LINE, 2) == c.PCI_INTERRUPT_PIN_INTA << 8 | 0x2B
    assert not await rd(c.PCI_STATUS, 2) & c.PCI_STATUS_INTERRUPT
    # BAR0 is a 64-bit memory BAR of params.bar.size bytes (sizing handshake).
    await be.config_write(0x10, 0xFFFFFFFF, 4)
    await be.config_write(0x14, 0xFFFFFFFF, 4)
    assert await rd(0x10, 4) == (~(be.model.params.bar.size - 1) & 0xFFFFFFFF) | 0x4
    assert await rd(0x14, 4) == 0xFFFFFFFF


@pytest.mark.parametrize("params", [DeviceParams(), DeviceParams(
    cfg_ext_base=0x80, cfg_ext_size=0x80, msix_vectors=8,
    bar=BarLayout(common_cfg=0x1000, notify=0x2000, isr=0x0, msix_table=0x3000,
                  msix_pba=0x3400, notify_off_multiplier=8))], ids=["default", "moved"])
@asynctest
async def test_capability_chain_follows_params(params):
    """C2: COMMON, NOTIFY, ISR, PCI_CFG from cfg_ext_base, BAR0 offsets from params.bar;
    the MSI-X capability leads there; lspci decodes the same."""
    be = RefBackend(MemballoonRef(params))
    vdev = VirtioPciModernDevice(be)
    caps = await vdev.capabilities()
    sizes = [c.VIRTIO_PCI_CAP_SIZE, c.VIRTIO_PCI_NOTIFY_CAP_SIZE, c.VIRTIO_PCI_CAP_SIZE,
             c.VIRTIO_PCI_CFG_CAP_SIZE]
    positions = [params.cfg_ext_base + sum(sizes[:i]) for i in range(4)]
    assert caps == [(c.PCI_CAP_ID_MSIX, MSIX_CAP_POS)] + [(c.PCI_CAP_ID_VNDR, p) for p in positions]
    bar = params.bar
    expected = [(c.VIRTIO_PCI_CAP_COMMON_CFG, bar.common_cfg, c.VIRTIO_PCI_COMMON_CFG_SIZE),
                (c.VIRTIO_PCI_CAP_NOTIFY_CFG, bar.notify, bar.notify_off_multiplier + 2),
                (c.VIRTIO_PCI_CAP_ISR_CFG, bar.isr, 1), (c.VIRTIO_PCI_CAP_PCI_CFG, 0, 0)]
    got = await vdev.virtio_caps()
    assert [(cap.cfg_type, cap.offset, cap.length) for cap in got] == expected
    assert all(cap.bar == 0 for cap in got)
    assert got[1].notify_off_multiplier == bar.notify_off_multiplier

    dev = parse_lspci(run_lspci(format_dump(await read_config_space(be))))
    msix = dev.find(lambda cap: cap.pos == MSIX_CAP_POS)[0].msix()
    assert (msix["count"], msix["table_offset"], msix["pba_offset"]) == \
        (params.msix_vectors, bar.msix_table, bar.msix_pba)
    notify = dev.find(lambda cap: cap.virtio_type == "Notify")[0].virtio()
    assert (notify["offset"], notify["multiplier"]) == (bar.notify, bar.notify_off_multiplier)

    await vdev.init()           # the driver model runs on the moved layout too
    assert be.model.driver_ok


def test_capabilities_must_fit_the_window():
    with pytest.raises(ValueError, match="cfg_ext window"):
        MemballoonRef(DeviceParams(cfg_ext_base=0xC0, cfg_ext_size=0x40))


@asynctest
async def test_pci_cfg_window_performs_bar_accesses():
    """C2: pci_cfg_data reads and writes do the BAR access the capability describes."""
    be = RefBackend()
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    await be.sleep(be.model.reset_time)         # writes wait for the power-on reset (C9)
    common = be.model.params.bar.common_cfg
    assert await vdev.vp_pci_cfg_read(0, common + c.VIRTIO_PCI_COMMON_NUMQ, 2) == c.NUM_QUEUES
    await vdev.vp_pci_cfg_write(0, common + c.VIRTIO_PCI_COMMON_DFSELECT, 1, 4)
    assert await vdev.vp_pci_cfg_read(0, common + c.VIRTIO_PCI_COMMON_DF, 4) == \
        be.model.offered_features >> 32
    assert await vdev.common.ioread(c.VIRTIO_PCI_COMMON_DFSELECT, 4) == 1
    notify = be.model.params.bar.notify + be.model.params.bar.notify_off_multiplier
    await vdev.vp_pci_cfg_write(0, notify, 1, 2)
    assert be.model.counters["MGMT_NOTIFY_COUNT_Q1"] == 1
    assert await vdev.vp_pci_cfg_read(0, be.model.params.bar.isr, 1) == 0
    be.model.request_reset()
    assert await vdev.vp_pci_cfg_read(0, be.model.params.bar.isr, 1) == c.VIRTIO_PCI_ISR_CONFIG
    assert await vdev.vp_modern_isr() == 0                                  # read cleared it


@pytest.mark.parametrize("bar, offset, length", [
    (1, 0x1004, 2), (0, 0x1004, 3), (0, 0x1005, 2), (0, 0x4000, 1)])
@asynctest
async def test_pci_cfg_window_ignores_bad_accesses(bar, offset, length):
    """Another BAR, a length not 1/2/4, a misaligned or out-of-BAR offset: no access, and a
    read returns pci_cfg_data as it was."""
    be = RefBackend()
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    pos = vdev.pci_cfg.pos
    await be.config_write(pos + c.VIRTIO_PCI_CAP_BAR, bar, 1)
    await be.config_write(pos + c.VIRTIO_PCI_CAP_OFFSET, offset, 4)
    await be.config_write(pos + c.VIRTIO_PCI_CAP_LENGTH, length, 4)
    await be.config_write(pos + c.VIRTIO_PCI_CFG_CAP_DATA, 0x5A5A0001, 4)
    assert be.model.counters["MGMT_NOTIFY_COUNT_Q1"] == 0
    assert await be.config_read(pos + c.VIRTIO_PCI_CFG_CAP_DATA, 4) == 0x5A5A0001
    assert await be.config_read(pos + c.VIRTIO_PCI_CAP_LENGTH, 4) == length


def test_bad_accesses_raise():
    model = MemballoonRef()
    with pytest.raises(ValueError, match="width 3"):
        model.config_read(0, 3)
    with pytest.raises(ValueError, match="aligned"):
        model.bar_read(0, 2, 4)
    with pytest.raises(ValueError, match="BAR1"):
        model.bar_write(1, 0, 0, 4)
    with pytest.raises(ValueError, match="below"):
        model.bar_read(0, model.params.bar.size, 4)
    with pytest.raises(ValueError, match="value"):
        model.bar_write(0, 0, 1 << 16, 2)
    with pytest.raises(ValueError, match="management offset"):
        model.mgmt_read(0x1002)
    with pytest.raises(ValueError, match="ring features"):
        MemballoonRef(ring_features=(c.VIRTIO_F_RING_PACKED,))
    with pytest.raises(ValueError, match="minimum"):
        model.set_min_balloon(1 << 63)
    with pytest.raises(ValueError, match="time"):
        model.advance(-1)
    with pytest.raises(ValueError, match="not allocated"):
        HostMemory().read(0, 4)


@asynctest
async def test_backend_bad_accesses_raise():
    be = RefBackend()
    with pytest.raises(BackendError, match="BAR2"):
        await be.bar_read(2, 0, 4)
    with pytest.raises(BackendError, match="aligned"):
        await be.bar_write(0, 1, 0, 2)
    with pytest.raises(BackendError, match="not allocated"):
        await be.wait_irq(0, 1e-6)
    with pytest.raises(ValueError, match="delay"):
        be.schedule(-1, lambda: None)


# --- common configuration: C3, C4, C9 --------------------------------------------------------

@pytest.mark.parametrize("ring", [(), (c.VIRTIO_F_INDIRECT_DESC,), DEFAULT_RING_FEATURES])
@asynctest
async def test_offered_features(ring):
    be = RefBackend(MemballoonRef(ring_features=ring))
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    await be.sleep(be.model.reset_time)
    offered = await vdev.vp_modern_get_features()
    left_out = sum(1 << b for b in DEFAULT_RING_FEATURES if b not in ring)
    assert offered == DeviceParams().offered_features & ~left_out
    assert offered >> c.VIRTIO_MEMBALLOON_F_EXTRA_MEM & 1
    for bit in (c.VIRTIO_F_VERSION_1, c.VIRTIO_F_ACCESS_PLATFORM, c.VIRTIO_F_ORDER_PLATFORM,
                *DeviceParams().page_size_bits):
        assert offered >> bit & 1


def bits(*numbers):
    return sum(1 << n for n in numbers)


V1, P4K, P2M = c.VIRTIO_F_VERSION_1, c.VIRTIO_MEMBALLOON_F_4K, c.VIRTIO_MEMBALLOON_F_2M


@pytest.mark.parametrize("features, ring, ok", [
    (bits(V1, P4K), DEFAULT_RING_FEATURES, True),
    (bits(V1, P2M, c.VIRTIO_MEMBALLOON_F_EXTRA_MEM, c.VIRTIO_F_INDIRECT_DESC,
          c.VIRTIO_F_RING_EVENT_IDX, c.VIRTIO_F_ACCESS_PLATFORM), DEFAULT_RING_FEATURES, True),
    (bits(P4K), DEFAULT_RING_FEATURES, False),                        # no VERSION_1
    (bits(V1), DEFAULT_RING_FEATURES, False),                         # no page size
    (bits(V1, P4K, P2M), DEFAULT_RING_FEATURES, False),               # two page sizes
    (bits(V1, c.VIRTIO_MEMBALLOON_F_4K + 1), DEFAULT_RING_FEATURES, False),   # 8K not offered
    (bits(V1, P4K, c.VIRTIO_F_RING_PACKED), DEFAULT_RING_FEATURES, False),  # not offered
    (bits(V1, P4K, c.VIRTIO_F_RING_EVENT_IDX), (), False),            # build without it
], ids=["minimal", "full", "no-version1", "no-page", "two-pages", "8K", "packed",
        "event-idx-not-built"])
@asynctest
async def test_negotiation_matrix(features, ring, ok):
    """C4: FEATURES_OK sticks only for a subset of the offer with VERSION_1 and exactly one
    page size; the management port shows the accepted set and the page shift."""
    model = MemballoonRef(ring_features=ring)
    be = RefBackend(model)
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    await vdev.vp_modern_reset()
    await vdev.vp_modern_set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER)
    await vdev.vp_modern_set_features(features)
    assert await vdev.vp_modern_get_driver_features() == features
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_FEATURES_OK)
    assert bool(await vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK) == ok
    lo, hi = model.mgmt_read(c.MGMT_DRIVER_FEATURES_LO), model.mgmt_read(c.MGMT_DRIVER_FEATURES_HI)
    assert hi << 32 | lo == features
    page_bit = next(b for b in c.PAGE_SIZE_FEATURE_BITS if features >> b & 1) \
        if features & c.PAGE_SIZE_FEATURE_MASK else None
    expected_shift = c.page_shift_of_feature(page_bit) if ok else 0
    assert model.mgmt_read(c.MGMT_PAGE_SHIFT) == expected_shift


@asynctest
async def test_failed_negotiation_latches_until_reset():
    be = RefBackend()
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    await vdev.vp_modern_reset()
    await vdev.vp_modern_set_features(bits(V1))
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_FEATURES_OK)
    await vdev.vp_modern_set_features(bits(V1, P4K))
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_FEATURES_OK)
    assert not await vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK
    await vdev.vp_modern_reset()
    await vdev.vp_modern_set_features(bits(V1, P4K))
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_FEATURES_OK)
    assert await vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK
    # Accepted features are fixed while FEATURES_OK is set.
    await vdev.vp_modern_set_features(bits(V1, P2M))
    assert await vdev.vp_modern_get_driver_features() == bits(V1, P4K)
    # Status bits are only ever set; DEVICE_NEEDS_RESET is the device's.
    await vdev.vp_modern_set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_NEEDS_RESET)
    assert await vdev.vp_modern_get_status() == \
        c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_FEATURES_OK


@asynctest
async def test_reset_handshake():
    """C9 and README: device_status reads non-zero until the clear is done (the old
    status, or NEEDS_RESET after status 0); writes are ignored meanwhile; MGMT_BUSY."""
    model = MemballoonRef(reset_time=5e-6)
    be = RefBackend(model)
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    assert await vdev.vp_modern_get_status() == c.VIRTIO_CONFIG_S_NEEDS_RESET   # power-on
    assert model.mgmt_read(c.MGMT_BUSY) == 1
    await be.sleep(5e-6)
    assert await vdev.vp_modern_get_status() == 0
    assert model.mgmt_read(c.MGMT_BUSY) == 0
    await vdev.vp_modern_set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    await vdev.vp_modern_set_status(0)
    assert await vdev.vp_modern_get_status() == c.VIRTIO_CONFIG_S_ACKNOWLEDGE
    assert model.mgmt_read(c.MGMT_DEVICE_STATUS) == c.VIRTIO_CONFIG_S_ACKNOWLEDGE
    await vdev.vp_modern_set_status(c.VIRTIO_CONFIG_S_DRIVER)       # ignored
    await vdev.common.iowrite(c.VIRTIO_PCI_COMMON_MSIX, 0, 2)        # ignored
    await be.sleep(5e-6)
    assert await vdev.vp_modern_get_status() == 0
    assert await vdev.common.ioread(c.VIRTIO_PCI_COMMON_MSIX, 2) == c.VIRTIO_MSI_NO_VECTOR
    await vdev.vp_modern_reset(timeout=20e-6)       # the driver's wait works against it
    with pytest.raises(DeviceTimeout):
        await VirtioPciModernDevice(RefBackend(MemballoonRef(reset_time=1.0))).init()


@asynctest
async def test_reset_clears_device_state_but_not_host_state():
    """C9: queues, pending minimum and bitmap (extra range back to host-owned) clear;
    management counters, budget and the extra range survive."""
    dev = await live(wanted=ALL_FEATURES)
    model = dev.model
    model.set_extra_range(100, 2)
    model.set_return_budget(7)
    assert (await command(dev, cmd(GIVE, PAGE, 2 * PAGE)))[0] == 0
    assert (await command(dev, cmd(GET, 100 * PAGE), 8))[1] == (1).to_bytes(8, "little")
    model.set_min_balloon(1 << 20)              # held: the ring has no fromdevq buffer
    assert model.min_pending == 1 << 20 and model.balloon_pages == 1
    counters = dict(model.counters)
    await dev.vdev.vp_modern_reset()
    assert model.bitmap == {100, 101} and model.balloon_pages == 0
    assert model.min_pending is None
    assert all(q.last_avail == q.used_idx == 0 and not q.enable for q in model.queues)
    assert model.counters == counters and model.return_budget == 6
    assert model.extra_range == (100, 2)


@asynctest
async def test_queue_configuration_registers():
    be = RefBackend()
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    await vdev.vp_modern_reset()
    max_size = be.model.params.max_queue_size
    assert await vdev.vp_modern_get_queue_size(1) == max_size
    for bad in (0, 3, 2 * max_size):
        await vdev.vp_modern_set_queue_size(1, bad)
        assert await vdev.vp_modern_get_queue_size(1) == max_size
    await vdev.vp_modern_set_queue_size(1, 8)
    await vdev.vp_modern_queue_address(1, 0x1_2345_6780, 0x2000, 0x3000)
    cfg = vdev.common
    assert await cfg.ioread(c.VIRTIO_PCI_COMMON_Q_DESCHI, 4) == 1
    assert await cfg.ioread(c.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == 0x2345_6780
    await cfg.iowrite(c.VIRTIO_PCI_COMMON_Q_USEDLO, 0x4_0000_5000, 8)      # one 8-byte write
    assert await cfg.ioread(c.VIRTIO_PCI_COMMON_Q_USEDLO, 8) == 0x4_0000_5000
    assert await vdev.vp_modern_queue_vector(1, 2) == 2
    assert await vdev.vp_modern_queue_vector(1, be.model.params.msix_vectors) == \
        c.VIRTIO_MSI_NO_VECTOR
    await vdev.vp_modern_set_queue_enable(1, False)                 # 0 is ignored
    assert not await vdev.vp_modern_get_queue_enable(1)
    await vdev.vp_modern_set_queue_enable(1, True)
    await vdev.vp_modern_set_queue_size(1, 4)                       # frozen while enabled
    await vdev.vp_modern_queue_address(1, 0, 0, 0)
    await vdev.vp_modern_set_queue_enable(1, False)
    assert await vdev.vp_modern_get_queue_size(1) == 8
    assert await vdev.vp_modern_get_queue_enable(1)
    assert await cfg.ioread(c.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == 0x2345_6780
    assert await vdev.vp_modern_get_queue_notify_off(1) == 1
    assert await cfg.ioread(c.VIRTIO_PCI_COMMON_Q_NDATA, 4) == 0   # NDATA and RESET read 0
    await cfg.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, c.NUM_QUEUES, 2)   # no such queue
    assert await cfg.ioread(c.VIRTIO_PCI_COMMON_Q_SIZE, 4) == 0
    assert await cfg.ioread(c.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == 0
    assert await vdev.vp_modern_generation() == 0
    assert await vdev.vp_modern_get_num_queues() == c.NUM_QUEUES
    assert await be.bar_read(0, c.VIRTIO_PCI_COMMON_CFG_SIZE, 4) == 0   # past the structure


# --- C11: ISR and MSI-X ----------------------------------------------------------------------

async def msix_device():
    """Probed and reset, MSI-X programmed (vectors 0..2), config vector 0."""
    be = RefBackend()
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    await vdev.vp_modern_reset()
    await be.alloc_irq_vectors(3)
    assert await vdev.vp_modern_config_vector(0) == 0
    return be, vdev


@asynctest
async def test_msix_vector_masks_and_pba():
    be, vdev = await msix_device()
    model = be.model
    table = model.params.bar.msix_table
    pba = model.params.bar.msix_pba
    ctrl = table + c.PCI_MSIX_ENTRY_VECTOR_CTRL
    await be.bar_write(0, ctrl, c.PCI_MSIX_ENTRY_CTRL_MASKBIT, 4)          # mask vector 0
    assert await be.bar_read(0, ctrl, 4) == c.PCI_MSIX_ENTRY_CTRL_MASKBIT
    model.request_reset()
    model.request_reset()                   # two events before delivery: one message
    assert be.irq_count(0) == 0 and await be.bar_read(0, pba, 8) == 1
    await be.bar_write(0, ctrl, 0, 4)
    assert be.irq_count(0) == 1 and await be.bar_read(0, pba, 8) == 0
    assert be.messages[-1] == (MSI_ADDRESS, 0)
    assert await be.bar_read(0, table + c.PCI_MSIX_ENTRY_LOWER_ADDR, 8) == MSI_ADDRESS
    # The function mask holds messages in the PBA too.
    flags = MSIX_CAP_POS + c.PCI_MSIX_FLAGS
    control = await be.config_read(flags, 2)
    await be.config_write(flags, control | c.PCI_MSIX_FLAGS_MASKALL, 2)
    model.request_reset()
    assert be.irq_count(0) == 1 and await be.bar_read(0, pba, 4) == 1
    await be.config_write(flags, control, 2)
    assert be.irq_count(0) == 2
    assert model.counters["MGMT_MSIX_SENT"] == 2
    assert await vdev.vp_modern_isr() == c.VIRTIO_PCI_ISR_CONFIG
    assert await vdev.vp_modern_isr() == 0


@asynctest
async def test_msix_bus_master_disabled_and_no_vector():
    be, vdev = await msix_device()
    model = be.model
    await be.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY, 2)      # BME clear
    model.request_reset()
    assert be.irq_count(0) == 0
    await be.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER, 2)
    assert be.irq_count(0) == 1
    assert await vdev.vp_modern_config_vector(c.VIRTIO_MSI_NO_VECTOR) == c.VIRTIO_MSI_NO_VECTOR
    await vdev.vp_modern_isr()
    model.request_reset()
    assert be.irq_count(0) == 1                                       # NO_VECTOR honoured
    assert await vdev.vp_modern_isr() == c.VIRTIO_PCI_ISR_CONFIG       # the ISR still says so
    # MSI-X disabled: the event goes to INTx; the message is dropped, not held.
    flags = MSIX_CAP_POS + c.PCI_MSIX_FLAGS
    await be.config_write(flags, 0, 2)
    await vdev.vp_modern_config_vector(0)
    model.request_reset()
    assert model.intx_asserted and be.intx_messages == [True]
    await be.config_write(flags, c.PCI_MSIX_FLAGS_ENABLE, 2)
    assert be.irq_count(0) == 1 and be.intx_messages == [True, False]
    assert await be.bar_read(0, model.params.bar.msix_pba, 4) == 0


# --- C11: INTx with MSI-X disabled ----------------------------------------------------------

async def intx_device():
    """Probed and reset, MSI-X never enabled (the driver's INTx fallback)."""
    be = RefBackend()
    vdev = VirtioPciModernDevice(be)
    await vdev.vp_modern_probe()
    await vdev.vp_modern_reset()
    return be, vdev


async def interrupt_status(be):
    return bool(await be.config_read(c.PCI_STATUS, 2) & c.PCI_STATUS_INTERRUPT)


@asynctest
async def test_intx_follows_the_isr_byte():
    """virtio 1.2 4.1.4.5: without MSI-X a set ISR bit asserts INTA (Assert_INTA) and
    sets the Status register's Interrupt Status bit; the driver's ISR read deasserts it
    (Deassert_INTA) and clears the bit; so does a reset."""
    be, vdev = await intx_device()
    model = be.model
    assert not await interrupt_status(be) and be.intx_messages == []
    model.request_reset()
    assert model.intx_asserted and await interrupt_status(be)
    assert be.intx_messages == [True]
    model.request_reset()                               # still one level, no new message
    assert be.intx_messages == [True]
    assert await vdev.vp_modern_isr() == c.VIRTIO_PCI_ISR_CONFIG
    assert not model.intx_asserted and not await interrupt_status(be)
    assert be.intx_messages == [True, False]
    model.request_reset()
    await vdev.vp_modern_reset()
    assert be.intx_messages == [True, False, True, False] and not await interrupt_status(be)


@asynctest
async def test_intx_interrupt_disable():
    """PCI: with Interrupt Disable set INTA stays deasserted while the ISR byte is set,
    the Interrupt Status bit still shows it; clearing Interrupt Disable asserts INTA,
    setting it again deasserts it."""
    be, vdev = await intx_device()
    model = be.model
    command = await be.config_read(c.PCI_COMMAND, 2)
    disabled = command | c.PCI_COMMAND_INTX_DISABLE
    await be.config_write(c.PCI_COMMAND, disabled, 2)
    model.request_reset()
    assert not model.intx_asserted and be.intx_messages == []
    assert await interrupt_status(be)
    await be.config_write(c.PCI_COMMAND, command, 2)
    assert model.intx_asserted and be.intx_messages == [True]
    await be.config_write(c.PCI_COMMAND, disabled, 2)
    assert be.intx_messages == [True, False] and await interrupt_status(be)
    assert await vdev.vp_modern_isr() == c.VIRTIO_PCI_ISR_CONFIG
    assert not await interrupt_status(be)
    await be.config_write(c.PCI_COMMAND, command, 2)
    assert be.intx_messages == [True, False]


@asynctest
async def test_no_intx_while_msix_is_enabled():
    """With MSI-X enabled the event is a message, never INTx, and no Interrupt Status."""
    be, vdev = await msix_device()
    model = be.model
    model.request_reset()
    assert be.irq_count(0) == 1
    assert not model.intx_asserted and be.intx_messages == []
    assert not await interrupt_status(be)
    dev = await live(model=model)
    assert await command(dev, cmd(GIVE, PAGE)) == (0, b"")
    assert dev.be.irq_count(2) == 1 and be.intx_messages == []


@asynctest
async def test_driver_falls_back_to_intx():
    """vp_find_vqs without MSI-X vectors (``pci=nomsi``): the driver requests INTx, leaves
    every vector at NO_VECTOR, and its commands, a host minimum it waits for and a host
    reset request all come through vp_interrupt's ISR read."""
    be = RefBackend()
    be.nomsi = True
    model = be.model
    command_reg = await be.config_read(c.PCI_COMMAND, 2)
    await be.config_write(c.PCI_COMMAND, command_reg | c.PCI_COMMAND_INTX_DISABLE, 2)
    vb = VirtioMemballoon(be)
    await vb.virtballoon_probe(page_size=PAGE)
    vdev = vb.vdev
    assert vdev.intx_enabled and not model.msix_enabled
    assert not await be.config_read(c.PCI_COMMAND, 2) & c.PCI_COMMAND_INTX_DISABLE
    assert model.config_vector == c.VIRTIO_MSI_NO_VECTOR
    assert [q.vector for q in model.queues] == [c.VIRTIO_MSI_NO_VECTOR] * c.NUM_QUEUES
    await vb.give_pages([PAGE, 2 * PAGE])
    assert model.intx_asserted                          # the used buffer's interrupt
    assert await vdev.vp_interrupt() == c.VIRTIO_PCI_ISR_QUEUE
    assert not model.intx_asserted
    # The driver waits on INTx for a minimum the host sets later.
    be.schedule(2e-6, lambda: model.set_min_balloon(3 * PAGE))
    assert await vb.wait_for_host(1e-3) == [3 * PAGE]
    assert be.intx_messages[-2:] == [True, False]
    # A host reset request: the ISR's configuration bit, DEVICE_NEEDS_RESET, a reset.
    be.schedule(1e-6, model.request_reset)
    await vdev.vp_wait_interrupt(None, 1e-3)
    assert vdev.config_changes() == 1 and not model.intx_asserted
    with pytest.raises(DeviceNeedsReset):
        await vb.give_pages([3 * PAGE])
    await vb.reset()
    assert vb.vdev.intx_enabled
    await vb.give_pages([4 * PAGE])
    assert model.bitmap == {4} and be.messages == []


@asynctest
async def test_msix_failed_message_stays_pending():
    be, vdev = await msix_device()
    model = be.model
    model.msix_sink = lambda address, data: False
    model.request_reset()
    assert model.counters["MGMT_MSIX_FAILED"] == 1
    assert model.mgmt_read(c.MGMT_MSIX_FAILED) == 1
    assert await be.bar_read(0, model.params.bar.msix_pba, 4) == 1
    model.msix_sink = be._msix_message
    await be.bar_write(0, model.params.bar.msix_table + c.PCI_MSIX_ENTRY_VECTOR_CTRL, 0, 4)
    assert be.irq_count(0) == 1 and model.counters["MGMT_MSIX_SENT"] == 1


@asynctest
async def test_flr_resets_pci_state_and_device():
    dev = await live()
    model = dev.model
    await command(dev, cmd(GIVE, PAGE))
    model.flr()
    assert not model.bus_master and not model.msix_enabled
    assert model.bitmap == set() and model.device_status == c.VIRTIO_CONFIG_S_DRIVER_OK | \
        c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
    ctrl = model.params.bar.msix_table + c.PCI_MSIX_ENTRY_VECTOR_CTRL
    assert model.bar_read(0, ctrl, 4) == c.PCI_MSIX_ENTRY_CTRL_MASKBIT
    assert model.bar_read(0, model.params.bar.msix_table, 4) == MSI_ADDRESS   # table RAM kept


# --- C10: management registers ---------------------------------------------------------------

@asynctest
async def test_management_registers():
    dev = await live(bitmap_pages=100)
    model = dev.model
    assert model.mgmt_read(c.MGMT_ID) == c.MGMT_ID_VALUE
    assert model.mgmt_read(c.MGMT_VERSION) == c.MGMT_VERSION_VALUE
    assert model.mgmt_read(c.MGMT_BITMAP_PAGES) == 100
    assert model.mgmt_read(c.MGMT_PAGE_SHIFT) == 12
    assert model.mgmt_read(0xFFC) == 0                      # unassigned
    model.mgmt_write(c.MGMT_ID, 5)                          # read-only
    assert model.mgmt_read(c.MGMT_ID) == c.MGMT_ID_VALUE
    assert model.mgmt_read(c.MGMT_RETURN_BUDGET) == c.MGMT_UNLIMITED_BUDGET
    model.set_window_base(0x1000_0000)                      # ignored while DRIVER_OK
    assert model.mgmt_read(c.MGMT_WINDOW_BASE_LO) == 0
    await command(dev, cmd(GIVE, 0, 33 * PAGE, 99 * PAGE))
    assert [model.bitmap_word(i) for i in range(4)] == [1, 2, 0, 1 << 3]
    assert model.mgmt_read(c.MGMT_BITMAP_INDEX) == 3
    assert model.bitmap_bytes() == (1 | 1 << 33 | 1 << 99).to_bytes(13, "little")
    assert model.mgmt_read(c.MGMT_BALLOON_PAGES) == 3
    await command(dev, cmd(GET, 0, 33 * PAGE, 99 * PAGE), 8)
    model.set_extra_range(10, 1)
    model.set_min_balloon(-PAGE)
    assert model.mgmt_read(c.MGMT_MIN_BALLOON_HI) == 0xFFFFFFFF
    # Commit order: LO alone does not send; HI commits.
    model.mgmt_write(c.MGMT_MIN_BALLOON_LO, 5)
    assert model.min_pending == -PAGE
    for name in COUNTER_NAMES:
        assert model.mgmt_read(getattr(c, name)) == model.counters[name]
    assert model.counters["MGMT_NOTIFY_COUNT_Q1"] == 2


@asynctest
async def test_balloon_pages_register_is_signed_and_window_base_applies():
    model = MemballoonRef(bitmap_pages=64)
    model.set_window_base(0x8000_1234)              # rounded down to the page size
    model.set_extra_range(0, 3)
    dev = await live(model, wanted=ALL_FEATURES)
    assert model.window_base == 0x8000_1000
    n, result = await command(dev, cmd(GET, 0x8000_1000, 0x8000_2000), 8)
    assert int.from_bytes(result, "little") == 2
    assert model.balloon_pages == -2
    assert model.mgmt_read(c.MGMT_BALLOON_PAGES) == 0xFFFF_FFFE
    await command(dev, cmd(GIVE, 0x8000_0000, 0x8000_1000 + 64 * PAGE, 0x8000_3000))
    assert nonzero({k: v for k, v in model.counters.items() if "VIOLATION" in k}) == \
        {"MGMT_VIOLATION_OUT_OF_WINDOW": 2, "MGMT_VIOLATION_DOUBLE_GIVE": 1}


# --- C12: DMA discipline ---------------------------------------------------------------------

@asynctest
async def test_no_dma_before_driver_ok_or_without_bus_master():
    # Everything but DRIVER_OK, then a buffer and a doorbell: the device touches nothing.
    dev = await live(driver_ok=False)
    model, be = dev.model, dev.be
    await dev.todevq.virtqueue_add_outbuf([cmd(GIVE, PAGE)], "give")
    await dev.todevq.virtqueue_notify()
    assert model.memory.dma_log == [] and model.bitmap == set()
    await be.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY, 2)
    await dev.vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_DRIVER_OK)
    assert model.driver_ok and model.memory.dma_log == [] and be.irq_count(2) == 0
    # Bus Master Enable: the remembered doorbell is served now.
    await be.config_write(c.PCI_COMMAND, c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER, 2)
    assert model.bitmap == {1} and await dev.todevq.virtqueue_get_buf() == ("give", 0)
    assert be.irq_count(2) == 1


@asynctest
async def test_device_writes_only_used_rings_and_writable_buffers():
    dev = await live()
    model = dev.model
    model.memory.dma_log.clear()
    result = bytearray(8)
    await send(dev.todevq, [(cmd(GIVE, PAGE), False)])
    await send(dev.todevq, [(cmd(GET, PAGE)[:5], False), (cmd(GET, PAGE)[5:], False),
                            (result, True)], indirect=True)
    todevq = model.queues[c.TODEVQ]
    used = (todevq.device, todevq.device + vring_avail_event_offset(todevq.size) + 2)
    writes = [(addr, n) for kind, addr, n in model.memory.dma_log if kind == "w"]
    outside = [(addr, n) for addr, n in writes if not used[0] <= addr < used[1]]
    assert len(outside) == 1 and outside[0][1] == 8         # the GET's result only
    assert result == (1).to_bytes(8, "little")


# --- C5: commands ----------------------------------------------------------------------------

@pytest.mark.parametrize("readable, writable, reason", [
    (b"", 8, Malformed.LENGTH),
    (cmd(GIVE, PAGE)[:12], 0, Malformed.LENGTH),
    (cmd(3, PAGE), 0, Malformed.UNKNOWN),
    (cmd(GIVE), 0, Malformed.EMPTY),
    (cmd(GET), 8, Malformed.EMPTY),
    (cmd(EXCHANGE), 0, Malformed.EMPTY),
    (cmd(EXCHANGE, PAGE, 2 * PAGE, 3 * PAGE), 0, Malformed.ODD_EXCHANGE),
    (cmd(GET, PAGE), 0, Malformed.WRITABLE),
    (cmd(GET, PAGE), 7, Malformed.WRITABLE),
    (cmd(GET, PAGE), 16, Malformed.WRITABLE),
    (cmd(GIVE, 2 * PAGE), 8, Malformed.WRITABLE),
    (cmd(EXCHANGE, PAGE, 2 * PAGE), 1, Malformed.WRITABLE),
])
@asynctest
async def test_malformed_commands(readable, writable, reason):
    """C5: a malformed command changes nothing, completes with used.len 0 and is counted."""
    dev = await live()
    model = dev.model
    await command(dev, cmd(GIVE, PAGE))
    sgs = ([(readable, False)] if readable else []) + \
        ([(bytearray(b"\xAA" * writable), True)] if writable else [])
    token, length = await send(dev.todevq, sgs)
    assert length == 0
    assert all(seg == b"\xAA" * len(seg) for seg, w in sgs if w)     # nothing written
    assert model.bitmap == {1} and model.balloon_pages == 1
    assert model.counters["MGMT_CMD_MALFORMED"] == 1 and model.malformed == {reason: 1}
    assert nonzero(model.counters).keys() == {"MGMT_NOTIFY_COUNT_Q1", "MGMT_MSIX_SENT",
                                              "MGMT_CMD_GIVE", "MGMT_PAGES_ENTERED",
                                              "MGMT_CMD_MALFORMED"}


@asynctest
async def test_give_counts_each_violation_by_kind():
    dev = await live(bitmap_pages=16)
    model = dev.model
    addrs = [PAGE, PAGE + 8, 16 * PAGE, PAGE, 17 * PAGE + 1, 2 * PAGE]
    assert await command(dev, cmd(GIVE, *addrs)) == (0, b"")
    assert model.bitmap == {1, 2} and model.balloon_pages == 2
    assert nonzero(model.counters) == {
        "MGMT_NOTIFY_COUNT_Q1": 1, "MGMT_MSIX_SENT": 1,
        "MGMT_CMD_GIVE": 1, "MGMT_PAGES_ENTERED": 2, "MGMT_VIOLATION_MISALIGNED": 2,
        "MGMT_VIOLATION_OUT_OF_WINDOW": 1, "MGMT_VIOLATION_DOUBLE_GIVE": 1}


@asynctest
async def test_get_grants_a_prefix():
    """C5: pages in order until the first that cannot be granted; the count goes into the
    8 writable bytes (split 3 + 5 here) and used.len is 8."""
    dev = await live(bitmap_pages=16)
    model = dev.model
    await command(dev, cmd(GIVE, PAGE, 2 * PAGE, 3 * PAGE, 5 * PAGE))
    first, second = bytearray(3), bytearray(5)
    got = await send(dev.todevq, [(cmd(GET, 2 * PAGE, PAGE, 4 * PAGE, 3 * PAGE), False),
                                  (first, True), (second, True)])
    assert got[1] == 8 and first + second == (2).to_bytes(8, "little")
    assert model.bitmap == {3, 5} and model.balloon_pages == 2
    assert model.get_grants == [(4, 2)] and model.counters["MGMT_GET_SHORT"] == 1
    # An invalid address stops the GET and is counted; nothing after it is looked at.
    assert (await command(dev, cmd(GET, 3 * PAGE, 5 * PAGE + 1, 5 * PAGE), 8))[1] == \
        (1).to_bytes(8, "little")
    assert model.counters["MGMT_VIOLATION_MISALIGNED"] == 1 and model.bitmap == {5}
    assert (await command(dev, cmd(GET, 5 * PAGE), 8))[1] == (1).to_bytes(8, "little")
    assert model.counters["MGMT_GET_SHORT"] == 2 and model.counters["MGMT_CMD_GET"] == 3


@asynctest
async def test_return_budget_limits_get_but_not_exchange():
    dev = await live(bitmap_pages=16)
    model = dev.model
    await command(dev, cmd(GIVE, *(PAGE * i for i in range(1, 9))))
    model.set_return_budget(2)
    assert (await command(dev, cmd(GET, PAGE, 2 * PAGE, 3 * PAGE), 8))[1][0] == 2
    assert model.mgmt_read(c.MGMT_RETURN_BUDGET) == 0
    assert (await command(dev, cmd(GET, 3 * PAGE), 8))[1][0] == 0
    await command(dev, cmd(EXCHANGE, 3 * PAGE, 4 * PAGE, 10 * PAGE, 11 * PAGE))
    assert model.bitmap == {5, 6, 7, 8, 10, 11} and model.return_budget == 0
    model.set_return_budget(c.MGMT_UNLIMITED_BUDGET)
    assert (await command(dev, cmd(GET, 5 * PAGE, 6 * PAGE), 8))[1][0] == 2
    assert model.return_budget == c.MGMT_UNLIMITED_BUDGET


@asynctest
async def test_exchange_order_and_violations():
    """C5: wanted pages leave first, in order, then the others enter; invalid addresses
    are skipped and counted; a page may be exchanged for itself."""
    dev = await live(bitmap_pages=16)
    model = dev.model
    await command(dev, cmd(GIVE, PAGE, 2 * PAGE))
    await command(dev, cmd(EXCHANGE, PAGE, 9 * PAGE, 3, 2 * PAGE, PAGE, 99 * PAGE))
    assert model.bitmap == {1, 2} and model.balloon_pages == 2
    assert model.counters["MGMT_VIOLATION_NOT_IN_BALLOON"] == 1
    assert model.counters["MGMT_VIOLATION_MISALIGNED"] == 1
    assert model.counters["MGMT_VIOLATION_OUT_OF_WINDOW"] == 1
    assert model.counters["MGMT_VIOLATION_DOUBLE_GIVE"] == 1     # 2 * PAGE entered again
    assert model.counters["MGMT_PAGES_LEFT"] == 1 and model.counters["MGMT_PAGES_ENTERED"] == 3


@pytest.mark.parametrize("extra_mem", [True, False])
@asynctest
async def test_extra_memory_range(extra_mem):
    """C8: extra pages start host-owned without counting; with EXTRA_MEM a GET takes
    balloon_pages below zero, without it they are never granted."""
    model = MemballoonRef(bitmap_pages=64)
    model.set_extra_range(60, 10)                    # clipped to the window
    wanted = ALL_FEATURES if extra_mem else ALL_FEATURES & ~(1 << c.VIRTIO_MEMBALLOON_F_EXTRA_MEM)
    dev = await live(model, wanted=wanted)
    assert model.bitmap == {60, 61, 62, 63} and model.balloon_pages == 0
    granted = (await command(dev, cmd(GET, 60 * PAGE, 61 * PAGE), 8))[1][0]
    await command(dev, cmd(EXCHANGE, 62 * PAGE, PAGE))
    await command(dev, cmd(GIVE, 63 * PAGE))
    assert model.counters["MGMT_VIOLATION_DOUBLE_GIVE"] == 1
    if extra_mem:
        assert granted == 2 and model.bitmap == {1, 63} and model.balloon_pages == -2
    else:
        assert granted == 0 and model.bitmap == {1, 60, 61, 62, 63}
        assert model.balloon_pages == 1
        assert model.counters["MGMT_VIOLATION_NOT_IN_BALLOON"] == 1
    model.set_extra_range(0, 2)                      # new range set, old bits left as they are
    assert {0, 1}.issubset(model.bitmap) and 63 in model.bitmap
    await dev.vdev.vp_modern_reset()
    assert model.bitmap == {0, 1}


@pytest.mark.parametrize("page_size", [2 << 20, 1 << 30])
@asynctest
async def test_large_page_sizes(page_size):
    dev = await live(page_size=page_size, bitmap_pages=8)
    model = dev.model
    await command(dev, cmd(GIVE, page_size, page_size + PAGE, 8 * page_size))
    assert model.bitmap == {1} and model.page_size == page_size
    assert model.counters["MGMT_VIOLATION_MISALIGNED"] == 1
    assert model.counters["MGMT_VIOLATION_OUT_OF_WINDOW"] == 1
    assert model.balloon_addresses() == {page_size}


# --- C6: fromdevq ----------------------------------------------------------------------------

async def post_fromdevq(dev, *sgs_list):
    for sgs in sgs_list:
        await dev.fromdevq.virtqueue_add_sgs(sgs, sgs)
    await dev.fromdevq.virtqueue_kick()


@pytest.mark.parametrize("extra_mem, value, sent", [
    (True, -5 * PAGE, -5 * PAGE), (False, -5 * PAGE, 0), (False, 3 * PAGE, 3 * PAGE)])
@asynctest
async def test_min_balloon_message(extra_mem, value, sent):
    wanted = ALL_FEATURES if extra_mem else ALL_FEATURES & ~(1 << c.VIRTIO_MEMBALLOON_F_EXTRA_MEM)
    dev = await live(wanted=wanted)
    head, tail = bytearray(5), bytearray(11)          # 16 bytes split anywhere
    await post_fromdevq(dev, [(head, True), (tail, True)])
    dev.model.set_min_balloon(value)
    token, length = await dev.fromdevq.virtqueue_get_buf()
    assert length == 16
    assert struct.unpack("<Qq", head + tail) == (c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON, sent)
    assert dev.model.min_messages == [sent] and dev.be.irq_count(1) == 1
    assert dev.model.counters["MGMT_MIN_SENT"] == 1


@asynctest
async def test_min_balloon_holds_newest_and_drops_older():
    """C6: without a buffer the device holds the newest value; older unsent ones drop."""
    dev = await live()
    model = dev.model
    for value in (PAGE, 2 * PAGE, 3 * PAGE):
        model.set_min_balloon(value)
    assert model.counters["MGMT_MIN_DROPPED"] == 2 and model.min_messages == []
    buf = bytearray(16)
    await post_fromdevq(dev, [(buf, True)])
    assert model.min_messages == [3 * PAGE] and model.min_pending is None
    assert (await dev.fromdevq.virtqueue_get_buf())[1] == 16
    # Buffers posted ahead are held, oldest first, one per value.
    first, second = bytearray(16), bytearray(24)
    await dev.fromdevq.virtqueue_add_inbuf([first], "first")
    await dev.fromdevq.virtqueue_add_inbuf([second], "second")
    await dev.fromdevq.virtqueue_kick()
    model.set_min_balloon(4 * PAGE)
    model.set_min_balloon(5 * PAGE)
    assert model.counters["MGMT_MIN_DROPPED"] == 2
    assert await dev.fromdevq.virtqueue_get_buf() == ("first", 16)
    assert await dev.fromdevq.virtqueue_get_buf() == ("second", 16)
    assert struct.unpack("<Qq", first)[1] == 4 * PAGE
    assert struct.unpack("<Qq", second[:16])[1] == 5 * PAGE


@asynctest
async def test_malformed_fromdevq_buffers():
    """C6: readable bytes or fewer than 16 writable bytes: used with len 0 and counted at
    once, also behind held good buffers; the good ones get the minimums in ring order."""
    dev = await live()
    model = dev.model
    await post_fromdevq(dev, [(b"x", False), (bytearray(16), True)], [(bytearray(15), True)],
                        [(bytearray(8), True), (bytearray(8), True)], [(bytearray(4), True)],
                        [(bytearray(16), True)], [(bytearray(0), True), (b"y" * 9, False)])
    assert model.counters["MGMT_FROMDEVQ_MALFORMED"] == 4
    assert [length for _, length in model.used[c.FROMDEVQ]] == [0, 0, 0, 0]
    q = model.queues[c.FROMDEVQ]
    assert len(q.held) == 2
    model.set_min_balloon(PAGE)
    got = [await dev.fromdevq.virtqueue_get_buf() for _ in range(5)]
    assert [length for _, length in got] == [0, 0, 0, 0, 16]
    assert got[4][0][0][0] == bytearray(struct.pack("<Q", c.VIRTIO_MEMBALLOON_HCMD_MIN_BALLOON))
    assert len(q.held) == 1                             # the last good one, for the next
    model.set_min_balloon(2 * PAGE)
    assert (await dev.fromdevq.virtqueue_get_buf())[1] == 16 and not q.held
    assert model.counters["MGMT_FROMDEVQ_MALFORMED"] == 4
    assert model.min_messages == [PAGE, 2 * PAGE]


@pytest.mark.parametrize("change", ["malformed", "broken"])
@asynctest
async def test_a_held_buffer_is_walked_again_for_its_minimum(change):
    """A held buffer's chain is walked again when a minimum is due: one the driver made
    malformed meanwhile is used with len 0 and counted, the minimum going to the next held
    one; one it broke (a next index past the queue) is a C7 fault."""
    dev = await live()
    model, vq = dev.model, dev.fromdevq
    first = await vq.map_raw(bytes(16))
    [slot] = await vq.add_raw_chain([VringDesc(first, 16, c.VRING_DESC_F_WRITE)], "first")
    second = bytearray(16)
    await vq.virtqueue_add_inbuf([second], "second")
    await vq.virtqueue_kick()
    held = model.queues[c.FROMDEVQ].held
    assert len(held) == 2 and held[0] == slot
    if change == "malformed":
        desc = VringDesc(first, 8, c.VRING_DESC_F_WRITE)
    else:
        desc = VringDesc(first, 16, c.VRING_DESC_F_WRITE | c.VRING_DESC_F_NEXT, vq.num + 1)
    await vq.desc.write(c.VRING_DESC_SIZE * slot, desc.pack())
    model.set_min_balloon(3 * PAGE)
    if change == "malformed":
        assert await vq.virtqueue_get_buf() == ("first", 0)
        assert await vq.virtqueue_get_buf() == ("second", 16)
        assert struct.unpack("<Qq", second)[1] == 3 * PAGE
        assert model.counters["MGMT_FROMDEVQ_MALFORMED"] == 1 and model.faults == []
    else:
        assert model.faults == [(c.FROMDEVQ, F.DESC_INDEX)]
        assert await vq.virtqueue_get_buf() is None and model.min_messages == []


@asynctest
async def test_min_set_before_driver_ok_is_sent_later():
    dev = await live(driver_ok=False)
    model = dev.model
    buf = bytearray(16)
    await post_fromdevq(dev, [(buf, True)])
    model.set_min_balloon(7 * PAGE)
    assert model.min_messages == [] and model.memory.dma_log == []
    await dev.vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_DRIVER_OK)
    assert model.min_messages == [7 * PAGE]
    assert (await dev.fromdevq.virtqueue_get_buf())[1] == 16
    assert struct.unpack("<Qq", buf)[1] == 7 * PAGE


# --- C7: ring faults -------------------------------------------------------------------------

async def fault_desc_index_head(dev, vq):
    await vq.publish_avail(vq.num + 3)


async def fault_desc_index_next(dev, vq):
    buf = await vq.map_raw(cmd(GIVE, PAGE))
    await vq.add_raw_chain([VringDesc(buf, 16, c.VRING_DESC_F_NEXT, vq.num + 1)], "t")


async def fault_chain_loop(dev, vq):
    buf = await vq.map_raw(cmd(GIVE, PAGE))
    await vq.add_raw_chain([VringDesc(buf, 8, c.VRING_DESC_F_NEXT, 1),
                            VringDesc(buf + 8, 8, c.VRING_DESC_F_NEXT, 0)], "t")


async def indirect_table(vq, descs, length=None):
    table = await vq.map_raw(b"".join(d.pack() for d in descs))
    await vq.add_raw_chain([VringDesc(table, 16 * len(descs) if length is None else length,
                                      c.VRING_DESC_F_INDIRECT)], "t")


async def fault_nested_indirect(dev, vq):
    inner = await vq.map_raw(VringDesc(0, 16).pack())
    await indirect_table(vq, [VringDesc(inner, 16, c.VRING_DESC_F_INDIRECT)])


async def fault_indirect_length_zero(dev, vq):
    await indirect_table(vq, [VringDesc(0, 16)], length=0)


async def fault_indirect_length_odd(dev, vq):
    await indirect_table(vq, [VringDesc(0, 16), VringDesc(0, 16)], length=24)


async def fault_indirect_next_out_of_table(dev, vq):
    buf = await vq.map_raw(cmd(GIVE, PAGE))
    await indirect_table(vq, [VringDesc(buf, 16, c.VRING_DESC_F_NEXT, 2), VringDesc(buf, 1)])


async def fault_indirect_loop(dev, vq):
    buf = await vq.map_raw(cmd(GIVE, PAGE))
    await indirect_table(vq, [VringDesc(buf, 8, c.VRING_DESC_F_NEXT, 1),
                              VringDesc(buf + 8, 8, c.VRING_DESC_F_NEXT, 0)])


async def fault_avail_ahead(dev, vq):
    # "before" is outstanding: the device is one behind the shadow, so this is size + 1.
    await vq.write_avail_idx(vq.avail_idx_shadow + vq.num)


async def fault_buffer_read(dev, vq):
    await vq.add_raw_chain([VringDesc(0x10, 16)], "t")          # no host memory there


async def fault_avail_ring_read(dev, vq):
    slot = vq.avail_idx_shadow % vq.num
    await vq.virtqueue_add_outbuf([cmd(GIVE, PAGE)], "t")
    q = dev.model.queues[vq.index]
    dev.model.memory.inject_fault(q.driver + VRING_AVAIL_RING + 2 * slot, 2, write=False)


async def fault_avail_idx_read(dev, vq):
    q = dev.model.queues[vq.index]
    dev.model.memory.inject_fault(q.driver + VRING_AVAIL_IDX, 2, write=False)


async def fault_result_write(dev, vq):
    data = await vq.map_raw(cmd(GET, 9 * PAGE))
    await vq.add_raw_chain([VringDesc(data, 16, c.VRING_DESC_F_NEXT, 1),
                            VringDesc(0x20, 8, c.VRING_DESC_F_WRITE)], "t")


async def fault_used_write(dev, vq):
    slot = vq.avail_idx_shadow % vq.num         # used in order: the same slot
    await vq.virtqueue_add_outbuf([cmd(GIVE, 8 * PAGE)], "t")
    q = dev.model.queues[vq.index]
    dev.model.memory.inject_fault(q.device + VRING_USED_RING + 8 * slot, 8, read=False)


FAULTS = [
    (fault_desc_index_head, F.DESC_INDEX), (fault_desc_index_next, F.DESC_INDEX),
    (fault_chain_loop, F.CHAIN_LOOP), (fault_nested_indirect, F.NESTED_INDIRECT),
    (fault_indirect_length_zero, F.INDIRECT_LENGTH), (fault_indirect_length_odd, F.INDIRECT_LENGTH),
    (fault_indirect_next_out_of_table, F.DESC_INDEX), (fault_indirect_loop, F.CHAIN_LOOP),
    (fault_avail_ahead, F.AVAIL_AHEAD), (fault_buffer_read, F.DMA_READ),
    (fault_avail_ring_read, F.DMA_READ), (fault_avail_idx_read, F.DMA_READ),
    (fault_result_write, F.DMA_WRITE),
    (fault_used_write, F.DMA_WRITE),
]


@pytest.mark.parametrize("inject, kind", FAULTS, ids=[f.__name__[6:] for f, _ in FAULTS])
@asynctest
async def test_ring_fault_stops_the_queue(inject, kind):
    """C7: the queue stops, DEVICE_NEEDS_RESET, configuration interrupt; the balloon keeps
    its pages and the other queue keeps working."""
    dev = await live(queue_size=8, bitmap_pages=64)
    model = dev.model
    await command(dev, cmd(GIVE, PAGE, 7 * PAGE))
    done = await dev.todevq.virtqueue_add_outbuf([cmd(GIVE, 2 * PAGE)], "before")
    assert done is None
    await inject(dev, dev.todevq)
    await dev.todevq.virtqueue_notify()
    assert model.faults == [(c.TODEVQ, kind)]
    assert model.fault_info == c.TODEVQ << 8 | kind.value
    assert model.mgmt_read(c.MGMT_FAULT_INFO) == c.TODEVQ << 8 | kind.value
    assert model.counters["MGMT_RING_FAULTS"] == 1
    assert await dev.vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert dev.be.irq_count(0) == 1 and await dev.vdev.vp_modern_isr() & c.VIRTIO_PCI_ISR_CONFIG
    assert {1, 7}.issubset(model.bitmap)            # nothing in the balloon is lost
    # A buffer before the fault in the same drain was completed and published, unless
    # the fault came before any buffer was looked at.
    if inject in (fault_avail_ahead, fault_avail_idx_read):
        assert await dev.todevq.virtqueue_get_buf() is None and 2 not in model.bitmap
    else:
        assert await dev.todevq.virtqueue_get_buf() == ("before", 0) and 2 in model.bitmap
        assert dev.be.irq_count(2) == 2
    # The queue stays stopped: a later doorbell does nothing.
    used = len(model.used[c.TODEVQ])
    await dev.todevq.virtqueue_add_outbuf([cmd(GIVE, 3 * PAGE)], "after")
    await dev.todevq.virtqueue_notify()
    assert len(model.used[c.TODEVQ]) == used and 3 not in model.bitmap
    # fromdevq still works.
    await post_fromdevq(dev, [(bytearray(16), True)])
    model.set_min_balloon(PAGE)
    assert model.min_messages == [PAGE]


@asynctest
async def test_chain_length_limits():
    """C7 boundaries: a chain of exactly queue-size descriptors and an indirect table
    longer than the queue are fine; a loop faults when it would follow descriptor size + 1
    (after reading size descriptors)."""
    dev = await live(queue_size=4)
    model = dev.model
    data = cmd(GIVE, PAGE, 2 * PAGE)
    assert (await send(dev.todevq, [(p, False) for p in sg_split(data, [6, 12, 18])],
                       indirect=False))[1] == 0
    data = cmd(GIVE, *(PAGE * i for i in range(3, 10)))
    assert (await send(dev.todevq, [(p, False) for p in sg_split(data, range(8, 64, 8))],
                       indirect=True))[1] == 0
    assert model.bitmap == set(range(1, 10)) and model.faults == []
    q = model.queues[c.TODEVQ]
    model.memory.dma_log.clear()
    buf = await dev.todevq.map_raw(cmd(GIVE, PAGE))
    await dev.todevq.add_raw_chain([VringDesc(buf, 8, c.VRING_DESC_F_NEXT, 1),
                                    VringDesc(buf + 8, 8, c.VRING_DESC_F_NEXT, 0)], "loop")
    await dev.todevq.virtqueue_notify()
    assert model.faults == [(c.TODEVQ, F.CHAIN_LOOP)]
    reads = [addr for kind, addr, _ in model.memory.dma_log
             if kind == "r" and q.desc <= addr < q.desc + c.VRING_DESC_SIZE * q.size]
    assert len(reads) == q.size


@asynctest
async def test_fromdevq_fault_leaves_todevq_working():
    dev = await live()
    await dev.fromdevq.publish_avail(dev.fromdevq.num)
    await dev.fromdevq.virtqueue_notify()
    assert dev.model.faults == [(c.FROMDEVQ, F.DESC_INDEX)]
    assert await command(dev, cmd(GIVE, PAGE)) == (0, b"")
    assert dev.model.bitmap == {1}


# --- C11: notification rules and draining ----------------------------------------------------

@asynctest
async def test_doorbell_drains_every_buffer_and_spurious_ones_are_harmless():
    dev = await live(queue_size=16)
    model = dev.model
    for i in range(10):
        await dev.todevq.virtqueue_add_outbuf([cmd(GIVE, (i + 1) * PAGE)], i)
    await dev.todevq.virtqueue_notify()
    assert len(model.used[c.TODEVQ]) == 10 and len(model.bitmap) == 10
    assert dev.be.irq_count(2) == 1                 # one interrupt for the batch
    for _ in range(3):
        await dev.todevq.virtqueue_notify()
    assert len(model.used[c.TODEVQ]) == 10 and dev.be.irq_count(2) == 1
    assert [(await dev.todevq.virtqueue_get_buf())[0] for _ in range(10)] == list(range(10))


@pytest.mark.parametrize("event_idx", [True, False])
@asynctest
async def test_used_notification_suppression(event_idx):
    """C11: NO_INTERRUPT without EVENT_IDX, used_event with it."""
    wanted = ALL_FEATURES if event_idx else ALL_FEATURES & ~(1 << c.VIRTIO_F_RING_EVENT_IDX)
    dev = await live(wanted=wanted)
    vq = dev.todevq
    await vq.virtqueue_disable_cb()
    await command(dev, cmd(GIVE, PAGE))
    assert dev.be.irq_count(2) == 0 and dev.model.isr == 0
    assert await vq.virtqueue_enable_cb()
    await command(dev, cmd(GIVE, 2 * PAGE))
    assert dev.be.irq_count(2) == 1
    q = dev.model.queues[c.TODEVQ]
    avail_event = await vq.used.read16(vring_avail_event_offset(vq.num))
    assert avail_event == (q.last_avail if event_idx else 0)
