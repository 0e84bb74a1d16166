"""sw/lspci.py: the dump format is what ``lspci -F`` reads, and the parser gets the
decoded virtio and MSI-X capabilities back as numbers."""

import asyncio
import struct

import pytest
from fake_virtio import CAP_POS, FakeVirtioBackend

from memballoon import constants as c
from memballoon.lspci import format_dump, parse_lspci, read_config_space, run_lspci

MSIX_POS = 0x90


def config_with_msix(be):
    """The fake's configuration space with an MSI-X capability appended to the list."""
    bar = be.params.bar
    last = CAP_POS[c.VIRTIO_PCI_CAP_PCI_CFG]
    be.config[last + 1] = MSIX_POS
    struct.pack_into("<BBHII", be.config, MSIX_POS, c.PCI_CAP_ID_MSIX, 0,
                     (be.params.msix_vectors - 1) | c.PCI_MSIX_FLAGS_ENABLE,
                     bar.msix_table, bar.msix_pba)
    return bytes(asyncio.run(read_config_space(be)))


def test_format_dump_layout():
    text = format_dump(bytes(range(64)), slot="02:00.0")
    lines = text.splitlines()
    assert lines[0].startswith("02:00.0 ")
    assert lines[1] == "00: " + " ".join(f"{b:02x}" for b in range(16))
    assert lines[4].startswith("30: 30 31")
    assert len(format_dump(bytes(4096)).splitlines()) == 1 + 256
    assert format_dump(bytes(4096)).splitlines()[-1].startswith("ff0: ")
    with pytest.raises(ValueError):
        format_dump(bytes(10))


def test_lspci_decodes_dump():
    be = FakeVirtioBackend()
    config = config_with_msix(be)
    dev = parse_lspci(run_lspci(format_dump(config)))
    assert dev.slot == "01:00.0"
    assert dev.revision == c.MEMBALLOON_PCI_REVISION_ID
    assert "Memory controller" in dev.description
    assert [cap.pos for cap in dev.capabilities] == [*CAP_POS.values(), MSIX_POS]

    virtio = {cap.virtio_type: cap.virtio() for cap in dev.capabilities if cap.virtio_type}
    bar = be.params.bar
    assert virtio["CommonCfg"] == {"bar": 0, "offset": bar.common_cfg,
                                   "size": c.VIRTIO_PCI_COMMON_CFG_SIZE, "multiplier": None}
    assert virtio["Notify"]["offset"] == bar.notify
    assert virtio["Notify"]["multiplier"] == bar.notify_off_multiplier
    assert virtio["ISR"]["size"] == 1
    assert virtio["<unknown>"] == {"bar": 0, "offset": 0, "size": 0, "multiplier": None}

    (msix,) = dev.find(lambda cap: cap.title.startswith("MSI-X"))
    assert msix.msix() == {"enable": True, "count": be.params.msix_vectors, "masked": False,
                           "table_bar": 0, "table_offset": bar.msix_table,
                           "pba_bar": 0, "pba_offset": bar.msix_pba}


def test_parser_rejects_non_virtio_capability():
    be = FakeVirtioBackend()
    dev = parse_lspci(run_lspci(format_dump(config_with_msix(be))))
    (msix,) = dev.find(lambda cap: cap.pos == MSIX_POS)
    assert msix.virtio_type is None
    with pytest.raises(ValueError):
        msix.virtio()
