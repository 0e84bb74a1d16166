"""The Vivado build tree for the Alveo U250 (``make bitstream``), checked without Vivado.

The generated TCL and XDC run in a real Tcl interpreter (``tclsh``) with the Vivado
commands they use replaced by recorders, so what is checked is what Vivado would be
told: the IP settings equal the design parameters (C1, C2, C11, README "PG213 finding"),
every port of ``memballoon_usp`` is driven by the hard IP, the JTAG-to-AXI master or a
constant, the IP ports exist with the width and direction of cocotbext-pcie's model of
the same IP, and every board pin is placed and the clocks and false paths are there.
"""

import pathlib
import re
import shutil
import subprocess
import tempfile
from importlib.util import find_spec

import pytest

from memballoon import constants as c
from memballoon.hdl.platform import build
from memballoon.hdl.platform.alveo_u250 import AlveoU250Platform
from memballoon.hdl.platform.board_top import verilog_ports
from memballoon.hdl.platform.pcie_ip import (HARD_CAPABILITIES_END, JTAG_AXI_MODULE,
                                             PCIE_MODULE, USER_CLK_MHZ, bar_size_setting)
from memballoon.hdl.top import TOP_NAME
from memballoon.params import DeviceParams

BOARD = "alveo_u250"
DESIGN = build.design_name(BOARD)

#: Vivado commands as recorders; ``readback`` maps a property to the value get_property
#: returns for it (default: what was set), ``clock_period`` is the user clock's period.
TCL_STUBS = r"""
array set props {}
array set readback {}
set clock_period 4.000
proc record {args} { puts [join $args \t] }
proc create_ip {args} { record create_ip {*}$args }
proc get_ips {name} { return $name }
proc get_files {name} { return $name }
proc generate_target {args} { record generate_target {*}$args }
proc current_design {} { return design }
proc get_cells {args} { return pcie_cell }
proc get_pins {name} { return $name }
proc get_clocks {args} { return user_clk }
proc set_property {args} {
    if {[lindex $args 0] eq "-dict"} {
        foreach {name value} [lindex $args 1] { set_property $name $value [lindex $args 2] }
        return
    }
    lassign $args name value objects
    foreach object $objects { set ::props($object,$name) $value }
    record set_property $name $value [join $objects " "]
}
proc get_property {name object} {
    if {$name eq "PERIOD"} { return $::clock_period }
    if {[info exists ::readback($name)]} { return $::readback($name) }
    return $::props($object,$name)
}
proc record_with_objects {command options objects} {
    record $command {*}$options [join $objects " "]
}
proc create_clock {args} {
    record_with_objects create_clock [lrange $args 0 end-1] [lindex $args end]
}
proc set_false_path {args} {
    record_with_objects set_false_path [lrange $args 0 end-1] [lindex $args end]
}
"""


def run_tcl(script, prelude=""):
    """Run ``script`` after the stubs (and ``prelude``): (exit status, recorded commands
    as lists of words, stderr). A word that is a list of objects keeps its spaces."""
    tclsh = shutil.which("tclsh")
    if tclsh is None:
        pytest.fail("tclsh is missing: `make setup` installs Debian's tcl")
    with tempfile.NamedTemporaryFile("w", suffix=".tcl") as file:
        file.write(TCL_STUBS + prelude + script)
        file.flush()
        result = subprocess.run([tclsh, file.name], capture_output=True, text=True)
    return (result.returncode, [line.split("\t") for line in result.stdout.splitlines()],
            result.stderr)


@pytest.fixture(scope="module", params=[512, 256], ids=["512-bit", "256-bit"])
def tree(request, tmp_path_factory):
    """(params, directory) of a build tree written with --no-vivado."""
    params = DeviceParams(data_width=request.param)
    directory = tmp_path_factory.mktemp(f"bitstream-{request.param}")
    assert build.main(["--board", BOARD, "--width", str(request.param), "-o", str(directory),
                       "--no-vivado"]) == 0
    return params, directory


def ip_settings(directory, module):
    status, commands, stderr = run_tcl((directory / f"{module}.tcl").read_text())
    assert status == 0, stderr
    settings = {}
    for words in commands:
        if words[0] == "set_property" and words[1].startswith("CONFIG."):
            settings[words[1][len("CONFIG."):]] = words[2]
    return settings


def test_tree_has_every_file(tree):
    _, directory = tree
    for name in (f"{DESIGN}.tcl", f"{DESIGN}.v", f"{DESIGN}.xdc", f"{TOP_NAME}.v",
                 f"{PCIE_MODULE}.tcl", f"{JTAG_AXI_MODULE}.tcl", "post_synth.tcl",
                 AlveoU250Platform.constraints, f"build_{DESIGN}.sh"):
        assert (directory / name).is_file(), name
    project = (directory / f"{DESIGN}.tcl").read_text()
    assert "-part xcu250-figd2104-2L-e" in project
    for line in (f'add_files "{TOP_NAME}.v"', f"source {PCIE_MODULE}.tcl",
                 f"source {JTAG_AXI_MODULE}.tcl", "source post_synth.tcl",
                 f'read_xdc "{AlveoU250Platform.constraints}"'):
        assert line in project
    assert project.index(f"source {PCIE_MODULE}.tcl") < project.index("synth_design")
    assert project.index("synth_design") < project.index("source post_synth.tcl") \
        < project.index("place_design")


def test_pcie_ip_settings_equal_the_design_parameters(tree):
    params, directory = tree
    s = ip_settings(directory, PCIE_MODULE)
    # Link and user interface: the widths the shim is built for, DWORD-aligned, no straddle.
    lanes = {512: 16, 256: 8}[params.data_width]
    assert s["PL_LINK_CAP_MAX_LINK_WIDTH"] == f"X{lanes}"
    assert s["PL_LINK_CAP_MAX_LINK_SPEED"] == "8.0_GT/s"
    assert s["axisten_if_width"] == f"{params.data_width}_bit"
    assert int(s["axisten_freq"]) == USER_CLK_MHZ
    assert all(value == "false" for name, value in s.items() if "STRADDLE" in name)
    assert s["axisten_if_enable_client_tag"] == "true"
    # C1 identity.
    assert int(s["vendor_id"], 16) == c.PCI_VENDOR_ID_REDHAT_QUMRANET
    assert int(s["PF0_DEVICE_ID"], 16) == c.MEMBALLOON_PCI_DEVICE_ID
    assert int(s["PF0_REVISION_ID"], 16) == c.MEMBALLOON_PCI_REVISION_ID >= 1
    assert int(s["PF0_SUBSYSTEM_VENDOR_ID"], 16) == c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID
    assert int(s["PF0_SUBSYSTEM_ID"], 16) == c.MEMBALLOON_PCI_SUBSYSTEM_ID >= 0x40
    assert int(s["PF0_CLASS_CODE"], 16) == c.PCI_CLASS_MEMORY_OTHER
    assert int(s["pf0_class_code_base"] + s["pf0_class_code_sub"]
               + s["pf0_class_code_interface"], 16) == c.PCI_CLASS_MEMORY_OTHER
    assert s["PF0_Use_Class_Code_Lookup_Assistant"] == "false"
    # C2: one 64-bit, non-prefetchable memory BAR of the layout's size.
    unit = {"Kilobytes": 1 << 10, "Megabytes": 1 << 20, "Gigabytes": 1 << 30}
    assert int(s["pf0_bar0_size"]) * unit[s["pf0_bar0_scale"]] == params.bar.size
    assert (s["pf0_bar0_enabled"], s["pf0_bar0_type"], s["pf0_bar0_64bit"],
            s["pf0_bar0_prefetchable"]) == ("true", "Memory", "true", "false")
    assert s["pf0_bar2_enabled"] == s["pf0_bar4_enabled"] == "false"
    # C11: MSI-X with table and PBA in BAR0 where the RTL serves them; INTA without it.
    assert (s["pf0_msi_enabled"], s["pf0_msix_enabled"]) == ("false", "true")
    assert s["MSI_X_OPTIONS"] == "MSI-X_External"
    assert int(s["PF0_MSIX_CAP_TABLE_SIZE"], 16) + 1 == params.msix_vectors
    assert int(s["PF0_MSIX_CAP_TABLE_OFFSET"], 16) == params.bar.msix_table
    assert int(s["PF0_MSIX_CAP_PBA_OFFSET"], 16) == params.bar.msix_pba
    assert s["PF0_MSIX_CAP_TABLE_BIR"] == s["PF0_MSIX_CAP_PBA_BIR"] == "BAR_1:0"
    assert s["PF0_INTERRUPT_PIN"] == "INTA"
    # The legacy cfg_ext window (README "PG213 finding"), behind the hard capabilities.
    assert s["legacy_ext_pcie_cfg_space_enabled"] == "true"
    assert params.cfg_ext_base >= HARD_CAPABILITIES_END
    # The card's block and quads.
    location = AlveoU250Platform.pcie_location
    assert (s["pcie_blk_locn"], s["select_quad"]) == (location.block, location.quad)


def test_ip_tcl_stops_on_a_value_vivado_changed(tree):
    _, directory = tree
    script = (directory / f"{PCIE_MODULE}.tcl").read_text()
    status, _, stderr = run_tcl(script, "set readback(CONFIG.PF0_DEVICE_ID) 1041\n")
    assert status != 0 and "PF0_DEVICE_ID is '1041'" in stderr


def test_jtag_axi_is_axi4_lite_32_bit(tree):
    _, directory = tree
    s = ip_settings(directory, JTAG_AXI_MODULE)
    assert s == {"PROTOCOL": "2", "M_AXI_DATA_WIDTH": "32", "M_AXI_ADDR_WIDTH": "32"}


def test_post_synth_sets_the_capability_next_pointer(tree):
    params, directory = tree
    script = (directory / "post_synth.tcl").read_text()
    status, commands, stderr = run_tcl(script)
    assert status == 0, stderr
    assert ["set_property", "PF0_PCIE_CAP_NEXTPTR", f"8'h{params.cfg_ext_base:02X}",
            "pcie_cell"] in commands
    # The user clock is looked up on the IP instance the board top has.
    instance = re.search(r"get_pins (\w+)/user_clk", script).group(1)
    board = (directory / f"{DESIGN}.v").read_text()
    assert re.search(rf"^\s*{PCIE_MODULE} {instance} \(", board, re.M)
    # The checks can fail: a pointer that did not take, a user clock of another period.
    status, _, stderr = run_tcl(script, "set readback(PF0_PCIE_CAP_NEXTPTR) 8'h00\n")
    assert status != 0 and "PF0_PCIE_CAP_NEXTPTR reads 8'h00" in stderr
    status, _, stderr = run_tcl(script, "set clock_period 8.000\n")
    assert status != 0 and "user_clk" in stderr


def instance_connections(verilog, module):
    """``{port: net}`` of the one instance of ``module`` in Amaranth's Verilog."""
    match = re.search(rf"^\s*{re.escape(module)} \S+ \((.*?)\);", verilog, re.S | re.M)
    assert match, module
    return dict(re.findall(r"\.(\w+)\(([^()]*)\)", match.group(1)))


def model_ports():
    """``{port: (is_ip_output, width or None)}`` of cocotbext-pcie's PCIE4 model, read
    from its source: a port the model drives is an IP output."""
    source = pathlib.Path(find_spec("cocotbext.pcie.xilinx.us.usp_model").origin).read_text()
    driven = set(re.findall(r"self\.(\w+)\.(?:value\s*=(?!=)|setimmediatevalue\()", source))
    ports = {name: (name in driven, int(width))
             for name, width in re.findall(r"init_signal\((\w+), (\d+)", source)}
    ports["cfg_max_payload"] = (True, None)     # the model takes 2 or 3 bits
    # IP outputs the model declares but never drives (README "PG213 finding": the model
    # leaves cfg_ext to tb/cfg_ext.py, INTx to tb/intx.py and cfg_flr_in_process to the
    # harness).
    for name in ("cfg_flr_in_process", "cfg_ext_read_received", "cfg_ext_write_received",
                 "cfg_ext_register_number", "cfg_ext_function_number", "cfg_ext_write_data",
                 "cfg_ext_write_byte_enable", "cfg_interrupt_sent"):
        ports[name] = (True, ports[name][1])
    return ports


def test_every_core_port_is_driven_by_the_ip_or_tied(tree):
    params, directory = tree
    core = verilog_ports((directory / f"{TOP_NAME}.v").read_text(), TOP_NAME)
    board = (directory / f"{DESIGN}.v").read_text()
    core_nets = instance_connections(board, TOP_NAME)
    ip_nets = {net: (module, port)
               for module in (PCIE_MODULE, JTAG_AXI_MODULE)
               for port, net in instance_connections(board, module).items()}
    aliases = dict(re.findall(r"^\s*assign (\w+) = (\w+);", board, re.M))
    assert set(core_nets) == set(core)
    model = model_ports()
    for port, net in core_nets.items():
        if re.fullmatch(r"\d+'h[0-9a-f]+", net):
            assert port in (f"s_axil_mgmt_{p}" for p in ("awprot", "arprot")), port
            continue
        base = re.sub(r"\[\d+(:\d+)?\]$", "", net)
        base = base if base in ip_nets else aliases.get(base, base)
        assert base in ip_nets, f"{port} is connected to {net}, which no IP drives"
        module, ip_port = ip_nets[base]
        if module == PCIE_MODULE and not ip_port.startswith(("s_axis_", "m_axis_")):
            is_input, width = core[port]
            ip_output, ip_width = model[ip_port]
            assert ip_output == is_input, f"{port} and {ip_port} face the same way"
            assert ip_width in (None, width), f"{port}: {width} bits, {ip_port}: {ip_width}"


def test_pcie_ip_ports_exist_in_the_model(tree):
    """Every non-stream port the board top names exists in cocotbext-pcie's PCIE4 model
    (GT lanes excepted: the model has no serial side), tied inputs as inputs."""
    _, directory = tree
    board = (directory / f"{DESIGN}.v").read_text()
    model = model_ports()
    for port, net in instance_connections(board, PCIE_MODULE).items():
        if port.startswith(("s_axis_", "m_axis_", "pci_exp_")):
            continue
        assert port in model, port
        if re.fullmatch(r"\d+'h[0-9a-f]+", net):
            assert not model[port][0], f"{port} is an IP output tied to a constant"


def xdc_commands(directory):
    """Both XDC files run through tclsh: the recorded commands, as lists of words."""
    script = "".join((directory / name).read_text()
                     for name in (f"{DESIGN}.xdc", AlveoU250Platform.constraints))
    ports = verilog_ports((directory / f"{DESIGN}.v").read_text(), DESIGN)
    bits = [f"{name}[{i}]" if width > 1 else name
            for name, (_, width) in ports.items() for i in range(width)]
    # get_ports matches port bits as Vivado does: exact names, or globs.
    prelude = f"set port_bits {{{' '.join('{' + b + '}' for b in bits)}}}\n" + r"""
proc get_ports {pattern} {
    if {[lsearch -exact $::port_bits $pattern] >= 0} { return [list $pattern] }
    set glob [string map {[ \\[ ] \\]} $pattern]
    set found [lsearch -all -inline -glob $::port_bits $glob]
    if {$found eq {}} { error "no port matches $pattern" }
    return $found
}
"""
    status, commands, stderr = run_tcl(script, prelude)
    assert status == 0, stderr
    return ports, bits, commands


def test_xdc_places_every_pin_and_constrains_the_clocks(tree):
    params, directory = tree
    ports, bits, commands = xdc_commands(directory)
    placed = {}
    standards = {}
    for words in commands:
        if words[:2] == ["set_property", "LOC"]:
            for bit in words[3].split():
                placed[bit] = words[2]
        elif words[:2] == ["set_property", "IOSTANDARD"]:
            standards[words[3]] = words[2]
    assert sorted(placed) == sorted(bits), "every board port bit has a LOC"
    assert len(set(placed.values())) == len(placed), "no pin is used twice"
    lanes = {512: 16, 256: 8}[params.data_width]
    assert ports[f"pcie_x{lanes}_0__rx_p__io"][1] == ports[f"pcie_x{lanes}_0__tx_n__io"][1] \
        == lanes
    # Low-speed pins have an I/O standard; GT lanes and the GT reference clock do not.
    assert set(standards) == {b for b in bits if b.startswith(("pcie_perst", "led_"))}
    clocks = [w for w in commands if w[0] == "create_clock"]
    assert len(clocks) == 1 and clocks[0][clocks[0].index("-period") + 1] == "10.000"
    assert clocks[0][-1] == "pcie_refclk_0__p"
    false_paths = [w for w in commands if w[0] == "set_false_path"]
    assert ["set_false_path", "-from", "pcie_perst_n_0__io"] in false_paths
    led_bits = [b for b in bits if b.startswith("led_")]
    assert any(w[1] == "-to" and sorted(w[2].split()) == sorted(led_bits)
               for w in false_paths)


def test_bitstream_without_vivado_stops_with_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    assert build.main(["--board", BOARD, "-o", str(tmp_path / "tree")]) == build.EXIT_NO_VIVADO
    assert "vivado is not on PATH" in capsys.readouterr().err
    assert (tmp_path / "tree" / f"build_{DESIGN}.sh").is_file()


@pytest.mark.parametrize("size, setting", [(16 << 10, ("Kilobytes", "16")),
                                           (1 << 20, ("Megabytes", "1")),
                                           (4 << 30, ("Gigabytes", "4"))])
def test_bar_size_setting(size, setting):
    assert bar_size_setting(size) == setting


@pytest.mark.parametrize("size", [0, 3 << 10, 512])
def test_bar_size_setting_refuses_what_the_ip_cannot_take(size):
    with pytest.raises(ValueError):
        bar_size_setting(size)
