"""Simulation helpers shared by the balloon tests: a bounded wait for a signal to clear,
command payloads, and virtqueue engine models on a CommandSignature (one that completes
in order, one that parks)."""

from collections import deque

from sim_util import stream_consumer, stream_put
from memballoon.hdl.virtqueue.interface import COMMAND_LANES
from memballoon.tb.command_words import command_beats


async def wait_until_clear(ctx, signal, timeout=10_000):
    """Wait for ``signal`` to be low, failing instead of hanging."""
    for _ in range(timeout):
        if not ctx.get(signal):
            return
        await ctx.tick()
    raise AssertionError(f"{signal!r} still high after {timeout} cycles")


def command_payloads(readable):
    """The ``CommandWords`` payloads of ``readable`` bytes (``tb/command_words.py``), with
    the unused lanes zero."""
    return [{"data": list(words) + [0] * (COMMAND_LANES - len(words)), "count": len(words),
             "last": last, "error": 0} for words, last in command_beats(readable)]


class EngineModel:
    """The virtqueue engine side of a ``CommandSignature``: submitted buffers go out as
    headers and word beats on two independent producers, results come back with
    backpressure.

    ``results[i]`` is ``(used_len, write_data, write_count)`` of buffer ``i``; a result
    before the last beat of its buffer was taken fails the test (interface.py: results
    are sent after the command's last word).
    """

    def __init__(self, port, rng, idle=0.3, backpressure=0.3):
        self._port = port
        self._rng = rng
        self._idle = idle
        self._backpressure = backpressure
        self._headers = deque()
        self._beats = deque()
        self._beat_counts = []          # beats of each submitted buffer
        self._beats_taken = 0
        self.results = []

    def submit(self, readable, writable, head=0, error_at=None):
        """One buffer; with ``error_at``, its data fails after that many word beats: an
        error beat ends it (C7) and it gets no result."""
        beats = command_payloads(readable)
        if error_at is not None:
            beats = beats[:error_at] + [{"data": [0] * COMMAND_LANES, "count": 0, "last": 1,
                                         "error": 1}]
        self._headers.append({"head": head, "readable": len(readable), "writable": writable})
        self._beats.extend(beats)
        self._beat_counts.append(len(beats))

    @property
    def submitted(self):
        return len(self._beat_counts)

    async def _produce(self, ctx, stream, queue, on_taken=None):
        while True:
            if not queue:
                await ctx.tick()
                continue
            await stream_put(ctx, stream, queue.popleft(), self._rng, self._idle)
            if on_taken:
                on_taken()

    def _beat_taken(self):
        self._beats_taken += 1

    def _result_taken(self, payload):
        index = len(self.results)
        assert index < self.submitted, "result without a buffer"
        assert self._beats_taken >= sum(self._beat_counts[:index + 1]), \
            f"result of buffer {index} before its last beat"
        self.results.append((payload.used_len, payload.write_data, payload.write_count))

    def background(self):
        """Testbenches to add with ``background=True``."""
        async def headers(ctx):
            await self._produce(ctx, self._port.header, self._headers)

        async def words(ctx):
            await self._produce(ctx, self._port.words, self._beats, self._beat_taken)
        return [headers, words, stream_consumer(self._port.result, self._result_taken,
                                                self._rng, self._backpressure)]

    async def wait_results(self, ctx, count=None, timeout=100_000):
        count = self.submitted if count is None else count
        for _ in range(timeout):
            if len(self.results) >= count:
                return
            await ctx.tick()
        raise AssertionError(f"{len(self.results)} of {count} results after {timeout} cycles")


class ParkingEngineModel(EngineModel):
    """A parking engine's side of ``CommandSignature(parking=True)`` (fromdevq, C6): a
    result with ``park`` set keeps its buffer; an unpark taken (ready while one is kept,
    with backpressure) sends the oldest kept buffer's header again with ``parked`` set,
    behind the headers already queued, as the engine's second walk does.

    ``results`` holds the completing results in the order they came and ``used`` the
    index of the buffer each completed (the order of ``submit``); ``changed[i] =
    (readable, writable)`` makes buffer ``i`` come back so (a driver that changed it while
    it was parked). A result before the last beat of its buffer, or a park of a buffer
    that came back, fails the test.
    """

    def __init__(self, port, rng, idle=0.3, backpressure=0.3):
        super().__init__(port, rng, idle, backpressure)
        self._buffers = []              # (readable, writable) of each submitted buffer
        self._due = deque()             # (buffer, parked, beats queued up to it) per header
        self._beats_queued = 0
        self.parked = deque()           # buffers kept, oldest first
        self.changed = {}
        self.used = []

    def submit(self, readable, writable):
        self._buffers.append((readable, writable))
        self._queue(len(self._buffers) - 1, parked=0)

    def _queue(self, index, parked):
        readable, writable = self.changed.get(index, self._buffers[index]) if parked \
            else self._buffers[index]
        beats = command_payloads(readable)
        self._headers.append({"head": index, "readable": len(readable), "writable": writable,
                              "parked": parked})
        self._beats.extend(beats)
        self._beats_queued += len(beats)
        self._due.append((index, parked, self._beats_queued))

    @property
    def submitted(self):
        return len(self._buffers)

    def _result_taken(self, payload):
        assert self._due, "result without a buffer"
        index, parked, beats = self._due.popleft()
        assert self._beats_taken >= beats, f"result of buffer {index} before its last beat"
        if payload.park:
            assert not parked, f"buffer {index} parked again"
            self.parked.append(index)
        else:
            self.results.append((payload.used_len, payload.write_data, payload.write_count))
            self.used.append(index)

    def background(self):
        unpark = self._port.unpark

        async def unparks(ctx):
            async for _, _, valid, ready in ctx.tick().sample(unpark.valid, unpark.ready):
                if valid and ready:
                    self._queue(self.parked.popleft(), parked=1)
                ctx.set(unpark.ready,
                        bool(self.parked) and self._rng.random() >= self._backpressure)
        return super().background() + [unparks]
