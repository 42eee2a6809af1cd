"""The routes of the OpenAI-compatible server.

    POST /v1/chat/completions   messages -> reply, streamed (SSE) or whole
    POST /v1/completions        prompt text -> continuation, streamed or whole
    GET  /v1/models             the one model served
    POST /tokenize              text or messages -> token ids
    GET  /metrics               Prometheus text: requests, tokens, latencies, queue and batch (metrics.py)
    GET  /health                {"status": "ok"}, public
    GET  /                      the web chat UI (static files, public); its API is /api (conversations.py)

Generation goes through `app.state.generator` (a continuous-batching Scheduler): `prepare(prompt_ids,
params) -> SequenceOutput` validates, `stream(prompt_ids, out)` yields Deltas (closing it cancels) and
`generate(prompt_ids, out)` returns the GenerationResult.

A request is checked in full (model name, parameters, context room) before any output, so a client gets
a proper 4xx instead of a stream that dies. Nothing is truncated: a prompt plus max_tokens beyond the
context is refused with both counts.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..chat import prompt_ids as chat_prompt_ids
from ..checkpoints import LoadedModel
from ..engine import Engine, SequenceOutput
from . import errors
from .auth import APIKeyMiddleware
from .errors import APIError, from_exception
from .limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from .metrics import CONTENT_TYPE, Metrics, RequestCounter
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, Shape, TokenizeRequest, now, usage
from .scheduler import Scheduler
from .store import ConversationStore

STATIC = Path(__file__).parent / "static"


def event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events that always close their source, so a client that leaves stops generation."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple]:
    """(index, item) from several async iterators as items come; closing this closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async with aclosing(stream) as items:
                async for item in items:
                    await queue.put((i, item))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, StopAsyncIteration))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is StopAsyncIteration:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def client_gone(request: Request) -> None:
    """Return when the client of a (non-streaming) request has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


def create_app(lm: LoadedModel, *, model_name: str | None = None, api_key: str | None = None,
               max_tokens_cap: int | None = None, max_concurrency: int = 8, max_queue: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, cors_origins: Sequence[str] = (),
               store: ConversationStore | None = None, compile: bool = False) -> FastAPI:
    """The app. max_concurrency: sequences decoding together; max_queue: how many more may wait (then 429);
    conversations of the web chat go to `store` (default: one in memory, gone when the process ends);
    compile: running requests decode through the compiled steps, one for a lone request and one for a batch
    (built now if they are not cached)."""
    engine = Engine(lm, compile=compile)
    engine.prepare(batched=max_concurrency > 1)
    metrics = Metrics()
    generator = Scheduler(engine, max_concurrency=max_concurrency, max_queue=max_queue, metrics=metrics)
    served = model_name or lm.name
    started = now()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(generator.close)

    app = FastAPI(title="gptchat", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.generator, app.state.model_name = engine, generator, served
    app.state.metrics = metrics
    errors.install(app)
    # outermost last: CORS (answers preflights, which carry no key), counting, the key, the body limit
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestCounter, metrics=metrics)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    def check_model(name: str | None) -> None:
        """The served name or "default" (or none at all); anything else is a model we do not have."""
        if name is not None and name not in (served, "default"):
            raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found")

    def budget(req: SamplingFields, prompt_len: int, what: str) -> int:
        """The reply's token budget; refuse what cannot fit rather than truncate."""
        requested, ctx = req.requested_tokens(), engine.context_length
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        if requested is not None and max_tokens_cap and requested > max_tokens_cap:
            raise APIError(400, f"{param} is at most {max_tokens_cap} on this server (got {requested}).",
                           param=param, code="invalid_value")
        if requested is None and prompt_len >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {what} "
                           f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        if requested is not None and prompt_len + requested > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
                           f"completion). Please reduce the length of the {what} or completion.",
                           param=what, code="context_length_exceeded")
        if requested is not None:
            return requested
        return min(ctx - prompt_len, max_tokens_cap or ctx, req.default_max_tokens or ctx)

    async def complete(req: SamplingFields, prompt_ids: list[int], chat: bool, request: Request):
        what = "messages" if chat else "prompt"
        try:
            n_new = budget(req, len(prompt_ids), what)
            outs = [generator.prepare(prompt_ids, req.sampling_params(n_new, i)) for i in range(req.n)]
        except Exception as e:
            raise from_exception(e, what) from None
        shape = Shape(chat, served)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return SSEResponse(stream_events(shape, prompt_ids, outs, include_usage, what),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        work = asyncio.ensure_future(asyncio.gather(*(collect(prompt_ids, out) for out in outs)))
        left = asyncio.ensure_future(client_gone(request))
        await asyncio.wait((work, left), return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        if not work.done():  # nobody is waiting for the answer: free the batch rows now
            work.cancel()
            return Response(status_code=499)
        try:
            collected = work.result()
        except Exception as e:
            raise from_exception(e, what) from None
        results = [r for r, _ in collected]
        use = usage(len(prompt_ids), sum(r.completion_tokens for r in results))
        logprobs = [lp for _, lp in collected] if outs[0].logprobs else None
        return shape.response([r.text for r in results], [r.finish_reason for r in results], use, logprobs)

    async def collect(prompt_ids: list[int], out: SequenceOutput):
        """Run one choice to its end (alongside the others: they share the batch); its result and logprobs."""
        logprobs = []
        async with aclosing(generator.stream(prompt_ids, out)) as deltas:
            async for d in deltas:
                logprobs += d.logprobs or []
        return out.result(), logprobs

    async def stream_events(shape: Shape, prompt_ids: list[int], outs: list[SequenceOutput],
                            include_usage: bool, what: str) -> AsyncIterator[str]:
        """OpenAI's chunks, the n choices' interleaved as they are decoded (together, in the batch), then usage
        if asked; an error ends the stream in-band."""
        try:
            if shape.chat:
                for i in range(len(outs)):
                    yield event(shape.chunk(i, None, role=True, with_usage=include_usage))
            offsets = [0] * len(outs)  # legacy logprobs count text offsets through each whole choice
            async with aclosing(merged([generator.stream(prompt_ids, out) for out in outs])) as deltas:
                async for i, d in deltas:
                    lp = shape.logprobs(d.logprobs, offsets[i]) if d.logprobs else None
                    offsets[i] += sum(len(e["token"]) for e in d.logprobs or ())
                    if shape.chat:
                        if d.text or lp:
                            yield event(shape.chunk(i, d.text, with_usage=include_usage, logprobs=lp))
                        if d.finish_reason:
                            yield event(shape.chunk(i, None, d.finish_reason, with_usage=include_usage))
                    elif d.text or d.finish_reason or lp:
                        yield event(shape.chunk(i, d.text, d.finish_reason, with_usage=include_usage, logprobs=lp))
            if include_usage:
                completion_tokens = sum(out.result().completion_tokens for out in outs)
                yield event(shape.usage_chunk(usage(len(prompt_ids), completion_tokens)))
        except Exception as e:
            yield event(from_exception(e, what).body())
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        req.refuse_unsupported()
        try:
            ids = chat_prompt_ids(engine, [m.as_dict() for m in req.messages])
        except Exception as e:
            raise from_exception(e) from None
        return await complete(req, ids, chat=True, request=request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        req.refuse_unsupported()
        ids = engine.encode(req.text)
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        return await complete(req, ids, chat=False, request=request)

    def model_card() -> dict:
        return {"id": served, "object": "model", "created": started, "owned_by": "gptchat"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str):
        check_model(model)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.text is None) == (req.messages is None):
            raise APIError(400, "Give exactly one of 'text' or 'messages'.", param="text", code="invalid_value")
        try:
            ids = engine.encode(req.text) if req.text is not None else \
                chat_prompt_ids(engine, [m.as_dict() for m in req.messages])
        except Exception as e:
            raise from_exception(e) from None
        return {"tokens": ids, "count": len(ids)}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    from . import conversations  # it imports this module's SSE helpers

    app.state.store = store or ConversationStore()
    conversations.install(app, engine, generator, app.state.store, served, max_tokens_cap)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def web_ui():
        return FileResponse(STATIC / "index.html")

    return app
