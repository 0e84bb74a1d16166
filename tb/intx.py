"""The PCIE4 block's legacy interrupt interface (INTx) for cocotbext-pcie.

AMD PG213, "Legacy Interrupt Mode": the user application asserts ``cfg_interrupt_int``
(bit 0 is INTA) together with ``cfg_interrupt_pending``; the core answers with one cycle
of ``cfg_interrupt_sent`` and, if the command register's Interrupt Disable bit is 0, sends
Assert_INTA. INTA must stay asserted until that answer. When the user deasserts it the
core sends Deassert_INTA, answered by ``cfg_interrupt_sent`` a second time.
``cfg_interrupt_pending`` drives the Status register's Interrupt Status bit.

cocotbext-pcie 0.2.16's UltraScale+ model leaves this interface a comment (``# INTx`` in
``usp_model.py``), and its root complex cannot take an INTx message: a ``Tlp`` carries no
message code (``pack_header`` raises on a message) and a bridge's ``match_tlp`` raises
on the locally routed Assert_INTx. So :class:`IntxWire` plays the hard IP's part and
keeps the virtual wire itself, where the IP would send the messages:

- from the end of the user logic's power-on reset on, each change of
  ``cfg_interrupt_int[0]`` is taken once and answered ``latency`` cycles later by a
  one-cycle ``cfg_interrupt_sent``; a change before that answer breaks PG213's rule and
  is counted in ``protocol_errors`` (``tb/harness.py`` fails the test on it);
- ``asserted`` is INTA as the root complex sees it: taken high and Interrupt Disable
  clear (the IP sends Assert_INTA only then; setting Interrupt Disable while INTA is
  asserted sends Deassert_INTA, as PCIe asks of INTx emulation, and clearing it again
  sends Assert_INTA). Each change is one message, logged in ``messages`` as
  ``(name, time in ns)``; :meth:`wait_level` awaits a level;
- configuration space: Interrupt Pin reads INTA, and the Status register's Interrupt
  Status bit reads ``cfg_interrupt_pending[0]`` as it is at the read.

The driver's side of the wire is the simulation backend's ``wait_intx``
(``sw/backend_sim.py``).
"""

import cocotb
from cocotb.triggers import Event, FallingEdge, First, RisingEdge, Timer, ValueChange
from cocotb.utils import get_sim_time

from memballoon import constants as c

__all__ = ["IntxWire", "ASSERT_INTA", "DEASSERT_INTA"]

ASSERT_INTA = "Assert_INTA"
DEASSERT_INTA = "Deassert_INTA"


class IntxWire:
    """INTA of ``function`` (of an ``UltraScalePlusPcieDevice`` ``device``), answered and
    kept as the PCIE4 block does."""

    def __init__(self, device, function, latency=4):
        for name in ("cfg_interrupt_int", "cfg_interrupt_pending", "cfg_interrupt_sent"):
            if getattr(device, name) is None:
                raise ValueError(f"device model has no {name} signal connected")
        self.device = device
        self.function = function
        self.latency = latency
        self.asserted = False
        self.messages = []
        self.edges = 0
        self.protocol_errors = 0
        self._taken = 0
        self._changed = Event()

        function.interrupt_pin = c.PCI_INTERRUPT_PIN_INTA
        self._read_config = function.read_config_register
        self._write_config = function.write_config_register
        function.read_config_register = self.read_config_register
        function.write_config_register = self.write_config_register
        cocotb.start_soon(self._run())

    @property
    def asserts(self):
        """Assert_INTA messages so far."""
        return sum(name == ASSERT_INTA for name, _ in self.messages)

    def _inta(self):
        return int(self.device.cfg_interrupt_int.value) & 1

    async def read_config_register(self, reg):
        if reg == c.PCI_COMMAND // 4:
            pending = int(self.device.cfg_interrupt_pending.value) & 1
            self.function.interrupt_status = bool(pending)
        return await self._read_config(reg)

    async def write_config_register(self, reg, data, mask):
        await self._write_config(reg, data, mask)
        self._update()              # Interrupt Disable may have changed

    def _update(self):
        asserted = bool(self._taken) and not self.function.interrupt_disable
        if asserted != self.asserted:
            self.asserted = asserted
            self.messages.append((ASSERT_INTA if asserted else DEASSERT_INTA,
                                  get_sim_time("ns")))
            self._changed.set()

    async def _run(self):
        dev = self.device
        clock = RisingEdge(dev.user_clk)
        # The DUT outlives a cocotb test, the model does not: until the user logic's reset
        # that each new model starts with, INTA is the previous test's.
        if not dev.user_reset.value:
            await RisingEdge(dev.user_reset)
        await FallingEdge(dev.user_reset)
        while True:
            await clock
            if self._inta() == self._taken:
                await ValueChange(dev.cfg_interrupt_int)
                continue
            self._taken = self._inta()
            self.edges += 1
            self._update()
            for _ in range(self.latency):
                await clock
                if self._inta() != self._taken:
                    self.protocol_errors += 1
            dev.cfg_interrupt_sent.value = 1
            await clock
            dev.cfg_interrupt_sent.value = 0

    async def wait_level(self, level, timeout):
        """Return True once ``asserted`` is ``level`` (at once if it is), False after
        ``timeout`` simulated seconds."""
        deadline = get_sim_time("ps") + timeout * 1e12
        while self.asserted != level:
            remaining = round(deadline - get_sim_time("ps"))
            if remaining <= 0:
                return False
            self._changed.clear()
            await First(self._changed.wait(), Timer(remaining, "ps"))
        return True
