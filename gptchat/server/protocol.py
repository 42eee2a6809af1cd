"""The OpenAI API's request bodies (validated by pydantic) and its response and chunk shapes.

Bodies are strict: a number must be a JSON number, not a string, and out-of-range values are refused
with the field named. Unknown fields are ignored, as OpenAI's own SDKs send some we do not use; the few
that would change the answer (tools, JSON mode) are refused rather than silently dropped.

Log-probabilities come in two shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}` (the
engine's Delta.logprobs as they are) and the legacy completions' parallel lists `tokens`,
`token_logprobs`, `top_logprobs` (token -> logprob, the chosen token included) and `text_offset`.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import MAX_TOP_LOGPROBS, SamplingParams
from .errors import APIError

# -- requests -----------------------------------------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def as_dict(self) -> dict:
        """{"role", "content"} as the chat template wants it; "developer" is the newer name for "system"."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    """What chat and text completions share: OpenAI's sampling parameters and our extensions."""

    default_max_tokens: ClassVar[int | None] = None  # None: until the context is full (or the server's cap)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions (vLLM's names); top_k -1 means off, as there
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    no_repeat_ngram_size: Annotated[int, Field(ge=0)] | None = None

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_new_tokens: int, choice: int = 0) -> SamplingParams:
        """SamplingParams for choice `choice` of n (a seeded request gives choice i the seed + i)."""
        given = {k: v for k, v in {
            "temperature": self.temperature, "top_p": self.top_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }.items() if v is not None}
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        logprobs, top_logprobs = self.logprob_params()
        return SamplingParams(
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            max_new_tokens=max_new_tokens,
            top_k=max(self.top_k or 0, 0),
            stop=tuple(stop),
            seed=None if self.seed is None else self.seed + choice,
            logit_bias=self.logit_bias,
            **given,
        )

    def logprob_params(self) -> tuple[bool, int]:
        """(report logprobs, how many alternatives)."""
        return False, 0

    def refuse_unsupported(self) -> None:
        """Refuse what we would otherwise have to fake."""
        extra = self.model_extra or {}
        for name in ("tools", "functions"):
            if extra.get(name):
                raise APIError(400, f"'{name}' is not supported yet.", param=name, code="unsupported_parameter")
        fmt = extra.get("response_format")
        if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise APIError(400, "'response_format' other than {\"type\": \"text\"} is not supported yet.",
                           param="response_format", code="unsupported_parameter")


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(strict=True, extra="allow")

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_params(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true.", param="top_logprobs", code="invalid_value")


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(strict=True, extra="allow")

    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]
    default_max_tokens: ClassVar[int | None] = 16  # the legacy endpoint's default, as OpenAI's
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def logprob_params(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name, used in (("echo", self.echo),
                           ("suffix", self.suffix is not None), ("best_of", self.best_of not in (None, self.n))):
            if used:
                raise APIError(400, f"'{name}' is not supported yet.", param=name, code="unsupported_parameter")


class TokenizeRequest(Body):
    model: str | None = None
    text: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None


# -- responses ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shape:
    """Builds one response's objects (chat or text completion) with its id, creation time and model."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), now()

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def response(self, texts: list[str], reasons: list[str], use: dict, logprobs: list | None = None) -> dict:
        """The whole response; `logprobs` holds each choice's entries (Delta.logprobs joined) when asked for."""
        lps = [self.logprobs(entries) for entries in logprobs] if logprobs else [None] * len(texts)
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                        "logprobs": lp, "finish_reason": r} for i, (t, r, lp) in enumerate(zip(texts, reasons, lps))]
            return {**self._head("chat.completion"), "choices": choices, "usage": use}
        choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": r}
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, lps))]
        return {**self._head("text_completion"), "choices": choices, "usage": use}

    def logprobs(self, entries: list[dict], offset: int = 0) -> dict:
        """Chat's logprobs object, or the legacy lists (text offsets counted from `offset`)."""
        if self.chat:
            return {"content": entries, "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{**{t["token"]: t["logprob"] for t in e["top_logprobs"]}, e["token"]: e["logprob"]}
                                 for e in entries],
                "text_offset": offsets}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None,
              role: bool = False, with_usage: bool = False, logprobs: dict | None = None) -> dict:
        """A streamed piece of choice `index` (`role` marks a chat choice's first chunk)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text or logprobs:
                delta["content"] = text or ""
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": use}
