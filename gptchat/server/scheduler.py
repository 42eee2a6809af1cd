"""Continuous batching: one thread owns the model and decodes every running request together.

    prepare() -> stream()/generate()  ->  waiting  ->  prefilling  ->  running batch  ->  done or cancelled
                 (event loop)             (bounded)     (one chunk      (one decode step
                                                         per step)       for all rows)

Each turn of the scheduler loop: requests whose client left are dropped (from the queue or from the
batch, freeing their slot within one step); waiting requests are admitted while fewer than
`max_concurrency` are active; one chunk of one admitted prompt is prefilled, alone, into its own KV
cache, and when its prompt is done its first token is sampled and its cache joins the batch
(`engine.DecodeBatch`); then every row of the batch decodes one token, and finished rows leave.
Each request keeps its own SamplingParams and RNG (`engine.SequenceOutput`), so a seeded or greedy
request gives the same text whichever others share its batch.

The event loop talks to the thread through a condition variable (new work, cancellation) and each
request's asyncio.Queue (its deltas, handed over with call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import AsyncIterator, Sequence

import torch

from ..engine import PREFILL_CHUNK, DecodeBatch, Delta, Engine, GenerationResult, SequenceOutput
from ..model import KVCache
from ..sampling import SamplingParams
from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("gptchat.server")

_END = object()


def queue_full() -> APIError:
    return APIError(429, "The server is busy: too many requests are queued. Retry in a moment.",
                    type="rate_limit_exceeded", code="rate_limit_exceeded")


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", type="server_error", code="server_shutting_down")


class Request:
    """One sequence on its way through the scheduler, and the queue its deltas go to."""

    def __init__(self, prompt_ids: list[int], out: SequenceOutput, loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.out, self.loop = prompt_ids, out, loop
        self.deltas: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the event loop when the consumer goes away
        self.cache: KVCache | None = None  # its own cache while prefilling
        self.filled = 0  # prompt tokens prefilled so far
        self.queued_at = time.monotonic()
        self.last_token_at: float | None = None

    def emit(self, item) -> None:
        """Hand a Delta, an exception or _END to the consumer (from the scheduler thread)."""
        try:
            self.loop.call_soon_threadsafe(self.deltas.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self.cancelled = True


class Scheduler:
    """The server's generator: `prepare`, `stream`, `generate`, backed by one batching thread."""

    def __init__(self, engine: Engine, *, max_concurrency: int = 8, max_queue: int = 64,
                 metrics: Metrics | None = None):
        self.engine = engine
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.metrics = metrics or Metrics()
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self.batch = DecodeBatch(engine.model, engine.decoder, engine.batch_decoder)
        self.rows: dict[SequenceOutput, Request] = {}  # the batch's rows -> their requests
        self.closing_at: float | None = None  # after this time, whatever still runs is ended with an error
        self.stopped = False
        self.metrics.gauge("gptchat_queue_depth", "Sequences waiting for a place in the batch.",
                           lambda: len(self.waiting))
        self.metrics.gauge("gptchat_running_requests", "Sequences in the running batch, prefilling included.",
                           lambda: self.running)
        self.thread = threading.Thread(target=self._loop, name="gptchat-scheduler", daemon=True)
        self.thread.start()

    @property
    def running(self) -> int:
        return len(self.rows) + len(self.prefilling)

    # -- the interface the routes use (on the event loop) --

    def prepare(self, prompt_ids: Sequence[int], params: SamplingParams) -> SequenceOutput:
        """Validate a request and set up its output side; raises (4xx/429/503) before any output is sent."""
        self._check_room()
        return self.engine.start(prompt_ids, params)

    async def stream(self, prompt_ids: Sequence[int], out: SequenceOutput) -> AsyncIterator[Delta]:
        """The deltas of one sequence as the batch produces them; closing this removes it from the batch."""
        request = Request(list(prompt_ids), out, asyncio.get_running_loop())
        with self.cond:
            self._check_room()
            self.waiting.append(request)
            self.cond.notify()
        try:
            while (item := await request.deltas.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True  # a no-op when it finished; otherwise it leaves at the next step
            with self.cond:
                self.cond.notify()

    async def generate(self, prompt_ids: Sequence[int], out: SequenceOutput) -> GenerationResult:
        async for _ in self.stream(prompt_ids, out):
            pass
        return out.result()

    def _check_room(self) -> None:
        if self.closing_at is not None:
            raise shutting_down()
        if len(self.waiting) + self.running >= self.max_concurrency + self.max_queue:
            raise queue_full()

    # -- lifecycle --

    def begin_shutdown(self, grace: float) -> None:
        """Refuse new requests; let the running ones finish for `grace` seconds, then end them with an error."""
        with self.cond:
            if self.closing_at is None:
                self.closing_at = time.monotonic() + grace
            self.cond.notify()

    def close(self) -> None:
        """Stop the thread (ending what still runs with an error)."""
        with self.cond:
            self.closing_at = time.monotonic()
            self.stopped = True
            self.cond.notify()
        self.thread.join(30)

    # -- the scheduler thread --

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self.waiting or self.prefilling or self.rows or self.stopped):
                        self.cond.wait(timeout=1.0 if self.closing_at else None)
                    self._admit()
                if self.closing_at is not None and time.monotonic() >= self.closing_at:
                    self._fail_all(shutting_down())
                    if self.stopped:
                        return
                    continue
                try:
                    self._drop_cancelled()
                    if self.prefilling:
                        self._prefill_chunk(self.prefilling[0])
                    if self.rows:
                        for out, delta in self.batch.step():
                            self._deliver(self.rows[out], delta)
                except Exception as e:  # a bug or an out-of-memory: fail what was running, keep serving
                    log.exception("generation failed", exc_info=e)
                    self._fail_all(e, waiting_too=False)

    def _admit(self) -> None:
        while self.waiting and self.running < self.max_concurrency:
            request = self.waiting.popleft()
            if not request.cancelled:
                self.prefilling.append(request)
        if any(r.cancelled for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.cancelled)

    def _drop_cancelled(self) -> None:
        gone = [i for i, out in enumerate(self.batch.outs) if self.rows[out].cancelled]
        if gone:
            for i in gone:
                self._done(self.rows.pop(self.batch.outs[i]))
            self.batch.leave(gone)
        with self.cond:
            for request in [r for r in self.prefilling if r.cancelled]:
                self.prefilling.remove(request)

    def _prefill_chunk(self, request: Request) -> None:
        """Prefill the next chunk of a joining prompt; at its end, sample the first token and join the batch."""
        ids = request.prompt_ids
        if request.cache is None:
            request.cache = self.engine.model.new_cache(1, len(ids))
        chunk = ids[request.filled : request.filled + PREFILL_CHUNK]
        logits = self.engine.prefill_chunk(request.cache, chunk)
        request.filled += len(chunk)
        if request.filled < len(ids):
            return
        with self.cond:
            self.prefilling.popleft()
        delta = request.out.step(logits)
        if not delta.finish_reason:
            self.rows[request.out] = request
            self.batch.join(request.cache, torch.ones(1, len(ids), dtype=torch.bool), [request.out], [delta])
        request.cache = None
        self._deliver(request, delta)

    def _deliver(self, request: Request, delta: Delta) -> None:
        now = time.monotonic()
        if request.last_token_at is None:
            self.metrics.first_token(now - request.queued_at)
        else:
            self.metrics.next_token(now - request.last_token_at)
        request.last_token_at = now
        request.emit(delta)
        if delta.finish_reason:
            self.rows.pop(request.out, None)
            self._done(request)
            request.emit(_END)

    def _done(self, request: Request) -> None:
        self.metrics.sequence_done(request.out.prompt_len, len(request.out.sampler.generated))

    def _fail_all(self, error: BaseException, waiting_too: bool = True) -> None:
        """End every running (and waiting) request with `error` and empty the batch."""
        with self.cond:
            failed = list(self.rows.values()) + list(self.prefilling) + (list(self.waiting) if waiting_too else [])
            self.prefilling.clear()
            if waiting_too:
                self.waiting.clear()
        self.rows.clear()
        self.batch = DecodeBatch(self.engine.model, self.engine.decoder, self.engine.batch_decoder)
        for request in failed:
            self._done(request)
            request.emit(error)
            request.emit(_END)
