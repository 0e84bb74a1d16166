"""The Vivado IP around the device core, configured from the same Python parameters.

- ``pcie4_uscale_plus`` (AMD PG213), the UltraScale+ PCIE4 integrated block: every
  setting the RTL depends on is derived here from :class:`~memballoon.params.DeviceParams`
  and :mod:`memballoon.constants` (C1), never typed twice. The generated TCL reads each
  setting back after ``set_property`` and stops the build on any difference, so a value
  Vivado silently adjusts, or a parameter name it does not know, fails the build.
- ``jtag_axi`` (AMD PG174), the JTAG-to-AXI master that drives the C10 management port
  (see README "FPGA build": why JTAG).

:data:`CORE_CONNECTIONS` says where every port of ``memballoon_usp`` goes.
"""

import dataclasses

from ... import constants as c
from ...params import DeviceParams
from ..pcie.usp_shim import _TUSER_WIDTHS, MAX_PAYLOAD_BYTES
from ..top import MGMT_PREFIX

PCIE_IP = "pcie4_uscale_plus"
PCIE_MODULE = "pcie4_uscale_plus_0"
#: Instance name of the IP in the board top (post-synthesis TCL finds its pins by it).
PCIE_INSTANCE = "pcie"
JTAG_AXI_IP = "jtag_axi"
JTAG_AXI_MODULE = "jtag_axi_0"
#: Link per AXI-stream width; the same pairs the testbench's hard IP model uses.
LINK = {512: ("8.0_GT/s", "X16"), 256: ("8.0_GT/s", "X8")}
LANES = {512: 16, 256: 8}
USER_CLK_MHZ = 250
#: The PCIE4 block's own capabilities end at 0xAB (PCIe capability at 0x70, 60 bytes);
#: the legacy window handed to user logic starts after them (README "PG213 finding").
HARD_CAPABILITIES_END = 0xAC
#: Primitive of the PCIE4 block on UltraScale+ (PCIE4C devices use PCIE4CE4).
PCIE_PRIMITIVE = "PCIE40E4"
#: The JTAG-to-AXI master's address and data width (AXI4-Lite, PROTOCOL 2).
JTAG_AXI_ADDR_WIDTH = 32


@dataclasses.dataclass(frozen=True)
class PcieLocation:
    """Which PCIE4 block and GT quads a board wires to its edge connector."""
    block: str          # CONFIG.pcie_blk_locn, e.g. "X1Y2"
    quad: str           # CONFIG.select_quad: the quad of lane 0, e.g. "GTY_Quad_227"


def bar_size_setting(size):
    """A BAR size in bytes as the IP's (scale, size) pair: 16384 -> ("Kilobytes", "16")."""
    if size <= 0 or size & (size - 1):
        raise ValueError(f"BAR size {size} is not a power of two")
    for scale, unit in (("Gigabytes", 1 << 30), ("Megabytes", 1 << 20), ("Kilobytes", 1 << 10)):
        if size >= unit:
            return scale, str(size // unit)
    raise ValueError(f"BAR size {size} is below the 1 KiB this flow supports")


def pcie_ip_config(params: DeviceParams, location: PcieLocation):
    """``CONFIG.*`` name -> value for ``pcie4_uscale_plus`` (PG213), in setting order.

    The lookup assistant is switched off first so the raw class code applies.
    """
    if params.cfg_ext_base < HARD_CAPABILITIES_END:
        raise ValueError(f"cfg_ext window at {params.cfg_ext_base:#x} overlaps the hard "
                         f"capabilities, which end at {HARD_CAPABILITIES_END - 1:#x}")
    speed, width = LINK[params.data_width]
    bar_scale, bar_size = bar_size_setting(params.bar.size)
    # A 64-bit BAR0 spans BAR0 and BAR1: the IP names it "BAR_1:0".
    bar0 = "BAR_1:0"
    class_code = c.PCI_CLASS_MEMORY_OTHER
    config = {
        "PF0_Use_Class_Code_Lookup_Assistant": "false",
        "mode_selection": "Advanced",
        # Link and user interface (usp_shim.py: DWORD-aligned, no straddling).
        "PL_LINK_CAP_MAX_LINK_SPEED": speed,
        "PL_LINK_CAP_MAX_LINK_WIDTH": width,
        "axisten_if_width": f"{params.data_width}_bit",
        "axisten_freq": str(USER_CLK_MHZ),
        "axisten_if_enable_client_tag": "true",
        "extended_tag_field": "true",
        "pf0_dev_cap_max_payload": f"{MAX_PAYLOAD_BYTES}_bytes",
        "pcie_blk_locn": location.block,
        "en_gt_selection": "true",
        "select_quad": location.quad,
        # Identity (C1).
        "vendor_id": f"{c.PCI_VENDOR_ID_REDHAT_QUMRANET:04X}",
        "PF0_DEVICE_ID": f"{c.MEMBALLOON_PCI_DEVICE_ID:04X}",
        "PF0_REVISION_ID": f"{c.MEMBALLOON_PCI_REVISION_ID:02X}",
        "PF0_SUBSYSTEM_VENDOR_ID": f"{c.MEMBALLOON_PCI_SUBSYSTEM_VENDOR_ID:04X}",
        "PF0_SUBSYSTEM_ID": f"{c.MEMBALLOON_PCI_SUBSYSTEM_ID:04X}",
        "pf0_class_code_base": f"{class_code >> 16:02X}",
        "pf0_class_code_sub": f"{class_code >> 8 & 0xFF:02X}",
        "pf0_class_code_interface": f"{class_code & 0xFF:02X}",
        "PF0_CLASS_CODE": f"{class_code:06X}",
        # BAR0: 64-bit memory, not prefetchable (common configuration and ISR have read
        # side effects, C2); no other BAR. Interrupt pin INTA: with MSI-X disabled the
        # ISR byte signals INTx (C11, hdl/virtio/isr.py).
        "pf0_bar0_enabled": "true",
        "pf0_bar0_type": "Memory",
        "pf0_bar0_64bit": "true",
        "pf0_bar0_prefetchable": "false",
        "pf0_bar0_scale": bar_scale,
        "pf0_bar0_size": bar_size,
        "pf0_bar2_enabled": "false",
        "pf0_bar4_enabled": "false",
        "PF0_INTERRUPT_PIN": "INTA",
        # MSI-X with the table and PBA in BAR0, held by the RTL (hdl/pcie/msix.py, C11).
        "pf0_msi_enabled": "false",
        "pf0_msix_enabled": "true",
        "MSI_X_OPTIONS": "MSI-X_External",
        "PF0_MSIX_CAP_TABLE_SIZE": f"{params.msix_vectors - 1:03X}",
        "PF0_MSIX_CAP_TABLE_BIR": bar0,
        "PF0_MSIX_CAP_TABLE_OFFSET": f"{params.bar.msix_table:08X}",
        "PF0_MSIX_CAP_PBA_BIR": bar0,
        "PF0_MSIX_CAP_PBA_OFFSET": f"{params.bar.msix_pba:08X}",
        # cfg_ext: the legacy window 0xB0.. goes to the RTL (virtio capabilities, C2);
        # the extended space (0x480..) is not used.
        "legacy_ext_pcie_cfg_space_enabled": "true",
        "ext_pcie_cfg_space_enabled": "false",
    }
    if params.data_width == 512:
        config.update({
            "AXISTEN_IF_EXT_512_CQ_STRADDLE": "false",
            "AXISTEN_IF_EXT_512_RQ_STRADDLE": "false",
            "AXISTEN_IF_EXT_512_RC_4TLP_STRADDLE": "false",
            "AXISTEN_IF_RC_STRADDLE": "false",
        })
    else:
        config["AXISTEN_IF_RC_STRADDLE"] = "false"
    return config


def jtag_axi_config():
    """``CONFIG.*`` for the JTAG-to-AXI master (PG174): AXI4-Lite, 32-bit."""
    return {"PROTOCOL": "2", "M_AXI_DATA_WIDTH": "32",
            "M_AXI_ADDR_WIDTH": str(JTAG_AXI_ADDR_WIDTH)}


#: Applied before the other settings: with the assistant on, the IP ignores a raw class
#: code set in the same transaction.
APPLIED_FIRST = ("PF0_Use_Class_Code_Lookup_Assistant",)


def ip_tcl(ip_name, module_name, config):
    """TCL that creates ``module_name`` from ``ip_name``, applies ``config`` (the names in
    :data:`APPLIED_FIRST` alone first, then all in one transaction, as the IP validates
    them together), reads every value back and stops on a difference, and generates the
    IP for global synthesis (no out-of-context checkpoint: ``synth_design`` builds it
    with the top)."""
    lines = [
        f"# {module_name}: generated by memballoon.hdl.platform from DeviceParams; do not edit.",
        f"create_ip -name {ip_name} -vendor xilinx.com -library ip -module_name {module_name}",
        f"set ip [get_ips {module_name}]",
        "set memballoon_config {",
        *(f"    CONFIG.{name} {{{value}}}" for name, value in config.items()),
        "}",
        *(f"set_property CONFIG.{name} {{{config[name]}}} $ip"
          for name in APPLIED_FIRST if name in config),
        "set_property -dict $memballoon_config $ip",
        "foreach {name expected} $memballoon_config {",
        "    set actual [get_property $name $ip]",
        "    if {[string tolower $actual] ne [string tolower $expected]} {",
        f'        error "{module_name}: $name is \'$actual\', the design needs \'$expected\'"',
        "    }",
        "}",
        f"set_property generate_synth_checkpoint false [get_files {module_name}.xci]",
        "generate_target all $ip",
    ]
    return "\n".join(lines) + "\n"


def post_synth_tcl(params: DeviceParams):
    """TCL run after ``synth_design``: point the PCIe capability's next pointer at the
    cfg_ext window (no IP setting exists for it, README "PG213 finding") and check the
    user clock the IP derived."""
    period_ns = 1000 / USER_CLK_MHZ
    return "\n".join([
        "# Generated by memballoon.hdl.platform from DeviceParams; do not edit.",
        f"set pcie_cells [get_cells -hierarchical -filter {{REF_NAME == {PCIE_PRIMITIVE}}}]",
        "if {[llength $pcie_cells] != 1} {",
        f'    error "expected one {PCIE_PRIMITIVE}, found [llength $pcie_cells]"',
        "}",
        f"set_property PF0_PCIE_CAP_NEXTPTR 8'h{params.cfg_ext_base:02X} $pcie_cells",
        "set next_pointer [get_property PF0_PCIE_CAP_NEXTPTR $pcie_cells]",
        f"if {{[scan $next_pointer {{%*d'h%x}} value] != 1 || $value != {params.cfg_ext_base}}} {{",
        f'    error "PF0_PCIE_CAP_NEXTPTR reads $next_pointer, not {params.cfg_ext_base:#x}"',
        "}",
        f"set user_clock [get_clocks -of_objects [get_pins {PCIE_INSTANCE}/user_clk]]",
        f"if {{[llength $user_clock] != 1 || "
        f"abs([get_property PERIOD $user_clock] - {period_ns:.3f}) > 0.001}} {{",
        f'    error "user_clk is not the {USER_CLK_MHZ} MHz clock the design is built for"',
        "}",
    ]) + "\n"


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where one ``memballoon_usp`` port goes: an IP port (``ip`` is ``"pcie"`` or
    ``"jtag_axi"``; its low bits when it is wider), or a constant (``ip`` None)."""
    ip: str = None
    port: str = None
    constant: int = 0


def _stream_ports():
    """Core stream port -> IP stream port: the core's slave is the IP's master."""
    ports = {}
    for core_dir, ip_dir, name in (("s", "m", "cq"), ("m", "s", "cc"), ("m", "s", "rq"),
                                   ("s", "m", "rc")):
        for field in ("tdata", "tkeep", "tlast", "tready", "tuser", "tvalid"):
            ports[f"{core_dir}_axis_{name}_{field}"] = Connection(
                "pcie", f"{ip_dir}_axis_{name}_{field}")
    return ports


_SAME_NAME = [
    "pcie_cq_np_req", "pcie_cq_np_req_count",
    "cfg_ext_read_received", "cfg_ext_write_received", "cfg_ext_register_number",
    "cfg_ext_function_number", "cfg_ext_write_data", "cfg_ext_write_byte_enable",
    "cfg_ext_read_data", "cfg_ext_read_data_valid",
    "cfg_interrupt_msix_enable", "cfg_interrupt_msix_mask", "cfg_interrupt_msix_address",
    "cfg_interrupt_msix_data", "cfg_interrupt_msix_int", "cfg_interrupt_msi_function_number",
    "cfg_interrupt_int", "cfg_interrupt_pending", "cfg_interrupt_sent",
    "cfg_max_payload", "cfg_max_read_req", "cfg_function_status", "cfg_flr_in_process",
    "cfg_flr_done", "user_clk", "user_reset",
]


def core_connections():
    """Every ``memballoon_usp`` port -> :class:`Connection`.

    The PCIE4 block reports MSI-X results on its MSI sent/fail ports; the AXI4-Lite
    management port (C10) is the JTAG-to-AXI master's, its 4 KiB decoded from the low
    address bits; AxPROT is unused by the port and tied to 0.
    """
    connections = {name: Connection("pcie", name) for name in _SAME_NAME}
    connections.update(_stream_ports())
    connections["cfg_interrupt_msix_sent"] = Connection("pcie", "cfg_interrupt_msi_sent")
    connections["cfg_interrupt_msix_fail"] = Connection("pcie", "cfg_interrupt_msi_fail")
    for field in ("awaddr", "awvalid", "awready", "wdata", "wstrb", "wvalid", "wready",
                  "bresp", "bvalid", "bready", "araddr", "arvalid", "arready", "rdata",
                  "rresp", "rvalid", "rready"):
        connections[MGMT_PREFIX + field] = Connection("jtag_axi", f"m_axi_{field}")
    for field in ("awprot", "arprot"):
        connections[MGMT_PREFIX + field] = Connection(constant=0)
    return connections


def pcie_port_widths(data_width):
    """Width of each PCIE4 IP port the board top connects (PG213 port tables)."""
    tuser = _TUSER_WIDTHS[data_width]
    widths = {}
    for ip_dir, name in (("m", "cq"), ("s", "cc"), ("s", "rq"), ("m", "rc")):
        widths.update({
            f"{ip_dir}_axis_{name}_tdata": data_width,
            f"{ip_dir}_axis_{name}_tkeep": data_width // 32,
            f"{ip_dir}_axis_{name}_tlast": 1,
            # The IP's own slave tready is replicated 4 times (bit 0 is used).
            f"{ip_dir}_axis_{name}_tready": 4 if ip_dir == "s" else 1,
            f"{ip_dir}_axis_{name}_tuser": tuser[name],
            f"{ip_dir}_axis_{name}_tvalid": 1,
        })
    widths.update({
        "pcie_cq_np_req": 2, "pcie_cq_np_req_count": 6,
        "cfg_ext_read_received": 1, "cfg_ext_write_received": 1,
        "cfg_ext_register_number": 10, "cfg_ext_function_number": 8,
        "cfg_ext_write_data": 32, "cfg_ext_write_byte_enable": 4,
        "cfg_ext_read_data": 32, "cfg_ext_read_data_valid": 1,
        "cfg_interrupt_msix_enable": 4, "cfg_interrupt_msix_mask": 4,
        "cfg_interrupt_msix_address": 64, "cfg_interrupt_msix_data": 32,
        "cfg_interrupt_msix_int": 1, "cfg_interrupt_msi_sent": 1, "cfg_interrupt_msi_fail": 1,
        "cfg_interrupt_msi_function_number": 8,
        "cfg_interrupt_int": 4, "cfg_interrupt_pending": 4, "cfg_interrupt_sent": 1,
        "cfg_max_payload": 2, "cfg_max_read_req": 3, "cfg_function_status": 16,
        "cfg_flr_in_process": 4, "cfg_flr_done": 4,
        "user_clk": 1, "user_reset": 1, "user_lnk_up": 1,
        "sys_clk": 1, "sys_clk_gt": 1, "sys_reset": 1,
        "pci_exp_rxp": LANES[data_width], "pci_exp_rxn": LANES[data_width],
        "pci_exp_txp": LANES[data_width], "pci_exp_txn": LANES[data_width],
    })
    widths.update({name: width for name, (width, _) in PCIE_TIED_INPUTS.items()})
    return widths


#: PCIE4 inputs the design does not use, tied as an endpoint without those features
#: needs them: (width, value). Configuration management, messages, flow-control
#: readout, DSN, power management, MSI-X vector pending, error injection, VF FLR.
PCIE_TIED_INPUTS = {
    "cfg_mgmt_addr": (10, 0), "cfg_mgmt_function_number": (8, 0), "cfg_mgmt_write": (1, 0),
    "cfg_mgmt_write_data": (32, 0), "cfg_mgmt_byte_enable": (4, 0), "cfg_mgmt_read": (1, 0),
    "cfg_mgmt_debug_access": (1, 0),
    "cfg_msg_transmit": (1, 0), "cfg_msg_transmit_type": (3, 0),
    "cfg_msg_transmit_data": (32, 0),
    "cfg_fc_sel": (3, 0), "cfg_dsn": (64, 0),
    "cfg_power_state_change_ack": (1, 1), "cfg_err_cor_in": (1, 0), "cfg_err_uncor_in": (1, 0),
    "cfg_vf_flr_func_num": (8, 0), "cfg_vf_flr_done": (1, 0),
    "cfg_link_training_enable": (1, 1), "cfg_config_space_enable": (1, 1),
    "cfg_interrupt_msix_vec_pending": (2, 0),
    "cfg_pm_aspm_l1_entry_reject": (1, 0), "cfg_pm_aspm_tx_l0s_entry_disable": (1, 0),
    "cfg_req_pm_transition_l23_ready": (1, 0), "cfg_hot_reset_in": (1, 0),
    "cfg_ds_port_number": (8, 0), "cfg_ds_bus_number": (8, 0),
    "cfg_ds_device_number": (5, 0),
}


def jtag_axi_port_widths():
    """Width of each JTAG-to-AXI master port the board top connects (PG174)."""
    a = JTAG_AXI_ADDR_WIDTH
    return {"aclk": 1, "aresetn": 1,
            "m_axi_awaddr": a, "m_axi_awvalid": 1, "m_axi_awready": 1,
            "m_axi_wdata": 32, "m_axi_wstrb": 4, "m_axi_wvalid": 1, "m_axi_wready": 1,
            "m_axi_bresp": 2, "m_axi_bvalid": 1, "m_axi_bready": 1,
            "m_axi_araddr": a, "m_axi_arvalid": 1, "m_axi_arready": 1,
            "m_axi_rdata": 32, "m_axi_rresp": 2, "m_axi_rvalid": 1, "m_axi_rready": 1}
