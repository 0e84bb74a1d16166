"""Configuration-space dumps in ``lspci -x`` format, and reading back ``lspci -F -vvv``.

pciutils' "dump" access method (``lspci -F FILE``) reads the text ``lspci -x``/``-xxx``/
``-xxxx`` prints: a line starting with the slot (``01:00.0 ...``), then lines of
``OFFSET: B0 B1 ... B15`` in hex. Writing that format lets the real ``lspci -vvv`` decode
the device's configuration space, an independent check of the capability chain (C2).
The parser turns the decoded text back into data so tests compare values, not words.
"""

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

__all__ = ["read_config_space", "format_dump", "run_lspci", "parse_lspci", "LspciDevice",
           "LspciCapability"]

BYTES_PER_LINE = 16


async def read_config_space(backend, size=256):
    """Read ``size`` bytes (256 or 4096) of configuration space dword by dword."""
    if size not in (64, 256, 4096):
        raise ValueError(f"configuration space dump size {size} is not 64, 256 or 4096")
    data = bytearray()
    for offset in range(0, size, 4):
        data += (await backend.config_read(offset, 4)).to_bytes(4, "little")
    return bytes(data)


def format_dump(config, slot="01:00.0", title="Device"):
    """``config`` as ``lspci -x`` text: the slot line, then 16 bytes per line."""
    if len(config) % BYTES_PER_LINE or not config:
        raise ValueError(f"dump length {len(config)} is not a positive multiple of 16")
    lines = [f"{slot} {title}"]
    for offset in range(0, len(config), BYTES_PER_LINE):
        row = config[offset:offset + BYTES_PER_LINE]
        lines.append(f"{offset:02x}: " + " ".join(f"{b:02x}" for b in row))
    return "\n".join(lines) + "\n"


def run_lspci(dump_text, *args):
    """Run ``lspci -F <dump> -vvv`` (plus ``args``) on ``dump_text`` and return stdout."""
    lspci = shutil.which("lspci")
    if lspci is None:
        raise FileNotFoundError("lspci not found: install Debian's pciutils")
    with tempfile.NamedTemporaryFile("w", suffix=".lspci") as f:
        f.write(dump_text)
        f.flush()
        result = subprocess.run([lspci, "-F", f.name, "-vvv", *args],
                                capture_output=True, text=True, check=True)
    return result.stdout


@dataclass
class LspciCapability:
    """One ``Capabilities: [pos] title`` entry with its indented detail lines."""
    pos: int
    title: str
    lines: list = field(default_factory=list)

    def fields(self):
        """``KEY=VALUE`` pairs of the detail lines (``BAR=0 offset=00001000`` ...), as text."""
        return dict(m.groups() for line in self.lines
                    for m in re.finditer(r"([\w ]+?)=(\S+)", line))

    @property
    def virtio_type(self):
        """``CommonCfg``, ``Notify``, ``ISR``, ``DeviceCfg`` or ``<unknown>`` (pciutils 3.9
        names no other type, PCI_CFG included), None for a non-virtio capability."""
        m = re.search(r"VirtIO: (\S+)", self.title)
        return m and m.group(1)

    def virtio(self):
        """A virtio capability's BAR, offset, size (and notify multiplier) as integers."""
        m = re.search(r"BAR=(\d+) offset=([0-9a-f]+) size=([0-9a-f]+)"
                      r"(?: multiplier=([0-9a-f]+))?", " ".join(self.lines))
        if not m:
            raise ValueError(f"virtio capability at {self.pos:#x} lacks BAR/offset/size: "
                             f"{self.lines}")
        bar, offset, size, mult = m.groups()
        return {"bar": int(bar), "offset": int(offset, 16), "size": int(size, 16),
                "multiplier": None if mult is None else int(mult, 16)}

    def msix(self):
        """An MSI-X capability's enable, count, function mask, table and PBA location."""
        text = self.title + " " + " ".join(self.lines)
        head = re.search(r"MSI-X: Enable([+-]) Count=(\d+) Masked([+-])", text)
        table = re.search(r"Vector table: BAR=(\d+) offset=([0-9a-f]+)", text)
        pba = re.search(r"PBA: BAR=(\d+) offset=([0-9a-f]+)", text)
        if not (head and table and pba):
            raise ValueError(f"not a decoded MSI-X capability: {text!r}")
        return {"enable": head.group(1) == "+", "count": int(head.group(2)),
                "masked": head.group(3) == "+",
                "table_bar": int(table.group(1)), "table_offset": int(table.group(2), 16),
                "pba_bar": int(pba.group(1)), "pba_offset": int(pba.group(2), 16)}


@dataclass
class LspciDevice:
    """One device of ``lspci -vvv`` output."""
    slot: str
    description: str
    revision: int
    attributes: dict            # "Subsystem", "Control", ... -> text
    regions: dict               # BAR number -> text after "Region N: "
    capabilities: list          # LspciCapability, in list order

    def find(self, predicate):
        return [cap for cap in self.capabilities if predicate(cap)]


def parse_lspci(text):
    """Parse ``lspci -vvv`` output of a single device."""
    lines = text.splitlines()
    head = re.match(r"(\S+) (.*?)(?: \(rev ([0-9a-f]+)\))?$", lines[0])
    if not head:
        raise ValueError(f"unexpected lspci header line {lines[0]!r}")
    dev = LspciDevice(slot=head.group(1), description=head.group(2),
                      revision=int(head.group(3), 16) if head.group(3) else 0,
                      attributes={}, regions={}, capabilities=[])
    cap = None
    for line in lines[1:]:
        if not line.strip():
            continue
        if line.startswith("\t\t"):
            if cap is not None:
                cap.lines.append(line.strip())
            continue
        cap = None
        line = line.strip()
        if m := re.match(r"Capabilities: \[([0-9a-f]+)\] (.*)", line):
            cap = LspciCapability(int(m.group(1), 16), m.group(2))
            dev.capabilities.append(cap)
        elif m := re.match(r"Region (\d+): (.*)", line):
            dev.regions[int(m.group(1))] = m.group(2)
        elif m := re.match(r"([\w ]+): (.*)", line):
            dev.attributes[m.group(1)] = m.group(2)
    return dev
