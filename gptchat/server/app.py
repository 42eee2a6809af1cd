"""The routes of the OpenAI-compatible server.

    POST /v1/chat/completions   messages -> reply, streamed (SSE) or whole
    POST /v1/completions        prompt text -> continuation, streamed or whole
    GET  /v1/models             the one model served
    POST /tokenize              text or messages -> token ids
    GET  /health                {"status": "ok"}, public
    GET  /                      the web chat UI (static files, public); its API is /api (conversations.py)

A request is checked in full (model name, parameters, context room) before any output, so a client gets
a proper 4xx instead of a stream that dies. Nothing is truncated: a prompt plus max_tokens beyond the
context is refused with both counts.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..chat import prompt_ids as chat_prompt_ids
from ..checkpoints import LoadedModel
from ..engine import Engine, SequenceOutput
from . import errors
from .auth import APIKeyMiddleware
from .errors import APIError, from_exception
from .generation import SerialGenerator
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, Shape, TokenizeRequest, now, usage
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


def create_app(lm: LoadedModel, *, model_name: str | None = None, api_key: str | None = None,
               max_tokens_cap: int | None = None, store: ConversationStore | None = None) -> FastAPI:
    """The app; conversations go to `store` (default: one in memory, gone when the process ends)."""
    engine = Engine(lm)
    generator = SerialGenerator(engine)
    served = model_name or lm.name
    started = now()

    app = FastAPI(title="gptchat", version="0.1.0")
    app.state.engine, app.state.generator, app.state.model_name = engine, generator, served
    errors.install(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

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

    async def complete(req: SamplingFields, prompt_ids: list[int], chat: bool):
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
        try:
            results = [await generator.generate(prompt_ids, out) for out in outs]
        except Exception as e:
            raise from_exception(e, what) from None
        use = usage(len(prompt_ids), sum(r.completion_tokens for r in results))
        return shape.response([r.text for r in results], [r.finish_reason for r in results], use)

    async def stream_events(shape: Shape, prompt_ids: list[int], outs: list[SequenceOutput],
                            include_usage: bool, what: str) -> AsyncIterator[str]:
        """OpenAI's chunks for each choice in turn, then usage if asked; an error ends the stream in-band."""
        try:
            completion_tokens = 0
            for i, out in enumerate(outs):
                if shape.chat:
                    yield event(shape.chunk(i, None, role=True, with_usage=include_usage))
                async with aclosing(generator.stream(prompt_ids, out)) as deltas:
                    async for d in deltas:
                        if shape.chat:
                            if d.text:
                                yield event(shape.chunk(i, d.text, with_usage=include_usage))
                            if d.finish_reason:
                                yield event(shape.chunk(i, None, d.finish_reason, with_usage=include_usage))
                        elif d.text or d.finish_reason:
                            yield event(shape.chunk(i, d.text, d.finish_reason, with_usage=include_usage))
                completion_tokens += out.result().completion_tokens
            if include_usage:
                yield event(shape.usage_chunk(usage(len(prompt_ids), completion_tokens)))
        except Exception as e:
            yield event(from_exception(e, what).body())
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        req.refuse_unsupported()
        try:
            ids = chat_prompt_ids(engine, [m.as_dict() for m in req.messages])
        except Exception as e:
            raise from_exception(e) from None
        return await complete(req, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        req.refuse_unsupported()
        ids = engine.encode(req.text)
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        return await complete(req, ids, chat=False)

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
