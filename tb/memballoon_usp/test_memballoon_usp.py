"""cocotb tests of ``memballoon_usp`` over cocotbext-pcie's root complex and UltraScale+
model, driven by the driver model through the simulation backend.

Every test runs with idle and backpressure inserters on every AXI stream (tb/harness.py)
and ends by checking the hard IP model's error flags. The pytest function at the bottom
builds the DUT per data width: the full list at 512 bits, ``SMOKE_TESTS`` at 256 bits
(``TB_FULL=1`` runs everything at both widths).
"""

import os

import cocotb
import pytest

from memballoon.constants import (PCI_CLASS_REVISION, PCI_DEVICE_ID, PCI_HEADER_TYPE,
                                  PCI_SUBSYSTEM_ID, PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID)
from memballoon import constants as c
from memballoon.params import DeviceParams
from memballoon.lspci import format_dump, parse_lspci, read_config_space, run_lspci
from memballoon.tb.cfg_ext import CfgExtTimeout
from memballoon.tb.harness import MemballoonTb
from memballoon.tb.intx import ASSERT_INTA, DEASSERT_INTA
from memballoon.tb.runner import params_from_env, run_cocotb
from memballoon.tb.scenarios import cmd
from memballoon.virtio_memballoon import DeviceNeedsReset, VirtioMemballoon
from memballoon.virtio_pci_modern import FeaturesNotAccepted, VirtioPciModernDevice

from cocotbext.pcie.core.caps import PciCapId
from cocotbext.pcie.core.tlp import CplStatus, TlpType

#: Long enough for an MSI-X message to cross the model many times over (simulated s).
IRQ_TIMEOUT = 10e-6
#: How long "no interrupt" is watched for.
QUIET_TIME = 3e-6
TEST_TIMEOUT_US = 2000


async def setup(dut):
    """Harness up, bus enumerated, driver probed (C2)."""
    tb = MemballoonTb(dut, params_from_env())
    await tb.init()
    backend = await tb.enumerate()
    vdev = VirtioPciModernDevice(backend)
    await vdev.vp_modern_probe()
    return tb, backend, vdev


async def finish(tb):
    """End of every test: no error flagged by the model, no MSI-X message refused by the
    hard IP (C10 counter), and the simulation speed in the log."""
    tb.check_errors()
    assert await tb.mgmt_read(c.MGMT_MSIX_FAILED) == 0, "hard IP refused MSI-X messages"
    cycles, wall, rate = tb.clock_rate()
    tb.log.info("%d user_clk cycles in %.2f s: %.0f cycles/s", cycles, wall, rate)


def bits(*numbers):
    return sum(1 << n for n in numbers)


async def msix_table_write(backend, params, vector, field, value):
    """Write a table dword and read it back: the read flushes the posted write (PCIe
    ordering), as Linux's msix_mask_irq does, and checks the entry kept the value."""
    offset = params.bar.msix_table + vector * c.PCI_MSIX_ENTRY_SIZE + field
    await backend.bar_write(0, offset, value, 4)
    assert await backend.bar_read(0, offset, 4) == value


async def msix_pending(backend, params, vector):
    pba = await backend.bar_read(0, params.bar.msix_pba + vector // 32 * 4, 4)
    return pba >> (vector % 32) & 1


async def msix_function_mask(backend, pos, masked):
    ctrl = await backend.config_read(pos + c.PCI_MSIX_FLAGS, 2)
    ctrl = ctrl | c.PCI_MSIX_FLAGS_MASKALL if masked else ctrl & ~c.PCI_MSIX_FLAGS_MASKALL
    await backend.config_write(pos + c.PCI_MSIX_FLAGS, ctrl, 2)


async def request_config_change(tb):
    """The host asks for a reset (C10): DEVICE_NEEDS_RESET and a config interrupt."""
    await tb.mgmt_write(c.MGMT_CONTROL, c.MGMT_CONTROL_REQUEST_RESET)


async def assert_no_irq(backend, vector):
    before = backend.irq_count(vector)
    await backend.sleep(QUIET_TIME)
    assert backend.irq_count(vector) == before, f"unexpected MSI-X message on vector {vector}"


# --- C1, C2: identity and capabilities ---------------------------------------------------

@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def enumeration_identity(dut):
    """C1: IDs, revision, class, subsystem, header; BAR0 64-bit non-prefetchable of the
    configured size; capability list = hard IP's, then the four virtio caps (C2)."""
    tb, be, vdev = await setup(dut)
    params = tb.params
    assert tb.pci_dev.vendor_id == c.PCI_VENDOR_ID_REDHAT_QUMRANET
    assert await be.config_read(PCI_VENDOR_ID, 2) == c.PCI_VENDOR_ID_REDHAT_QUMRANET
    assert await be.config_read(PCI_DEVICE_ID, 2) == c.MEMBALLOON_PCI_DEVICE_ID == 0x104D
    class_rev = await be.config_read(PCI_CLASS_REVISION, 4)
    assert class_rev & 0xFF >= 1 and class_rev & 0xFF == c.MEMBALLOON_PCI_REVISION_ID
    assert class_rev >> 8 == c.PCI_CLASS_MEMORY_OTHER
    assert await be.config_read(PCI_HEADER_TYPE, 1) == 0
    assert await be.config_read(PCI_SUBSYSTEM_VENDOR_ID, 2) == \
        c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID
    assert await be.config_read(PCI_SUBSYSTEM_ID, 2) >= 0x40
    assert vdev.id_device == c.VIRTIO_ID_MEMORY_BALLOON

    bar0 = await be.config_read(c.PCI_BASE_ADDRESS_0, 4)
    assert bar0 & 0xF == c.PCI_BASE_ADDRESS_MEM_TYPE_64, f"BAR0 flags {bar0 & 0xF:#x}"
    assert not bar0 & c.PCI_BASE_ADDRESS_MEM_PREFETCH
    assert be.bar_size(0) == params.bar.size
    assert all(be.bar_size(n) == 0 for n in range(2, 6))

    caps = await vdev.capabilities()
    hard = [cid for cid, pos in caps if pos < params.cfg_ext_base]
    assert hard == [PciCapId.PM, PciCapId.MSIX, PciCapId.EXP], caps
    last_hard = [pos for cid, pos in caps if pos < params.cfg_ext_base][-1]
    assert last_hard == tb.cfg_ext.linked_capability.offset * 4
    assert await be.config_read(last_hard + 1, 1) == params.cfg_ext_base
    virtio = [(cid, pos) for cid, pos in caps if pos >= params.cfg_ext_base]
    assert virtio[0][1] == params.cfg_ext_base
    assert all(cid == c.PCI_CAP_ID_VNDR for cid, _ in virtio)
    assert all(pos + 4 <= params.cfg_ext_base + params.cfg_ext_size for _, pos in virtio)
    types = [cap.cfg_type for cap in await vdev.virtio_caps()]
    assert types == [c.VIRTIO_PCI_CAP_COMMON_CFG, c.VIRTIO_PCI_CAP_NOTIFY_CFG,
                     c.VIRTIO_PCI_CAP_ISR_CFG, c.VIRTIO_PCI_CAP_PCI_CFG]   # no DEVICE_CFG
    assert tb.cfg_ext.reads > 0
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def lspci_decode(dut):
    """C2: Debian's ``lspci -F -vvv`` decodes the dumped configuration space: four virtio
    capabilities with BAR/offset/length matching the BAR layout, the MSI-X capability with
    table and PBA in BAR0, BAR0 64-bit non-prefetchable."""
    tb, be, vdev = await setup(dut)
    params, bar = tb.params, tb.params.bar
    config = await read_config_space(be)
    text = run_lspci(format_dump(config), "-nn")
    tb.log.info("lspci -vvv -nn:\n%s", text)
    dev = parse_lspci(text)

    ids = f"[{c.PCI_VENDOR_ID_REDHAT_QUMRANET:04x}:{c.MEMBALLOON_PCI_DEVICE_ID:04x}]"
    assert ids in dev.description, dev.description
    assert f"[{c.PCI_CLASS_MEMORY_OTHER >> 8:04x}]" in dev.description, dev.description
    assert dev.revision == c.MEMBALLOON_PCI_REVISION_ID
    subsystem = f"[{c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID:04x}:{c.MEMBALLOON_PCI_SUBSYSTEM_ID:04x}]"
    assert subsystem in dev.attributes["Subsystem"], dev.attributes
    assert "64-bit, non-prefetchable" in dev.regions[0]    # the size is not in a dump

    vendor = [cap for cap in dev.capabilities if cap.virtio_type]
    assert [cap.pos for cap in vendor] == [pos for cid, pos in await vdev.capabilities()
                                          if cid == c.PCI_CAP_ID_VNDR]
    # pciutils 3.9 names types 1..4 only; PCI_CFG prints as "<unknown>".
    assert [cap.virtio_type for cap in vendor] == ["CommonCfg", "Notify", "ISR", "<unknown>"]
    common, notify, isr, pci_cfg = (cap.virtio() for cap in vendor)
    assert (common["bar"], common["offset"]) == (0, bar.common_cfg)
    assert common["size"] >= c.VIRTIO_PCI_COMMON_Q_NDATA     # sizeof(virtio_pci_common_cfg)
    assert (notify["bar"], notify["offset"]) == (0, bar.notify)
    assert notify["multiplier"] == bar.notify_off_multiplier
    assert notify["size"] >= (c.NUM_QUEUES - 1) * bar.notify_off_multiplier + 2
    assert (isr["bar"], isr["offset"]) == (0, bar.isr) and isr["size"] >= 1
    assert pci_cfg["bar"] == 0
    for cap, mapped in ((common, vdev.common), (isr, vdev.isr)):
        assert (cap["offset"], min(cap["size"], mapped.length)) == \
            (mapped.offset, mapped.length)
    for struct_ in (common, notify, isr):
        assert struct_["offset"] + struct_["size"] <= bar.size

    (msix,) = dev.find(lambda cap: cap.title.startswith("MSI-X"))
    assert msix.msix() == {"enable": False, "count": params.msix_vectors, "masked": False,
                           "table_bar": 0, "table_offset": bar.msix_table,
                           "pba_bar": 0, "pba_offset": bar.msix_pba}
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def cfg_ext_window(dut):
    """C2: the virtio capability bytes are read-only, the PCI_CFG fields bar/offset/length
    are writable; a cfg_ext read the RTL does not answer (a register outside its window)
    raises the harness's timeout error, and the window keeps working afterwards."""
    tb, be, vdev = await setup(dut)
    for cap in await vdev.virtio_caps():
        before = [await be.config_read(cap.pos + off, 4) for off in range(0, cap.cap_len, 4)]
        for off in range(0, cap.cap_len, 4):
            if cap.cfg_type == c.VIRTIO_PCI_CAP_PCI_CFG and off >= c.VIRTIO_PCI_CAP_BAR:
                continue                    # writable fields, checked below
            await be.config_write(cap.pos + off, 0xFFFFFFFF, 4)
        after = [await be.config_read(cap.pos + off, 4) for off in range(0, cap.cap_len, 4)]
        if cap.cfg_type != c.VIRTIO_PCI_CAP_PCI_CFG:
            assert after == before, f"capability at {cap.pos:#x} changed by writes"
        else:
            assert after[:1] == before[:1], "PCI_CFG header changed by a write"
    pos = vdev.pci_cfg.pos
    for off, width, value in ((c.VIRTIO_PCI_CAP_BAR, 1, 0), (c.VIRTIO_PCI_CAP_OFFSET, 4, 0x14),
                              (c.VIRTIO_PCI_CAP_LENGTH, 4, 4)):
        await be.config_write(pos + off, value, width)
        assert await be.config_read(pos + off, width) == value

    assert tb.cfg_ext.writes > 0
    outside = tb.params.cfg_ext_base // 4 - 1
    try:
        await tb.cfg_ext.read(outside)
    except CfgExtTimeout as exc:
        tb.log.info("as expected: %s", exc)
    else:
        raise AssertionError(f"cfg_ext read of register {outside:#x} outside the window "
                             "was answered")
    assert await be.config_read(tb.params.cfg_ext_base, 1) == c.PCI_CAP_ID_VNDR
    await finish(tb)


# --- C4 negotiation -------------------------------------------------------------------------

async def try_features(vdev, features):
    """Reset, ACKNOWLEDGE, DRIVER, write ``features``, set FEATURES_OK: did it stay?"""
    await vdev.vp_modern_reset()
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_DRIVER)
    try:
        await vdev.vp_finalize_features(features)
    except FeaturesNotAccepted:
        return False
    return True


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def negotiation_matrix(dut):
    """C4: FEATURES_OK stays set only for a subset of the offered set with VERSION_1 and
    exactly one page size; a refused set keeps the device unusable until reset."""
    tb, be, vdev = await setup(dut)
    params = tb.params
    offered = await vdev.vp_modern_get_features()
    assert offered == params.offered_features                          # C3
    base = offered & ~c.PAGE_SIZE_FEATURE_MASK
    page = [bits(b) for b in params.page_size_bits]
    unoffered = next(b for b in range(c.VIRTIO_MEMBALLOON_F_PAGE_LAST + 1, 64)
                     if not offered >> b & 1)
    unoffered_page = next(b for b in c.PAGE_SIZE_FEATURE_BITS if not offered >> b & 1)

    cases = {
        "no page size": (base, False),
        "two page sizes": (base | page[0] | page[1], False),
        "no VERSION_1": (base & ~bits(c.VIRTIO_F_VERSION_1) | page[0], False),
        f"unoffered bit {unoffered}": (base | page[0] | bits(unoffered), False),
        "unoffered ring feature": (base | page[0] | bits(c.VIRTIO_F_RING_PACKED), False),
        "one unoffered page size": (base | bits(unoffered_page), False),
        "only VERSION_1 and a page size": (bits(c.VIRTIO_F_VERSION_1) | page[-1], True),
        **{f"all with page {c.FEATURE_NAMES[b]}": (base | bits(b), True)
           for b in params.page_size_bits},
    }
    for name, (features, expect) in cases.items():
        kept = await try_features(vdev, features)
        assert kept == expect, f"{name}: features {features:#x}: FEATURES_OK kept={kept}"
        if kept:
            assert await vdev.vp_modern_get_driver_features() == features, name
            assert await tb.mgmt_read(c.MGMT_DRIVER_FEATURES_LO) == features & 0xFFFFFFFF
            assert await tb.mgmt_read(c.MGMT_DRIVER_FEATURES_HI) == features >> 32
            # Fixed until reset (C4): a later write does not change the accepted set.
            await vdev.vp_modern_set_features(base)
            assert await vdev.vp_modern_get_driver_features() == features, name
        else:
            # Unusable until reset: even a valid set does not get FEATURES_OK now.
            await vdev.vp_modern_set_features(base | page[0])
            await vdev.vp_modern_add_status(c.VIRTIO_CONFIG_S_FEATURES_OK)
            assert not await vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK, name
    await finish(tb)


# --- C9 reset, common configuration --------------------------------------------------------

COMMON_FIELDS = [
    # (offset, width, name)
    (c.VIRTIO_PCI_COMMON_DFSELECT, 4, "device_feature_select"),
    (c.VIRTIO_PCI_COMMON_DF, 4, "device_feature"),
    (c.VIRTIO_PCI_COMMON_GFSELECT, 4, "driver_feature_select"),
    (c.VIRTIO_PCI_COMMON_GF, 4, "driver_feature"),
    (c.VIRTIO_PCI_COMMON_MSIX, 2, "config_msix_vector"),
    (c.VIRTIO_PCI_COMMON_NUMQ, 2, "num_queues"),
    (c.VIRTIO_PCI_COMMON_STATUS, 1, "device_status"),
    (c.VIRTIO_PCI_COMMON_CFGGENERATION, 1, "config_generation"),
    (c.VIRTIO_PCI_COMMON_Q_SELECT, 2, "queue_select"),
    (c.VIRTIO_PCI_COMMON_Q_SIZE, 2, "queue_size"),
    (c.VIRTIO_PCI_COMMON_Q_MSIX, 2, "queue_msix_vector"),
    (c.VIRTIO_PCI_COMMON_Q_ENABLE, 2, "queue_enable"),
    (c.VIRTIO_PCI_COMMON_Q_NOFF, 2, "queue_notify_off"),
    (c.VIRTIO_PCI_COMMON_Q_DESCLO, 4, "queue_desc_lo"),
    (c.VIRTIO_PCI_COMMON_Q_DESCHI, 4, "queue_desc_hi"),
    (c.VIRTIO_PCI_COMMON_Q_AVAILLO, 4, "queue_driver_lo"),
    (c.VIRTIO_PCI_COMMON_Q_AVAILHI, 4, "queue_driver_hi"),
    (c.VIRTIO_PCI_COMMON_Q_USEDLO, 4, "queue_device_lo"),
    (c.VIRTIO_PCI_COMMON_Q_USEDHI, 4, "queue_device_hi"),
    (c.VIRTIO_PCI_COMMON_Q_NDATA, 2, "queue_notify_data"),
    (c.VIRTIO_PCI_COMMON_Q_RESET, 2, "queue_reset"),
]


def common_reset_values(params, queue):
    """What every field reads after reset with ``queue_select`` = ``queue`` (virtio 1.2
    4.1.4.3, C2, C3, C11). Selects are 0 after reset; feature words follow them. For a
    queue that does not exist virtio defines only ``queue_size`` = 0."""
    values = {
        "device_feature_select": 0,
        "device_feature": params.offered_features & 0xFFFFFFFF,
        "driver_feature_select": 0,
        "driver_feature": 0,
        "config_msix_vector": c.VIRTIO_MSI_NO_VECTOR,
        "num_queues": c.NUM_QUEUES,
        "device_status": 0,
        "config_generation": 0,
        "queue_select": queue,
        "queue_size": 0,
    }
    if queue < c.NUM_QUEUES:
        values.update({
            "queue_size": params.max_queue_size,
            "queue_msix_vector": c.VIRTIO_MSI_NO_VECTOR,
            "queue_enable": 0,
            "queue_notify_off": queue,
            "queue_desc_lo": 0, "queue_desc_hi": 0,
            "queue_driver_lo": 0, "queue_driver_hi": 0,
            "queue_device_lo": 0, "queue_device_hi": 0,
            "queue_notify_data": 0,     # NOTIF_CONFIG_DATA not offered
            "queue_reset": 0,           # RING_RESET not offered
        })
    return values


async def read_common(vdev, queue):
    """Every field with ``queue_select`` = ``queue``, each read at its natural width."""
    await vdev.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, queue, 2)
    return {name: await vdev.common.ioread(off, width) for off, width, name in COMMON_FIELDS}


async def check_common_reset_values(params, vdev, where):
    for queue in range(c.NUM_QUEUES + 1):
        got = await read_common(vdev, queue)
        want = common_reset_values(params, queue)
        diff = {k: (hex(got[k]), hex(want[k])) for k in want if got[k] != want[k]}
        assert not diff, f"{where}, queue_select {queue}: (got, expected) {diff}"
    await vdev.common.iowrite(c.VIRTIO_PCI_COMMON_Q_SELECT, 0, 2)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def common_cfg_registers(dut):
    """virtio 1.2 4.1.4.3: every field's value after power-on; feature words per select;
    read-only fields ignore writes; unmapped vectors read back NO_VECTOR (C11)."""
    tb, be, vdev = await setup(dut)
    params = tb.params
    await vdev.vp_modern_reset()
    await check_common_reset_values(params, vdev, "after power-on")

    cfg = vdev.common
    for select, word in ((0, params.offered_features & 0xFFFFFFFF),
                         (1, params.offered_features >> 32), (2, 0), (0xFFFFFFFF, 0)):
        await cfg.iowrite(c.VIRTIO_PCI_COMMON_DFSELECT, select, 4)
        assert await cfg.ioread(c.VIRTIO_PCI_COMMON_DFSELECT, 4) == select
        assert await cfg.ioread(c.VIRTIO_PCI_COMMON_DF, 4) == word, f"select {select}"
    await cfg.iowrite(c.VIRTIO_PCI_COMMON_DF, 0, 4)                   # read-only
    await cfg.iowrite(c.VIRTIO_PCI_COMMON_DFSELECT, 0, 4)
    assert await cfg.ioread(c.VIRTIO_PCI_COMMON_DF, 4) == params.offered_features & 0xFFFFFFFF
    await cfg.iowrite(c.VIRTIO_PCI_COMMON_NUMQ, 7, 2)                 # read-only
    assert await vdev.vp_modern_get_num_queues() == c.NUM_QUEUES
    await cfg.iowrite(c.VIRTIO_PCI_COMMON_Q_NOFF, 7, 2)              # read-only
    assert await vdev.vp_modern_get_queue_notify_off(1) == 1

    assert await vdev.vp_modern_config_vector(params.msix_vectors - 1) == \
        params.msix_vectors - 1
    assert await vdev.vp_modern_config_vector(params.msix_vectors) == c.VIRTIO_MSI_NO_VECTOR
    assert await vdev.vp_modern_queue_vector(0, params.msix_vectors) == c.VIRTIO_MSI_NO_VECTOR
    assert await vdev.vp_modern_queue_vector(1, 2) == 2
    assert await vdev.vp_modern_generation() == 0
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def reset_handshake(dut):
    """C9: with both queues live, writing 0 to device_status brings every register back to
    its reset value; status reads non-zero until then and 0 after (the driver waits)."""
    tb, be, vdev = await setup(dut)
    params = tb.params
    await vdev.init(queue_size=16)
    status = await vdev.vp_modern_get_status()
    assert status & c.VIRTIO_CONFIG_S_DRIVER_OK
    assert await tb.mgmt_read(c.MGMT_DEVICE_STATUS) == status
    for q in range(c.NUM_QUEUES):
        assert await vdev.vp_modern_get_queue_enable(q)

    await vdev.vp_modern_set_status(0)
    seen = []
    while (status := await vdev.vp_modern_get_status()) != 0:
        seen.append(status)
        assert len(seen) < 100, "device_status never returned to 0 (C9)"
    tb.log.info("device_status while resetting: %s", [hex(s) for s in seen])
    await check_common_reset_values(params, vdev, "after reset with queues live")
    assert await tb.mgmt_read(c.MGMT_DEVICE_STATUS) == 0
    assert await tb.mgmt_read(c.MGMT_DRIVER_FEATURES_LO) == 0
    assert await tb.mgmt_read(c.MGMT_DRIVER_FEATURES_HI) == 0

    # The device is usable again after the reset.
    await vdev.init(queue_size=16)
    assert await vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_DRIVER_OK
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def queue_setup(dut):
    """Both queues (C2): size, ring addresses, vectors (config 0, queue i -> i + 1) and
    enable read back as the driver wrote them; DRIVER_OK visible to the host (C10)."""
    tb, be, vdev = await setup(dut)
    params = tb.params
    queues = await vdev.init()
    assert len(queues) == c.NUM_QUEUES
    assert await vdev.common.ioread(c.VIRTIO_PCI_COMMON_MSIX, 2) == 0
    for q in queues:
        assert q.num == params.max_queue_size
        got = await read_common(vdev, q.index)
        assert got["queue_size"] == q.num
        assert got["queue_msix_vector"] == q.index + 1
        assert got["queue_enable"] == 1
        assert got["queue_notify_off"] * vdev.notify_offset_multiplier == \
            q.notify.offset - params.bar.notify
        for field, addr in (("desc", q.desc_addr), ("driver", q.avail_addr),
                            ("device", q.used_addr)):
            assert got[f"queue_{field}_hi"] << 32 | got[f"queue_{field}_lo"] == addr, field
        # Live queue: size and addresses no longer change (virtio 1.2 4.1.4.3.2).
        await vdev.vp_modern_set_queue_size(q.index, q.num // 2)
        assert await vdev.vp_modern_get_queue_size(q.index) == q.num
    status = await vdev.vp_modern_get_status()
    assert status == (c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER |
                      c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)
    assert await tb.mgmt_read(c.MGMT_DEVICE_STATUS) == status
    accepted = vdev.accepted_features
    assert await tb.mgmt_read(c.MGMT_DRIVER_FEATURES_LO) == accepted & 0xFFFFFFFF
    assert await tb.mgmt_read(c.MGMT_DRIVER_FEATURES_HI) == accepted >> 32
    await finish(tb)


# --- C11 interrupts -----------------------------------------------------------------------

@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def msix_config_interrupt(dut):
    """C10/C11: a host reset request sets DEVICE_NEEDS_RESET and delivers the configuration
    vector through the hard IP model; ISR shows the config bit and read clears it."""
    tb, be, vdev = await setup(dut)
    await vdev.init()
    sent = await tb.mgmt_read(c.MGMT_MSIX_SENT)
    await request_config_change(tb)
    await be.wait_irq(0, IRQ_TIMEOUT)
    assert [be.irq_count(v) for v in range(tb.params.msix_vectors)] == \
        [1] + [0] * (tb.params.msix_vectors - 1)
    assert await vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert await tb.mgmt_read(c.MGMT_DEVICE_STATUS) & c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert await tb.mgmt_read(c.MGMT_MSIX_SENT) == sent + 1
    assert await tb.mgmt_read(c.MGMT_MSIX_FAILED) == 0
    assert await vdev.vp_modern_isr() == c.VIRTIO_PCI_ISR_CONFIG
    assert await vdev.vp_modern_isr() == 0
    await assert_no_irq(be, 0)
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def msix_masking(dut):
    """C11: with the function mask, then the vector's mask bit, then Bus Master Enable
    clear (C12), a message is held: PBA pending set, nothing sent (the model would fail the
    test on a memory write without bus mastering); lifting it delivers the message and
    clears the pending bit."""
    tb, be, vdev = await setup(dut)
    params = tb.params
    await vdev.init()
    msix_pos = await vdev.find_capability(c.PCI_CAP_ID_MSIX)
    vector = 0

    async def masked_then_delivered(mask, unmask, what):
        await mask()
        await request_config_change(tb)
        await assert_no_irq(be, vector)
        assert await msix_pending(be, params, vector) == 1, f"{what}: PBA bit not set"
        await unmask()
        await be.wait_irq(vector, IRQ_TIMEOUT)
        assert await msix_pending(be, params, vector) == 0, f"{what}: PBA bit still set"
        await assert_no_irq(be, vector)

    await masked_then_delivered(lambda: msix_function_mask(be, msix_pos, True),
                                lambda: msix_function_mask(be, msix_pos, False),
                                "function mask")
    ctrl = c.PCI_MSIX_ENTRY_VECTOR_CTRL
    await masked_then_delivered(
        lambda: msix_table_write(be, params, vector, ctrl, c.PCI_MSIX_ENTRY_CTRL_MASKBIT),
        lambda: msix_table_write(be, params, vector, ctrl, 0),
        "vector mask")
    await masked_then_delivered(tb.pci_dev.clear_master, tb.pci_dev.set_master,
                                "bus master enable")
    assert be.irq_count(vector) == 3
    assert await tb.mgmt_read(c.MGMT_MSIX_SENT) == 3
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def msix_table_and_pba(dut):
    """PCIe MSI-X table: after power-on every vector is masked and nothing is pending;
    address and data words are read/write at dword and qword width; the PBA ignores
    writes."""
    tb, be, vdev = await setup(dut)
    params, bar = tb.params, tb.params.bar
    for v in range(params.msix_vectors):
        entry = bar.msix_table + v * c.PCI_MSIX_ENTRY_SIZE
        ctrl = await be.bar_read(0, entry + c.PCI_MSIX_ENTRY_VECTOR_CTRL, 4)
        assert ctrl & c.PCI_MSIX_ENTRY_CTRL_MASKBIT, f"vector {v} not masked after reset"
        assert await msix_pending(be, params, v) == 0
        # One 8-byte write (a single two-dword TLP), then dword reads.
        addr = 0xFEE0_0000_0000_1000 | v << 4
        await be.bar_write(0, entry + c.PCI_MSIX_ENTRY_LOWER_ADDR, addr, 8)
        await be.bar_write(0, entry + c.PCI_MSIX_ENTRY_DATA, 0x4000 + v, 4)
        assert await be.bar_read(0, entry + c.PCI_MSIX_ENTRY_LOWER_ADDR, 4) == addr & 0xFFFFFFFF
        assert await be.bar_read(0, entry + c.PCI_MSIX_ENTRY_UPPER_ADDR, 4) == addr >> 32
        assert await be.bar_read(0, entry + c.PCI_MSIX_ENTRY_LOWER_ADDR, 8) == addr
        assert await be.bar_read(0, entry + c.PCI_MSIX_ENTRY_DATA, 4) == 0x4000 + v
    await be.bar_write(0, bar.msix_pba, 0xFFFFFFFF, 4)
    assert await be.bar_read(0, bar.msix_pba, 8) == 0
    # Queue ring addresses as one qword write each: the upper dword lands too.
    await vdev.vp_modern_set_queue_size(0, 16)      # selects queue 0
    desc = 0x12_3456_7000
    await vdev.common.iowrite(c.VIRTIO_PCI_COMMON_Q_DESCLO, desc, 8)
    assert await vdev.common.ioread(c.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == desc & 0xFFFFFFFF
    assert await vdev.common.ioread(c.VIRTIO_PCI_COMMON_Q_DESCHI, 4) == desc >> 32
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def function_level_reset(dut):
    """C9: an FLR (cfg_flr_in_process) clears the device as a virtio reset does, and also
    the MSI-X table state (masks set, nothing pending); the device answers with
    cfg_flr_done and works again once the host restores its MSI-X entries."""
    tb, be, vdev = await setup(dut)
    params = tb.params
    await vdev.init(queue_size=16)
    # The read also flushes the posted DRIVER_OK write, as the host's configuration write
    # that starts the FLR would (PCIe ordering); the handshake here bypasses the link.
    assert await vdev.vp_modern_get_status() & c.VIRTIO_CONFIG_S_DRIVER_OK
    await tb.flr_handshake()
    assert await vdev.vp_modern_get_status() == 0
    await check_common_reset_values(params, vdev, "after FLR")
    for v in range(params.msix_vectors):
        ctrl = await be.bar_read(0, params.bar.msix_table + v * c.PCI_MSIX_ENTRY_SIZE +
                                 c.PCI_MSIX_ENTRY_VECTOR_CTRL, 4)
        assert ctrl & c.PCI_MSIX_ENTRY_CTRL_MASKBIT, f"vector {v} not masked after FLR"
    await tb.restore_msix_table()
    await vdev.init(queue_size=16)
    await request_config_change(tb)
    await be.wait_irq(0, IRQ_TIMEOUT)
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def msix_no_vector(dut):
    """C11: with msix_config = VIRTIO_MSI_NO_VECTOR no message is sent; the event is only
    visible in the ISR byte."""
    tb, be, vdev = await setup(dut)
    await vdev.init()
    assert await vdev.vp_modern_config_vector(c.VIRTIO_MSI_NO_VECTOR) == \
        c.VIRTIO_MSI_NO_VECTOR
    await request_config_change(tb)
    await assert_no_irq(be, 0)
    assert sum(be.irq_count(v) for v in range(tb.params.msix_vectors)) == 0
    assert await tb.mgmt_read(c.MGMT_MSIX_SENT) == 0
    assert await vdev.vp_modern_isr() == c.VIRTIO_PCI_ISR_CONFIG
    assert await vdev.vp_modern_isr() == 0
    await finish(tb)


# --- C11 INTx ----------------------------------------------------------------------------

PAGE = c.page_size_of_feature(c.VIRTIO_MEMBALLOON_F_4K)


async def intx_driver(tb, be):
    """The memballoon driver probed with no MSI-X vectors from the platform (``pci=nomsi``),
    so on INTx, and nothing pending on it."""
    be.nomsi = True
    vb = VirtioMemballoon(be)
    await vb.virtballoon_probe(page_size=PAGE, queue_size=16)
    assert vb.vdev.intx_enabled
    await be.sleep(QUIET_TIME)
    await vb.vdev.vp_interrupt()
    assert await tb.intx.wait_level(False, IRQ_TIMEOUT)
    return vb


async def interrupt_status(be):
    """The Status register's Interrupt Status bit."""
    return bool(await be.config_read(c.PCI_STATUS, 2) & c.PCI_STATUS_INTERRUPT)


def message_names(tb, since=0):
    return [name for name, _ in tb.intx.messages[since:]]


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def intx_fallback(dut):
    """C11: without MSI-X vectors the driver falls back to INTx (Interrupt Pin INTA, every
    vector NO_VECTOR, MSI-X disabled in its capability). A todevq command's used buffer
    asserts INTA (Assert_INTA, Interrupt Status set), the ISR read deasserts it
    (Deassert_INTA, Interrupt Status clear); a host reset request asserts it with the
    ISR's configuration bit and the driver resets the device; commands wait on INTx.
    Every edge of cfg_interrupt_int waited for cfg_interrupt_sent (harness check)."""
    tb, be, _ = await setup(dut)
    assert await be.config_read(c.PCI_INTERRUPT_PIN, 1) == c.PCI_INTERRUPT_PIN_INTA
    vb = await intx_driver(tb, be)
    vdev = vb.vdev
    assert await vdev.common.ioread(c.VIRTIO_PCI_COMMON_MSIX, 2) == c.VIRTIO_MSI_NO_VECTOR
    for q in vdev.queues:
        assert (await read_common(vdev, q.index))["queue_msix_vector"] == \
            c.VIRTIO_MSI_NO_VECTOR
    msix_pos = await vdev.find_capability(c.PCI_CAP_ID_MSIX)
    assert not await be.config_read(msix_pos + c.PCI_MSIX_FLAGS, 2) & c.PCI_MSIX_FLAGS_ENABLE
    assert not await interrupt_status(be)

    since = len(tb.intx.messages)
    await vb.todev_vq.virtqueue_add_outbuf([cmd(c.VIRTIO_MEMBALLOON_GCMD_GIVE_PAGES, PAGE)],
                                           "give")
    await vb.todev_vq.virtqueue_kick()
    assert await tb.intx.wait_level(True, IRQ_TIMEOUT), "no Assert_INTA for the used buffer"
    assert await interrupt_status(be)
    assert await vb.todev_vq.virtqueue_get_buf() == ("give", 0)
    assert await vdev.vp_interrupt() == c.VIRTIO_PCI_ISR_QUEUE
    assert await tb.intx.wait_level(False, IRQ_TIMEOUT), "no Deassert_INTA after the ISR read"
    assert not await interrupt_status(be)
    assert message_names(tb, since) == [ASSERT_INTA, DEASSERT_INTA]

    # The driver's own commands wait on INTx.
    await vb.give_pages([2 * PAGE, 3 * PAGE])
    assert await vb.get_pages([2 * PAGE]) == [2 * PAGE]

    await be.sleep(QUIET_TIME)
    await vdev.vp_interrupt()
    assert await tb.intx.wait_level(False, IRQ_TIMEOUT)
    since = len(tb.intx.messages)
    await request_config_change(tb)
    assert await tb.intx.wait_level(True, IRQ_TIMEOUT), "no Assert_INTA for the config change"
    assert await vdev.vp_interrupt() == c.VIRTIO_PCI_ISR_CONFIG
    assert await tb.intx.wait_level(False, IRQ_TIMEOUT)
    assert message_names(tb, since) == [ASSERT_INTA, DEASSERT_INTA]
    with pytest.raises(DeviceNeedsReset):
        await vb.give_pages([4 * PAGE])
    await vb.reset()
    await vb.give_pages([5 * PAGE])
    assert await tb.mgmt_read(c.MGMT_BALLOON_PAGES) == 1
    assert await tb.mgmt_read(c.MGMT_MSIX_SENT) == 0
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def intx_interrupt_disable(dut):
    """PCI: with Interrupt Disable set (command bit 10, cfg_function_status bit 3) the RTL
    keeps cfg_interrupt_int low while the ISR byte is set, and the Interrupt Status bit
    still shows the pending interrupt; clearing Interrupt Disable asserts INTA again,
    setting it while asserted deasserts it."""
    tb, be, _ = await setup(dut)
    vb = await intx_driver(tb, be)
    command = await be.config_read(c.PCI_COMMAND, 2)
    disabled = command | c.PCI_COMMAND_INTX_DISABLE
    await be.config_write(c.PCI_COMMAND, disabled, 2)
    since, edges = len(tb.intx.messages), tb.intx.edges
    await request_config_change(tb)
    for _ in range(100):
        if await interrupt_status(be):
            break
    else:
        raise AssertionError("Interrupt Status not set for the pending config change")
    await be.sleep(QUIET_TIME)
    assert not tb.intx.asserted and tb.intx.edges == edges, "INTA raised under Interrupt Disable"
    assert await interrupt_status(be)
    await be.config_write(c.PCI_COMMAND, command, 2)
    assert await tb.intx.wait_level(True, IRQ_TIMEOUT), "INTA not asserted after the enable"
    assert tb.intx.edges == edges + 1                  # the RTL raised it, not the model
    await be.config_write(c.PCI_COMMAND, disabled, 2)
    assert not tb.intx.asserted                         # the IP's Deassert_INTA
    await be.sleep(QUIET_TIME)
    assert tb.intx.edges == edges + 2                   # and the RTL dropped its request
    await be.config_write(c.PCI_COMMAND, command, 2)
    assert await tb.intx.wait_level(True, IRQ_TIMEOUT)
    assert await vb.vdev.vp_interrupt() == c.VIRTIO_PCI_ISR_CONFIG
    assert await tb.intx.wait_level(False, IRQ_TIMEOUT)
    assert message_names(tb, since) == [ASSERT_INTA, DEASSERT_INTA] * 2
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def intx_not_with_msix(dut):
    """C11: with MSI-X enabled used buffers and configuration changes are MSI-X messages;
    INTA is never asserted, cfg_interrupt_int never moves, no Interrupt Status."""
    tb, be, _ = await setup(dut)
    vb = VirtioMemballoon(be)
    await vb.virtballoon_probe(page_size=PAGE, queue_size=16)
    assert not vb.vdev.intx_enabled
    await vb.give_pages([PAGE, 2 * PAGE])
    await request_config_change(tb)
    await be.wait_irq(0, IRQ_TIMEOUT)
    assert not await interrupt_status(be)
    assert await vb.vdev.vp_modern_isr() != 0       # the ISR bits are set all the same
    assert tb.intx.edges == 0 and tb.intx.messages == []
    await finish(tb)


# --- C2 PCI_CFG window, ISR, notify ------------------------------------------------------

@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def pci_cfg_window(dut):
    """C2 / virtio 1.2 4.1.4.9: reads and writes through pci_cfg_data, 1, 2 and 4 bytes,
    equal direct BAR accesses; the ISR read side effect happens through it too."""
    tb, be, vdev = await setup(dut)
    params, bar = tb.params, tb.params.bar
    await vdev.init(queue_size=16)

    # Reads: every naturally aligned access of the common structure and a table entry.
    spans = [(bar.common_cfg, c.VIRTIO_PCI_COMMON_CFG_SIZE),
             (bar.msix_table, c.PCI_MSIX_ENTRY_SIZE)]
    for start, length in spans:
        for width in (1, 2, 4):
            for off in range(start, start + length, width):
                direct = await be.bar_read(0, off, width)
                window = await vdev.vp_pci_cfg_read(0, off, width)
                assert window == direct, f"read {off:#x}/{width}: window {window:#x}, " \
                                         f"BAR {direct:#x}"

    # Writes through the window, read back directly (and the other way round).
    cfg = bar.common_cfg
    writes = [(cfg + c.VIRTIO_PCI_COMMON_DFSELECT, 4, 1),
              (cfg + c.VIRTIO_PCI_COMMON_Q_SELECT, 2, 1),
              (cfg + c.VIRTIO_PCI_COMMON_MSIX, 2, params.msix_vectors - 1),
              (bar.msix_table + c.PCI_MSIX_ENTRY_DATA, 4, 0x1234),
              (bar.msix_table + c.PCI_MSIX_ENTRY_DATA, 1, 0x56)]
    for off, width, value in writes:
        before = await be.bar_read(0, off & ~3, 4)
        await vdev.vp_pci_cfg_write(0, off, value, width)
        shift = 8 * (off % 4)
        mask = ((1 << 8 * width) - 1) << shift
        expect = before & ~mask | value << shift
        assert await be.bar_read(0, off & ~3, 4) == expect, f"write {off:#x}/{width}"
        assert await vdev.vp_pci_cfg_read(0, off, width) == value

    # The msix_config written through the window routes the next config interrupt, and
    # the ISR read side effect happens through the window too.
    await request_config_change(tb)
    await be.wait_irq(params.msix_vectors - 1, IRQ_TIMEOUT)
    assert await vdev.vp_pci_cfg_read(0, bar.isr, 1) == c.VIRTIO_PCI_ISR_CONFIG
    assert await vdev.vp_modern_isr() == 0
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def isr_read_clear(dut):
    """virtio 1.2 4.1.4.5: the ISR byte shows the configuration-change bit and a read
    clears it; a second event sets it again; reset clears it."""
    tb, be, vdev = await setup(dut)
    await vdev.init()
    assert await vdev.vp_modern_isr() == 0
    for _ in range(2):
        await request_config_change(tb)
        await be.wait_irq(0, IRQ_TIMEOUT)
        assert await vdev.vp_modern_isr() == c.VIRTIO_PCI_ISR_CONFIG
        assert await vdev.vp_modern_isr() == 0
    await request_config_change(tb)
    await be.wait_irq(0, IRQ_TIMEOUT)
    await vdev.vp_modern_reset()
    assert await vdev.vp_modern_isr() == 0
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def notify_counted(dut):
    """C11: each doorbell write reaches the device: the host's per-queue counters (C10)
    count them, directly and through the PCI_CFG window."""
    tb, be, vdev = await setup(dut)
    queues = await vdev.init(queue_size=16)
    counts = {q: await tb.mgmt_read(reg) for q, reg in
              ((0, c.MGMT_NOTIFY_COUNT_Q0), (1, c.MGMT_NOTIFY_COUNT_Q1))}
    rings = {0: 3, 1: 5}
    for q in queues:
        for _ in range(rings[q.index]):
            await vdev.vp_notify(q.notify, q.index)
    await vdev.vp_pci_cfg_write(0, queues[1].notify.offset, 1, 2)
    # A read completes after the posted doorbell writes before it (PCIe ordering).
    await vdev.vp_modern_get_num_queues()
    assert await tb.mgmt_read(c.MGMT_NOTIFY_COUNT_Q0) == counts[0] + rings[0]
    assert await tb.mgmt_read(c.MGMT_NOTIFY_COUNT_Q1) == counts[1] + rings[1] + 1
    await finish(tb)


# --- completer: long reads, unsupported requests ------------------------------------------

@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def long_bar_reads(dut):
    """Reads longer than Max_Payload_Size are split into several completions that together
    return what dword reads return (the root complex checks byte counts and lower
    addresses of each completion); 8-byte reads equal two dword reads."""
    tb, be, vdev = await setup(dut)
    bar = tb.params.bar
    await vdev.init(queue_size=16)
    mps = 128 << tb.function.pcie_cap.max_payload_size
    assert mps < 512, f"Max_Payload_Size {mps}: the reads below would not be split"
    for start, length in ((bar.common_cfg, 512), (bar.msix_table, 512),
                          (bar.common_cfg + 4, 500), (bar.msix_table + 4, 40)):
        block = await be.bar_read_block(0, start, length)
        dwords = b"".join([(await be.bar_read(0, off, 4)).to_bytes(4, "little")
                           for off in range(start, start + length, 4)])
        assert block == dwords, f"{start:#x}+{length}"
    for off in (bar.common_cfg + c.VIRTIO_PCI_COMMON_Q_DESCLO, bar.msix_table):
        qword = await be.bar_read(0, off, 8)
        assert qword == await be.bar_read(0, off, 4) | await be.bar_read(0, off + 4, 4) << 32
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def unsupported_requests(dut):
    """Requests the function does not implement get Unsupported Request completions (I/O
    read and write, a read of a BAR other than BAR0); posted ones are dropped; BAR0 keeps
    working. The model never forwards these, so they enter at the CQ interface."""
    tb, be, vdev = await setup(dut)
    bar = tb.params.bar
    for fmt_type, bar_id, data in ((TlpType.IO_READ, 0, None),
                                   (TlpType.IO_WRITE, 0, b"\x01\x02\x03\x04"),
                                   (TlpType.MEM_READ, 2, None)):
        cpls = await tb.inject_cq_request(fmt_type, bar_id, bar.common_cfg, data=data)
        assert cpls, f"{fmt_type.name} to BAR{bar_id}: no completion"
        assert cpls[0].status == CplStatus.UR, f"{fmt_type.name}: status {cpls[0].status!r}"
        assert cpls[0].fmt_type == TlpType.CPL, f"{fmt_type.name}: UR carries data"
    await tb.inject_cq_request(TlpType.MEM_WRITE, 2, bar.common_cfg, data=b"\xff" * 4)
    assert await be.bar_read(0, bar.common_cfg + c.VIRTIO_PCI_COMMON_NUMQ, 2) == c.NUM_QUEUES
    assert await vdev.vp_modern_get_status() == 0
    await finish(tb)


@cocotb.test(timeout_time=TEST_TIMEOUT_US, timeout_unit="us")
async def discontinued_and_locked_requests(dut):
    """PG213: a CQ TLP with discontinue on its last beat is discarded whole. A
    discontinued read of the ISR gets no completion and does not clear it; a locked read
    of it gets UR as a CplLk (only legacy endpoints support locking) and does not clear it
    either. A discontinued write over several CQ beats leaves the MSI-X table as it was;
    the same write without discontinue lands."""
    tb, be, vdev = await setup(dut)
    bar = tb.params.bar
    await vdev.init()
    await request_config_change(tb)
    await be.wait_irq(0, IRQ_TIMEOUT)
    assert not await tb.inject_cq_request(TlpType.MEM_READ, 0, bar.isr, discontinue=True,
                                          timeout_ns=2000)
    cpls = await tb.inject_cq_request(TlpType.MEM_READ_LOCKED, 0, bar.isr)
    assert cpls, "locked read: no completion"
    assert (cpls[0].fmt_type, cpls[0].status) == (TlpType.CPL_LOCKED, CplStatus.UR)
    assert await vdev.vp_modern_isr() == c.VIRTIO_PCI_ISR_CONFIG
    assert await vdev.vp_modern_isr() == 0

    # 16 dwords from the table's start (12 of them the table, vectors masked): more than
    # the first CQ beat holds at either width.
    table = await be.bar_read_block(0, bar.msix_table, 12 * 4)
    entries = [(0xFEE0_0000 + 0x10 * i, 0, 0x40 + i, c.PCI_MSIX_ENTRY_CTRL_MASKBIT)
               for i in range(4)]
    payload = b"".join(dword.to_bytes(4, "little") for entry in entries for dword in entry)
    await tb.inject_cq_request(TlpType.MEM_WRITE, 0, bar.msix_table, data=payload,
                               discontinue=True)
    assert await be.bar_read_block(0, bar.msix_table, 12 * 4) == table
    await tb.inject_cq_request(TlpType.MEM_WRITE, 0, bar.msix_table, data=payload)
    assert await be.bar_read_block(0, bar.msix_table, 12 * 4) == payload[:12 * 4]
    await finish(tb)


# --- pytest entry ---------------------------------------------------------------------------

SMOKE_TESTS = ["enumeration_identity", "lspci_decode", "queue_setup", "msix_config_interrupt",
               "long_bar_reads", "unsupported_requests", "discontinued_and_locked_requests"]


@pytest.mark.parametrize("data_width", [512, 256])
def test_memballoon_usp(data_width):
    """Build ``memballoon_usp`` at ``data_width`` and run its cocotb tests."""
    full = data_width == 512 or os.environ.get("TB_FULL") == "1"
    # The transport does not depend on the bitmap size; a small one keeps each reset
    # (C9: the bitmap clear) short. tb/memballoon runs the default size.
    run_cocotb("memballoon.tb.memballoon_usp.test_memballoon_usp", "test_memballoon_usp",
               DeviceParams(data_width=data_width, bitmap_pages=1 << 12),
               testcase=None if full else SMOKE_TESTS)
