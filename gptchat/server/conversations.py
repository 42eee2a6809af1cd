"""The web UI's API: stored conversations, and replies streamed into them.

    GET    /api/info                           the model, its context, whether token probabilities are available
    GET    /api/conversations?search=TEXT      newest first, optionally only titles containing TEXT
    POST   /api/conversations                  {title?, system_prompt?, settings?} -> a new conversation
    GET    /api/conversations/{id}             the conversation with every message of every branch
    PATCH  /api/conversations/{id}             {title?, system_prompt?, settings?, current_leaf?} (settings as a whole)
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/messages    send, edit-and-resend or regenerate; the reply streams as SSE
    POST   /api/conversations/{id}/stop        end the replies being generated in it (they are kept, "stopped")
    GET    /api/conversations/{id}/export      one conversation as JSON; GET /api/export: all of them
    POST   /api/import                         an export (or {"messages": [...]}) -> new conversations

A send names the message to answer under: `{"content": "hi"}` appends to the current branch,
`{"content": "hi", "parent_id": P}` branches under P (editing a user message is a send under its parent),
and `{"parent_id": U}` without content answers user message U again (regenerate). The user's message is
committed before generation starts; the reply when it ends, also when stopped or when the client leaves.

The stream's events: {"type": "start", "user": message}, then {"type": "delta", "text", "logprobs"} per
piece, then {"type": "done", "message": reply} or {"type": "error", "error": {...}, "message": reply},
then [DONE].
"""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import aclosing
from typing import Annotated, AsyncIterator

from fastapi import FastAPI, Query, Request
from pydantic import ConfigDict, Field

from ..chat import prompt_ids as chat_prompt_ids
from ..engine import Engine, SequenceOutput
from ..sampling import SamplingParams
from .app import SSEResponse, event
from .errors import APIError, from_exception
from .protocol import Body, SamplingFields
from .store import ConversationStore, NotFound, StoreError

# the engine gives per-token probabilities once SamplingParams has these fields
LOGPROBS = {"logprobs", "top_logprobs"} <= {f.name for f in dataclasses.fields(SamplingParams)}
TOP_LOGPROBS = 5  # alternatives shown per token
NOT_SETTINGS = {"model", "n", "stream", "stream_options", "user"}


class Settings(SamplingFields):
    """A conversation's sampling settings: the chat API's parameters, plus whether to keep token probabilities."""

    model_config = ConfigDict(strict=True, extra="forbid")

    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] = TOP_LOGPROBS

    def stored(self) -> dict:
        return self.model_dump(exclude_none=True, exclude_unset=True, exclude=NOT_SETTINGS)

    def params(self, max_new_tokens: int) -> SamplingParams:
        params = self.sampling_params(max_new_tokens)
        if self.logprobs and LOGPROBS:
            params = dataclasses.replace(params, logprobs=True, top_logprobs=self.top_logprobs)
        return params


class NewConversation(Body):
    title: str | None = None
    system_prompt: str = ""
    settings: Settings | None = None


class ConversationChange(Body):
    title: str | None = None
    system_prompt: str | None = None
    settings: Settings | None = None
    current_leaf: str | None = None


class Send(Body):
    content: str | None = None
    parent_id: str | None = None  # absent: the current leaf; null: start a new root


def not_found(e: NotFound) -> APIError:
    return APIError(404, str(e), param=None, code="not_found")


def install(app: FastAPI, engine: Engine, generator, store: ConversationStore, model_name: str,
            max_tokens_cap: int | None = None) -> None:
    """Add the /api routes to `app` (routes of the app itself, so middleware that walks app.routes sees them)."""
    stops: dict[str, set[asyncio.Event]] = {}  # conversation id -> the stop flags of its running replies

    def conversation(cid: str) -> dict:
        try:
            return store.get(cid)
        except NotFound as e:
            raise not_found(e) from None

    @app.get("/api/info")
    def info():
        return {"model": model_name, "context_length": engine.context_length, "logprobs": LOGPROBS,
                "max_tokens_cap": max_tokens_cap}

    @app.get("/api/conversations")
    def list_conversations(search: Annotated[str | None, Query(max_length=200)] = None):
        return {"conversations": store.list(search)}

    @app.post("/api/conversations")
    def create_conversation(req: NewConversation):
        return store.create(req.title, req.system_prompt, req.settings.stored() if req.settings else {})

    @app.get("/api/conversations/{cid}")
    def get_conversation(cid: str):
        return {**conversation(cid), "messages": store.messages(cid)}

    @app.patch("/api/conversations/{cid}")
    def change_conversation(cid: str, req: ConversationChange):
        try:
            return store.update(cid, title=req.title, system_prompt=req.system_prompt,
                                settings=req.settings.stored() if req.settings else None,
                                current_leaf=req.current_leaf)
        except NotFound as e:
            raise not_found(e) from None

    @app.delete("/api/conversations/{cid}")
    def delete_conversation(cid: str):
        try:
            store.delete(cid)
        except NotFound as e:
            raise not_found(e) from None
        return {"id": cid, "deleted": True}

    @app.get("/api/conversations/{cid}/export")
    def export_conversation(cid: str):
        conversation(cid)
        return store.export([cid])

    @app.get("/api/export")
    def export_all():
        return store.export()

    @app.post("/api/import")
    async def import_conversations(request: Request):
        try:
            data = await request.json()
        except ValueError:
            raise APIError(400, "The import must be a JSON body.") from None
        try:
            return {"conversations": store.import_(data)}
        except StoreError as e:
            raise APIError(400, str(e), param="conversations", code="invalid_value") from None

    @app.post("/api/conversations/{cid}/stop")
    async def stop(cid: str):
        conversation(cid)
        flags = stops.get(cid, set())
        for flag in flags:
            flag.set()
        return {"id": cid, "stopped": len(flags)}

    @app.post("/api/conversations/{cid}/messages")
    async def send(cid: str, req: Send):
        conv = conversation(cid)
        parent_id = req.parent_id if "parent_id" in req.model_fields_set else conv["current_leaf"]
        try:
            branch = store.path(parent_id)
        except NotFound:
            raise APIError(404, f"No message with id '{parent_id}' in this conversation.", param="parent_id",
                           code="not_found") from None
        if branch and branch[-1]["conversation_id"] != cid:
            raise APIError(404, f"No message with id '{parent_id}' in this conversation.", param="parent_id",
                           code="not_found")
        if req.content is None:  # regenerate: answer the user message `parent_id` again
            if not branch or branch[-1]["role"] != "user":
                raise APIError(400, "Without content, parent_id must name a user message to answer again.",
                               param="parent_id", code="invalid_value")
            turns = branch
        else:
            if not req.content.strip():
                raise APIError(400, "The message is empty.", param="content", code="invalid_value")
            if branch and branch[-1]["role"] == "user":
                raise APIError(400, "A new message goes under a reply (or null, to start over), not under "
                               "another user message.", param="parent_id", code="invalid_value")
            turns = branch + [{"role": "user", "content": req.content}]
        messages = ([{"role": "system", "content": conv["system_prompt"]}] if conv["system_prompt"] else [])
        messages += [{"role": m["role"], "content": m["content"]} for m in turns]
        try:
            settings = Settings.model_validate(conv["settings"])
        except ValueError as e:
            raise APIError(400, f"This conversation's settings are invalid ({e}); change them.",
                           param="settings", code="invalid_value") from None
        try:
            ids = chat_prompt_ids(engine, messages)
            out = generator.prepare(ids, settings.params(reply_budget(settings, len(ids))))
        except Exception as e:
            raise from_exception(e) from None
        user = turns[-1] if req.content is None else store.add_message(cid, "user", req.content, parent_id)
        return SSEResponse(reply_events(cid, user, ids, out),
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def reply_budget(settings: Settings, prompt_len: int) -> int:
        """The reply's most tokens: the setting, else what the context has left; never a silent truncation."""
        ctx, wanted = engine.context_length, settings.max_tokens
        if wanted is not None and max_tokens_cap and wanted > max_tokens_cap:
            raise APIError(400, f"max_tokens is at most {max_tokens_cap} on this server (got {wanted}).",
                           param="settings.max_tokens", code="invalid_value")
        n_new = wanted if wanted is not None else min(ctx - prompt_len, max_tokens_cap or ctx)
        if prompt_len >= ctx or prompt_len + n_new > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens, but this conversation "
                           f"takes {prompt_len} tokens and its reply up to {max(n_new, 0)} more. Start a new "
                           f"conversation, shorten the message or lower max_tokens.",
                           param="messages", code="context_length_exceeded")
        return n_new

    async def reply_events(cid: str, user: dict, ids: list[int], out: SequenceOutput) -> AsyncIterator[str]:
        """Stream the reply; whatever happens (end, stop, error, a client that left), commit what was said."""
        flag = asyncio.Event()
        stops.setdefault(cid, set()).add(flag)
        parts, logprobs, status, finish, error = [], [], "stopped", None, None
        try:
            yield event({"type": "start", "user": user})
            async with aclosing(generator.stream(ids, out)) as deltas:
                async for d in deltas:
                    token_logprobs = getattr(d, "logprobs", None)
                    parts.append(d.text)
                    logprobs += token_logprobs or []
                    yield event({"type": "delta", "text": d.text, "logprobs": token_logprobs})
                    if d.finish_reason:
                        status, finish = "complete", d.finish_reason
                    elif flag.is_set():
                        break
        except Exception as e:
            status, error = "error", from_exception(e)
        finally:  # also when the client left (the generator is closed): keep the reply, marked stopped
            stops[cid].discard(flag)
            if not stops[cid]:
                del stops[cid]
            try:
                reply = store.add_message(cid, "assistant", "".join(parts), user["id"], status=status,
                                          logprobs=logprobs or None, finish_reason=finish)
            except NotFound:  # the conversation was deleted meanwhile
                reply = None
        if error is not None:
            yield event({"type": "error", **error.body(), "message": reply})
        else:
            yield event({"type": "done", "message": reply})
        yield "data: [DONE]\n\n"

