"""Where generation runs: the server reaches the model only through `SerialGenerator`.

One Engine is shared by every request. Requests take turns (a lock), and each runs in its own worker
thread that hands deltas to the event loop, so the loop stays free to accept and answer others. When
the consumer goes away (a streaming client disconnects), the worker closes the engine's iterator after
the current token. A scheduler with continuous batching can replace this class: it needs the same
`prepare` (validate eagerly) and `stream` (an async iterator of Deltas) methods.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Sequence

from ..engine import Delta, Engine, GenerationResult, SequenceOutput
from ..sampling import SamplingParams

_END = object()


class SerialGenerator:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()  # one sequence at a time: the engine keeps a single KV cache

    def prepare(self, prompt_ids: Sequence[int], params: SamplingParams) -> SequenceOutput:
        """Validate a request and set up its output side; raises before any output is sent."""
        return self.engine.start(prompt_ids, params)

    async def stream(self, prompt_ids: Sequence[int], out: SequenceOutput) -> AsyncIterator[Delta]:
        """The deltas of one sequence, produced in a worker thread; closing this stops generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening
                stop.set()

        def work():
            try:
                with self.lock:
                    if stop.is_set():
                        return
                    deltas = self.engine.run(prompt_ids, out)
                    try:
                        for delta in deltas:
                            put(delta)
                            if stop.is_set():
                                break
                    finally:
                        deltas.close()
            except BaseException as e:  # handed to the request, which turns it into an error response
                put(e)
            finally:
                put(_END)

        threading.Thread(target=work, name="gptchat-generate", daemon=True).start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    async def generate(self, prompt_ids: Sequence[int], out: SequenceOutput) -> GenerationResult:
        async for _ in self.stream(prompt_ids, out):
            pass
        return out.result()
