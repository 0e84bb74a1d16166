"""The ``memballoon`` command line without root or a device: arguments, help, the
one-line errors, and the command bodies (probe, selftest, bench) on the reference model
through :class:`~memballoon.backend_ref.RefBackend`."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memballoon import cli
from memballoon.backend import InterruptTimeout
from memballoon.backend_ref import RefBackend
from memballoon.pci_sysfs import BarMissing

ACTIONS = ("bind", "unbind", "probe", "selftest", "bench")


def run_main(capsys, *argv):
    """``memballoon ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("action", ACTIONS)
def test_help_of_each_action(capsys, action):
    status, out, _ = run_main(capsys, "vfio", action, "--help")
    assert status == 0
    assert f"usage: memballoon vfio {action}" in out and "BDF" in out


@pytest.mark.parametrize("argv, message", [
    ((), "the following arguments are required: COMMAND"),
    (("vfio",), "the following arguments are required: ACTION"),
    (("vfio", "probe"), "the following arguments are required: BDF"),
    (("vfio", "bind", "01:00"), "'01:00' is not a PCI address"),
    (("vfio", "selftest", "--timeout", "0", "01:00.0"), "0 is not a positive number"),
    (("vfio", "unbind", "--any-virtio", "01:00.0"), "unrecognized arguments: --any-virtio"),
])
def test_argument_errors(capsys, argv, message):
    status, out, err = run_main(capsys, *argv)
    assert status == 2 and out == ""
    assert message in err


@pytest.mark.parametrize("action", ACTIONS)
def test_not_root_is_one_line(capsys, monkeypatch, action):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status, out, err = run_main(capsys, "vfio", action, "0000:01:00.0")
    assert (status, out) == (1, "")
    assert err == "memballoon: error: must run as root (VFIO and sysfs binding need it): use sudo\n"


def test_no_such_device_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    status, _, err = run_main(capsys, "vfio", "bind", "abcd:ff:1f.7")
    assert status == 1
    assert err == "memballoon: error: no PCI function abcd:ff:1f.7 (see lspci -D)\n"


def test_interrupt_timeout_is_one_line(capsys, monkeypatch):
    async def no_interrupt(bdf, body, *args):
        raise InterruptTimeout(1, 0.5)
    monkeypatch.setattr(cli, "_on_function", no_interrupt)
    status, _, err = run_main(capsys, "vfio", "selftest", "01:00.0")
    assert status == 1
    assert err == "memballoon: error: timeout: no MSI-X interrupt on vector 1 within 500000 us\n"


def test_ctrl_c_exits_130(capsys, monkeypatch):
    async def interrupted(bdf, body, *args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_on_function", interrupted)
    status, _, err = run_main(capsys, "vfio", "bench", "01:00.0")
    assert status == 130 and "interrupted" in err


def test_console_script_is_installed():
    """``make setup`` installs the entry point next to the interpreter."""
    script = Path(sys.executable).with_name("memballoon")
    assert script.exists(), f"{script} missing: run `make setup` (pip install -e .)"
    proc = subprocess.run([str(script), "vfio", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "probe" in proc.stdout, proc


def test_probe_report_on_the_reference_model():
    lines = asyncio.run(cli.probe_report(RefBackend()))
    text = "\n".join(lines)
    assert lines[0].startswith("function 1af4:104d, virtio device 13, revision 1")
    for part in ("virtio COMMON_CFG: BAR0", "virtio NOTIFY_CFG", "virtio ISR_CFG",
                 "MSI-X: 3 vectors", "VERSION_1", "PAGE_4K",
                 "queues: 2", "device status after reset: 0x00"):
        assert part in text, (part, text)


def test_selftest_on_the_reference_model():
    lines = asyncio.run(cli.selftest(RefBackend()))
    assert lines[1:4] == ["GIVE 4 pages: used.len 0, balloon 4 pages",
                          "GET 2 pages: granted 2, balloon 2 pages",
                          "EXCHANGE 1 pair: balloon 2 pages"]
    assert lines[-1] == "reset: device status 0, buffers taken back"


def test_bench_on_the_reference_model():
    lines = asyncio.run(cli.bench(RefBackend()))
    rows = [line for line in lines if line.startswith("| GIVE") or line.startswith("| GET")
            or line.startswith("| EXCHANGE")]
    assert len(rows) == len(cli.BENCH_KINDS) * len(cli.BENCH_SIZES) * len(cli.BENCH_DEPTHS)


def test_a_missing_bar_is_named():
    class NoBars(RefBackend):
        def bar_size(self, bar):
            return 0
    with pytest.raises(BarMissing, match="BAR0 holding COMMON_CFG is not implemented"):
        asyncio.run(cli.selftest(NoBars()))
