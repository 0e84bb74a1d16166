"""A host that answers the device's memory reads late, as a server does (cocotbext-pcie).

cocotbext-pcie 0.2.16's ``RootComplex`` answers a memory read inside its receive handler
(``handle_mem_read_tlp``): the completions leave at once. A server's root complex answers
a device's read after roughly 400-1000 ns (Neugebauer et al., "Understanding PCIe
performance for end host networking", SIGCOMM 2018: about 500 ns median on Xeon), and
requests with different latencies complete out of order. :class:`HostLatency` hooks the
root complex's ``MEM_READ`` and ``MEM_READ_64`` handlers so that:

- on arrival, the root complex's own handler makes the completions (UR for an address no
  region holds, CA for a failed read, split at RCB and max payload as the model does),
  its sends collected. The data is therefore what memory holds when the read arrives:
  the root complex takes TLPs one at a time in link order, so every posted write the
  device sent before the read is in it (read-after-write), none sent after it (a real
  host may let a later write pass the read; that freedom is not modelled);
- each request draws its latency (``latency``, ns: a number, a ``(min, max)`` range drawn
  uniformly per request from ``rng``, or a function of the request TLP) and a task per
  request sends its completions once that latency has passed, in their order. The
  receive handler returns at once, so later requests are not held up and complete first
  when their latency is shorter;
- ``bandwidth`` (bytes per ns, None: unlimited) caps the completion path: each
  completion occupies it for its payload over ``bandwidth``, in the order completions
  come due, and waits for it to be free (the link model adds its own serialisation);
- :meth:`complete` sends other answers to a request after its latency: the scoreboard's
  injected UR and CA completions (``tb/scoreboard.py``) go out as the host's own would.

Whoever hooks the read handlers after the harness (``SimRig``) sees each request on
arrival, before its latency.
"""

import cocotb
from cocotb.triggers import Timer
from cocotb.utils import get_sim_time
from cocotbext.pcie.core import RootComplex
from cocotbext.pcie.core.tlp import TlpType

__all__ = ["HostLatency"]

PS_PER_NS = 1000


class _CollectedSends:
    """The root complex seen by its own read handler, with ``send`` collecting TLPs."""

    def __init__(self, rc):
        self._rc = rc
        self.tlps = []

    def __getattr__(self, name):
        return getattr(self._rc, name)

    async def send(self, tlp):
        self.tlps.append(tlp)


class HostLatency:
    """Memory reads of root complex ``rc`` answered after ``latency`` ns (see the module
    docstring); ``pending`` counts the reads whose answer is not sent in full yet."""

    def __init__(self, rc, rng, latency=0, bandwidth=None):
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive bytes per ns, not {bandwidth}")
        self.rc = rc
        self.rng = rng
        self.latency = latency
        self.bandwidth = bandwidth
        self.pending = 0
        self._path_free_ps = 0
        for fmt_type in (TlpType.MEM_READ, TlpType.MEM_READ_64):
            rc.register_rx_tlp_handler(fmt_type, self.handle_mem_read_tlp)

    def describe(self):
        """The settings in words, for the log."""
        latency = self.latency
        if callable(latency):
            text = "per request by a test"
        elif isinstance(latency, tuple):
            text = f"{latency[0]}-{latency[1]} ns, uniform per request"
        else:
            text = f"{latency} ns"
        cap = f", completions capped at {self.bandwidth} B/ns" if self.bandwidth else ""
        return f"memory read latency {text}{cap}"

    def _latency_ps(self, tlp):
        latency = self.latency
        if callable(latency):
            latency = latency(tlp)
        elif isinstance(latency, tuple):
            latency = self.rng.uniform(*latency)
        return round(latency * PS_PER_NS)

    async def handle_mem_read_tlp(self, tlp):
        """The root complex's answer, made now and sent after the request's latency."""
        collected = _CollectedSends(self.rc)
        await RootComplex.handle_mem_read_tlp(collected, tlp)
        self.complete(tlp, collected.tlps)

    def complete(self, tlp, completions):
        """Send ``completions`` (answers to request ``tlp``, in order) after its latency."""
        due = get_sim_time("ps") + self._latency_ps(tlp)
        self.pending += 1
        cocotb.start_soon(self._send(due, completions))

    async def _send(self, due, completions):
        await self._until(due)
        for cpl in completions:
            if self.bandwidth:
                start = max(get_sim_time("ps"), self._path_free_ps)
                self._path_free_ps = start + round(
                    cpl.get_payload_size() * PS_PER_NS / self.bandwidth)
                await self._until(start)
            await self.rc.send(cpl)
        self.pending -= 1

    @staticmethod
    async def _until(when_ps):
        wait = round(when_ps - get_sim_time("ps"))
        if wait > 0:
            await Timer(wait, "ps")
