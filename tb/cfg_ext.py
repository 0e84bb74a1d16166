"""The PCIE4 block's configuration extension interface (cfg_ext) for cocotbext-pcie.

The UltraScale+ hard IP hands configuration reads and writes of a user-defined range of
the legacy configuration space to user logic (PG213, "Configuration Extend Interface"),
and its last built-in capability's next pointer is set to the start of that range. The
cocotbext-pcie model leaves this interface unimplemented (``_run_cfg_extend_logic`` is
empty), so :class:`CfgExtWindow` adds it to one function of the model:

- the last capability of the function's hard capability list (the PCI Express
  capability at 0x70 in the model) gets ``window base`` as its next pointer;
- a configuration read of a register inside the window drives a one-cycle
  ``cfg_ext_read_received`` with ``cfg_ext_register_number`` (dword index) and
  ``cfg_ext_function_number``, then waits for ``cfg_ext_read_data_valid`` and returns
  ``cfg_ext_read_data`` (as the real block, a read carries no byte enables);
- a write drives a one-cycle ``cfg_ext_write_received`` with ``cfg_ext_write_data`` and
  ``cfg_ext_write_byte_enable``;
- one access at a time (a lock), and a read the user logic never answers raises
  :class:`CfgExtTimeout` after ``timeout_cycles``.

Every byte of the window comes from the RTL; Python supplies none.
"""

from cocotb.triggers import Lock, RisingEdge

__all__ = ["CfgExtWindow", "CfgExtTimeout"]


class CfgExtTimeout(Exception):
    """The user logic did not answer a cfg_ext read."""


class CfgExtWindow:
    """Hook a function of an ``UltraScalePlusPcieDevice`` so that its configuration
    registers ``base .. base + size - 1`` (bytes) are served over cfg_ext."""

    def __init__(self, device, function, base, size, timeout_cycles=64):
        if base % 4 or size % 4 or size <= 0:
            raise ValueError(f"cfg_ext window {base:#x}+{size:#x} must be whole dwords")
        self.device = device
        self.function = function
        self.first_reg = base // 4
        self.end_reg = (base + size) // 4
        self.timeout_cycles = timeout_cycles
        self.lock = Lock()
        self.reads = 0
        self.writes = 0

        for name in ("cfg_ext_read_received", "cfg_ext_write_received",
                     "cfg_ext_register_number", "cfg_ext_function_number",
                     "cfg_ext_write_data", "cfg_ext_write_byte_enable",
                     "cfg_ext_read_data", "cfg_ext_read_data_valid"):
            if getattr(device, name) is None:
                raise ValueError(f"device model has no {name} signal connected")

        # cocotbext-pcie 0.2.16 registers the AER and PCIe extended capabilities in the
        # legacy list too (at dwords 0x40 and 0x70, beyond legacy space, so no read ever
        # reaches them there); the last hard capability is the last one below 0x100.
        cap_list = function.capabilities
        legacy = [cap for cap in cap_list.list if cap.offset <= cap_list.end]
        if not legacy:
            raise ValueError("function has no capabilities to link the window to")
        last = legacy[-1]
        end = (last.offset + last.length) * 4
        if end > base:
            raise ValueError(f"window {base:#x} overlaps capability {last!r} (ends {end:#x})")
        if not (cap_list.start <= self.first_reg and self.end_reg - 1 <= cap_list.end):
            raise ValueError(f"window {base:#x}+{size:#x} outside the legacy capability area")
        last.next_cap = base
        self.linked_capability = last

        self._read_hard = function.read_capability_register
        self._write_hard = function.write_capability_register
        function.read_capability_register = self.read_capability_register
        function.write_capability_register = self.write_capability_register

    def _in_window(self, reg):
        return self.first_reg <= reg < self.end_reg

    async def read_capability_register(self, reg):
        if not self._in_window(reg):
            return await self._read_hard(reg)
        return await self.read(reg)

    async def write_capability_register(self, reg, data, mask):
        if not self._in_window(reg):
            await self._write_hard(reg, data, mask)
            return
        await self.write(reg, data, mask)

    def _drive(self, reg, data=0, byte_enable=0):
        dev = self.device
        dev.cfg_ext_register_number.value = reg
        dev.cfg_ext_function_number.value = self.function.function_num
        dev.cfg_ext_write_data.value = data
        dev.cfg_ext_write_byte_enable.value = byte_enable

    async def read(self, reg):
        """One cfg_ext read of dword register ``reg``: the RTL's answer."""
        dev = self.device
        clock = RisingEdge(dev.user_clk)
        async with self.lock:
            await clock
            self._drive(reg)
            dev.cfg_ext_read_received.value = 1
            await clock
            dev.cfg_ext_read_received.value = 0
            for _ in range(self.timeout_cycles):
                if dev.cfg_ext_read_data_valid.value == 1:
                    self.reads += 1
                    return int(dev.cfg_ext_read_data.value)
                await clock
            raise CfgExtTimeout(
                f"cfg_ext read of register {reg:#x} (byte {reg * 4:#x}): "
                f"cfg_ext_read_data_valid not asserted within {self.timeout_cycles} cycles")

    async def write(self, reg, data, byte_enable):
        """One cfg_ext write of dword register ``reg`` with ``byte_enable``."""
        dev = self.device
        clock = RisingEdge(dev.user_clk)
        async with self.lock:
            await clock
            self._drive(reg, data, byte_enable)
            dev.cfg_ext_write_received.value = 1
            await clock
            dev.cfg_ext_write_received.value = 0
            self.writes += 1
