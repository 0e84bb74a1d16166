"""The committed copy of the balloon bitmap, so that a command that faults changes
nothing (C7)."""

from amaranth.hdl import Cat, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .bitmap import (BANKS, READ_LATENCY, WORD_BITS, row_bits_of, scan_request_layout,
                     written_layout)

#: Journal entries per bank: the rows the uncommitted commands wrote (a run of writes to
#: one row is one entry). 512 x (row + 64 bits) is two BRAM36 per bank.
JOURNAL_DEPTH = 512
#: Commands executed and not yet committed, at most: the used-ring batch of the
#: virtqueue engine (8) and the results on their way to it fit.
MAX_UNCOMMITTED = 16


class CommittedBitmap(wiring.Component):
    """Keeps, beside the working bitmap that commands change as their words arrive, a copy
    of what both sides last agreed on (C7): the bitmap as of the last command whose used
    element was published. A clear (C9) writes both copies; the owner resets this block
    with it (for two clocks, past the last page write of the pipeline) so that nothing
    is uncommitted any more.

    Every page write of the working bitmap is journaled (row and new word, per bank; a run
    of writes to one row within a command is one entry) until its command commits; then
    the journal entries up to that command's boundary are copied into the committed
    banks, one per bank and clock. Clears and fills (C8, C9) are host actions that are
    committed at once: they are written into both copies.

    An abort (a ring fault stopped todevq with commands unpublished) waits until every
    committed entry is copied, then writes the committed copy back into the working
    bitmap, row by row (two clocks a row: ``pages / 64`` clocks, rare), and forgets the
    uncommitted commands.

    A command whose writes overflow the journal is still exact: the journal stops for it,
    its boundary holds page requests (so no later command changes the working bitmap),
    and its commit copies the whole working bitmap (``pages / 128`` clocks). Only
    commands writing more than ``journal_depth`` rows of one bank pay that.

    Attributes
    ----------
    written : In(data.ArrayLayout(written_layout(row_bits), BANKS))
        The working bitmap's writes (``Bitmap.written``).
    boundary : In(1)
        Pulse: the command being executed has all its page writes in the bitmap.
    boundary_ready : Out(1)
        Room for one more uncommitted command.
    commit : In(1)
        Pulse: the oldest uncommitted command is committed (its used element published);
        taken only with ``commit_ready``.
    commit_ready : Out(1)
        A commit is taken this clock (not while the whole bitmap is being copied).
    abort : In(1)
        Pulse: drop every uncommitted command (C7); ``busy`` until the working bitmap is
        restored.
    hold : Out(1)
        Page requests must wait (``Bitmap.hold``).
    busy : Out(1)
        An abort is pending or running.
    drained : Out(1)
        No command is uncommitted and the committed copy is complete: it equals the
        working bitmap (a fill may start).
    scan, scan_data :
        Whole rows of the working bitmap (``Bitmap.scan``, ``Bitmap.scan_data``).
    read : In(stream.Signature(row_bits + 1))
        Read a committed word (management, C10): taken once every committed entry is in
        the copy (and not while the copy is taken whole or written back), so that it
        shows exactly the commands committed so far.
    read_data : Out(stream.Signature(WORD_BITS, always_ready=True))
        The word, in the cycle after the read was taken; bit ``i`` = page
        ``WORD_BITS * word + i``.
    """

    def __init__(self, pages, journal_depth=JOURNAL_DEPTH, max_uncommitted=MAX_UNCOMMITTED):
        if journal_depth & (journal_depth - 1):
            raise ValueError(f"journal_depth must be a power of two, not {journal_depth}")
        self._rows = pages // (WORD_BITS * BANKS)
        self._row_bits = row_bits_of(pages)
        self._journal_depth = journal_depth
        self._max_uncommitted = max_uncommitted
        super().__init__({
            "written": In(data.ArrayLayout(written_layout(self._row_bits), BANKS)),
            "boundary": In(1),
            "boundary_ready": Out(1),
            "commit": In(1),
            "commit_ready": Out(1),
            "abort": In(1),
            "hold": Out(1),
            "busy": Out(1),
            "drained": Out(1),
            "scan": Out(stream.Signature(scan_request_layout(self._row_bits))),
            "scan_data": In(stream.Signature(data.ArrayLayout(WORD_BITS, BANKS),
                                             always_ready=True)),
            "read": In(stream.Signature(self._row_bits + 1)),
            "read_data": Out(stream.Signature(WORD_BITS, always_ready=True)),
        })

    def elaborate(self, platform):
        m = Module()
        rows, row_bits, depth = self._rows, self._row_bits, self._journal_depth
        pointer_bits = depth.bit_length()           # one more than an index: full vs empty
        entry = data.StructLayout({"row": row_bits, "data": WORD_BITS})

        scan_copy = Signal()                # the whole working bitmap goes into the copy
        forget = Signal()                   # the copy is back in the working bitmap
        scan_row = Signal(row_bits)         # the next row to request
        # The row of the scan data arriving: scan_row as it was READ_LATENCY clocks ago.
        requested_rows = [scan_row]
        for age in range(READ_LATENCY):
            requested_rows.append(Signal(row_bits, name=f"requested_row{age}"))
            m.d.sync += requested_rows[-1].eq(requested_rows[-2])
        data_row = requested_rows[-1]
        last_arriving = Signal(range(READ_LATENCY))  # clocks left in "Copy-Last"

        # --- Command boundaries: each bank's journal write pointer after the command ------
        mark = data.StructLayout({"ends": data.ArrayLayout(pointer_bits, BANKS),
                                  "overflowed": 1})
        boundaries = SyncFIFOBuffered(width=mark.size, depth=self._max_uncommitted)
        m.submodules.boundaries = ResetInserter(forget)(boundaries)
        boundary_in = Signal(mark)
        boundary_out = Signal(mark)
        # The boundary is taken a clock late, after the last write it follows is journaled.
        boundary = Signal()
        committing = Signal()               # a commit pops a boundary this clock
        overflow = Signal()                 # the current command's writes overflowed
        overflow_held = Signal()            # an overflowed command waits for its commit
        m.d.sync += boundary.eq(self.boundary)
        m.d.comb += [
            boundaries.w_data.eq(boundary_in),
            boundaries.w_en.eq(boundary),
            boundary_out.eq(boundaries.r_data),
            boundaries.r_en.eq(committing),
            boundary_in.overflowed.eq(overflow),
            self.boundary_ready.eq(boundaries.w_rdy),
        ]
        with m.If(boundary & overflow):
            m.d.sync += [overflow.eq(0), overflow_held.eq(1)]

        # --- Journal and committed banks, per bank -----------------------------------------
        drain_busy, copy_reads = [], []
        host_read = Signal()                # a management read uses the read ports
        for bank in range(BANKS):
            journal = Memory(shape=entry, depth=depth, init=[])
            copy = Memory(shape=WORD_BITS, depth=rows, init=[])
            m.submodules[f"journal{bank}"] = journal
            m.submodules[f"copy{bank}"] = copy
            journal_write = journal.write_port()
            journal_read = journal.read_port()
            copy_write = copy.write_port()
            copy_read = copy.read_port()
            copy_reads.append(copy_read)
            m.d.comb += copy_read.addr.eq(Mux(host_read, self.read.payload[1:], scan_row))

            write_ptr = Signal(pointer_bits, name=f"write_ptr{bank}")
            commit_ptr = Signal(pointer_bits, name=f"commit_ptr{bank}")
            drain_ptr = Signal(pointer_bits, name=f"drain_ptr{bank}")
            last_row = Signal(row_bits, name=f"last_row{bank}")
            tail_open = Signal(name=f"tail_open{bank}")     # the last entry is this command's

            # Journal writes: a run of one row within a command overwrites its entry.
            written = self.written[bank]
            same_run = tail_open & (written.row == last_row)
            full = (write_ptr - drain_ptr)[:pointer_bits] == depth
            journaled = written.valid & written.journal & ~overflow
            m.d.comb += [
                journal_write.data.row.eq(written.row),
                journal_write.data.data.eq(written.data),
                boundary_in.ends[bank].eq(write_ptr),
            ]
            with m.If(journaled & same_run):
                m.d.comb += [journal_write.en.eq(1), journal_write.addr.eq(write_ptr - 1)]
            with m.Elif(journaled & ~full):
                m.d.comb += [journal_write.en.eq(1), journal_write.addr.eq(write_ptr)]
                m.d.sync += [write_ptr.eq(write_ptr + 1), last_row.eq(written.row),
                             tail_open.eq(1)]
            with m.Elif(journaled):
                m.d.sync += overflow.eq(1)
            with m.If(boundary):
                m.d.sync += tail_open.eq(0)

            # A commit moves the commit pointer; the drain copies the entries up to it.
            with m.If(committing & ~boundary_out.overflowed):
                m.d.sync += commit_ptr.eq(boundary_out.ends[bank])
            drain_read = Signal(name=f"drain_read{bank}")       # entry on the read port
            drain_pending = Signal(name=f"drain_pending{bank}")  # entry waiting to be copied
            drain_entry = Signal(entry, name=f"drain_entry{bank}")
            draining = (drain_ptr != commit_ptr) & ~drain_read & ~drain_pending
            m.d.comb += journal_read.addr.eq(drain_ptr[:pointer_bits - 1])
            with m.If(draining):
                m.d.sync += drain_ptr.eq(drain_ptr + 1)
            m.d.sync += drain_read.eq(draining)
            with m.If(drain_read):
                m.d.sync += [drain_entry.eq(journal_read.data), drain_pending.eq(1)]
            drain_busy.append(drain_read | drain_pending | (drain_ptr != commit_ptr))

            # The committed bank's writes: clears and fills first (host actions, committed
            # at once), then the whole-bitmap copy, then the drain.
            direct = written.valid & ~written.journal
            with m.If(direct):
                m.d.comb += [copy_write.en.eq(1), copy_write.addr.eq(written.row),
                             copy_write.data.eq(written.data)]
            with m.Elif(scan_copy & self.scan_data.valid):
                m.d.comb += [copy_write.en.eq(1), copy_write.addr.eq(data_row),
                             copy_write.data.eq(self.scan_data.payload[bank])]
            with m.Elif(drain_pending):
                m.d.comb += [copy_write.en.eq(1), copy_write.addr.eq(drain_entry.row),
                             copy_write.data.eq(drain_entry.data)]
                m.d.sync += drain_pending.eq(0)

            with m.If(scan_copy | forget):
                # The copy holds everything journaled (or the working bitmap holds the
                # copy): no entry is left to drain.
                m.d.sync += [commit_ptr.eq(write_ptr), drain_ptr.eq(write_ptr),
                             drain_read.eq(0), drain_pending.eq(0), tail_open.eq(0)]

        # --- Commits, the whole-bitmap copy and the abort --------------------------------
        abort_pending = Signal()
        with m.If(self.abort):
            m.d.sync += abort_pending.eq(1)
        scan_taken = self.scan.valid & self.scan.ready

        with m.FSM() as fsm:
            with m.State("Run"):
                m.d.comb += [
                    self.commit_ready.eq(boundaries.r_rdy),
                    committing.eq(self.commit & boundaries.r_rdy),
                ]
                with m.If(committing & boundary_out.overflowed):
                    m.d.sync += scan_row.eq(0)
                    m.next = "Copy"
                with m.Elif(abort_pending & ~Cat(*drain_busy).any()):
                    m.d.sync += scan_row.eq(0)
                    m.next = "Restore-Read"

            with m.State("Copy"):
                # The working bitmap holds exactly the commands up to this one: later ones
                # are held.
                m.d.comb += [
                    scan_copy.eq(1),
                    self.scan.valid.eq(1),
                    self.scan.payload.row.eq(scan_row),
                    self.scan.payload.write.eq(0),
                ]
                with m.If(scan_taken):
                    m.d.sync += [scan_row.eq(scan_row + 1), last_arriving.eq(READ_LATENCY - 1)]
                    with m.If(scan_row == rows - 1):
                        m.next = "Copy-Last"

            with m.State("Copy-Last"):
                m.d.comb += scan_copy.eq(1)         # the last rows' words arrive
                m.d.sync += last_arriving.eq(last_arriving - 1)
                with m.If(last_arriving == 0):
                    m.d.sync += overflow_held.eq(0)
                    m.next = "Run"

            with m.State("Restore-Read"):
                m.next = "Restore-Write"            # the committed row is read

            with m.State("Restore-Write"):
                m.d.comb += [
                    self.scan.valid.eq(1),
                    self.scan.payload.row.eq(scan_row),
                    self.scan.payload.write.eq(1),
                ]
                for bank, copy_read in enumerate(copy_reads):
                    m.d.comb += self.scan.payload.data[bank].eq(copy_read.data)
                with m.If(scan_taken):
                    m.d.sync += scan_row.eq(scan_row + 1)
                    with m.If(scan_row == rows - 1):
                        m.d.comb += forget.eq(1)
                        m.d.sync += [abort_pending.eq(0), overflow.eq(0),
                                     overflow_held.eq(0)]
                        m.next = "Run"
                    with m.Else():
                        m.next = "Restore-Read"

        # --- Management reads of the committed copy ----------------------------------------
        read_bank = Signal()
        m.d.sync += [read_bank.eq(self.read.payload[0]), self.read_data.valid.eq(host_read)]
        m.d.comb += [
            self.read.ready.eq(fsm.ongoing("Run") & ~Cat(*drain_busy).any()),
            host_read.eq(self.read.valid & self.read.ready),
            self.read_data.payload.eq(Mux(read_bank, copy_reads[1].data, copy_reads[0].data)),
        ]

        m.d.comb += [
            self.hold.eq(overflow_held | abort_pending),
            self.busy.eq(abort_pending),
            self.drained.eq(~boundaries.r_rdy & ~Cat(*drain_busy).any() & ~overflow_held &
                            ~abort_pending),
        ]
        return m
