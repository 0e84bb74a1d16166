# Alveo U250: clocks, false paths and configuration for memballoon.
# Pin locations and I/O standards (PCIe lanes, reference clock, PERST#, LEDs) come from
# hdl/platform/alveo_u250.py, which Amaranth writes to memballoon_alveo_u250.xdc; the
# PCIE4 block X1Y2 and GTY quads 224..227 are set in the IP (CONFIG.pcie_blk_locn,
# CONFIG.select_quad), and its own XDC places the GT channels on those lane pins.

# Configuration: SPI x4 flash, 1.8 V configuration bank (the card's settings, UG1289).
set_property CFGBVS GND [current_design]
set_property CONFIG_VOLTAGE 1.8 [current_design]
set_property BITSTREAM.GENERAL.COMPRESS TRUE [current_design]
set_property BITSTREAM.CONFIG.CONFIGRATE 63.8 [current_design]
set_property BITSTREAM.CONFIG.SPI_BUSWIDTH 4 [current_design]
set_property BITSTREAM.CONFIG.SPI_32BIT_ADDR YES [current_design]
set_property BITSTREAM.CONFIG.SPI_FALL_EDGE YES [current_design]
set_property BITSTREAM.CONFIG.UNUSEDPIN PULLUP [current_design]

# PCIe reference clock: 100 MHz from the edge connector (MGTREFCLK0 of quad 226).
create_clock -period 10.000 -name pcie_refclk [get_ports pcie_refclk_0__p]

# User clock: the IP derives user_clk (250 MHz, 4.000 ns) from pcie_refclk in its own
# constraints; the whole design (core, JTAG-to-AXI master and its debug hub) runs on it.
# post_synth.tcl stops the build if user_clk is not that clock.

# PERST# is asynchronous to every clock; the IP synchronizes it.
set_false_path -from [get_ports pcie_perst_n_0__io]

# Status LEDs: static levels, no timing.
set_false_path -to [get_ports {led_*__io}]
