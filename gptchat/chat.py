"""Multi-turn chat: a conversation, rendered by the model's chat template, fitted into its context.

Each reply is generated from the whole history (system prompt, every user message and every earlier
reply), as in the article: "the user's input and the model's previous reply form the next input".
When the history no longer fits beside the reply's token budget, the oldest turns are dropped (the
system prompt stays) and the caller is told how many; a message that cannot fit even alone is an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .engine import Delta, Engine
from .errors import ContextLengthError, GptchatError
from .sampling import SamplingParams
from .templates import render_chat

ROLES = ("system", "user", "assistant")


def validate_messages(messages, source: str = "messages") -> list[dict]:
    """OpenAI-format messages: a list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list):
        raise GptchatError(f"{source}: expected a list of messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise GptchatError(f"{source}: message {i} must be {{\"role\": system|user|assistant, \"content\": text}}")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def with_system(cls, system: str | None) -> "Conversation":
        return cls([{"role": "system", "content": system}] if system else [])

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str | None):
        turns = self.messages[1:] if self.system is not None else self.messages
        self.messages = ([{"role": "system", "content": text}] if text else []) + turns

    def reset(self):
        """Forget the turns, keep the system prompt."""
        self.messages = self.messages[:1] if self.system is not None else []

    def add(self, role: str, content: str):
        self.messages.append({"role": role, "content": content})

    # -- files: {"messages": [...]} as the OpenAI API writes them --------------------------------

    def save(self, path: str | Path):
        path = Path(path)
        data = json.dumps({"messages": self.messages}, ensure_ascii=False, indent=2)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "Conversation":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise GptchatError(f"{path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise GptchatError(f"{path}: not valid JSON ({e})") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        return cls(validate_messages(messages, str(path)))


@dataclass
class Prompt:
    ids: list[int]
    dropped: int  # how many of the oldest messages were left out to fit the context


def prompt_ids(engine: Engine, messages: list[dict]) -> list[int]:
    """The whole conversation under the model's chat template, ending with the reply's opening."""
    tok = engine.tokenizer
    text = render_chat(tok.chat_template, messages, add_generation_prompt=True,
                       bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    return tok.encode(text, add_special_tokens=False)  # the template writes any BOS itself


def build_prompt(engine: Engine, messages: list[dict], max_new_tokens: int) -> Prompt:
    """Render `messages` with the model's template; drop the oldest turns until the reply has room."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    room = engine.context_length - max_new_tokens
    dropped = 0
    while True:
        ids = prompt_ids(engine, system + turns)
        if len(ids) <= room:
            return Prompt(ids, dropped)
        if len(turns) <= 1:
            what = "the message" if turns else "the system prompt"
            raise ContextLengthError(
                f"{what} needs {len(ids)} tokens; with {max_new_tokens} tokens for the reply it cannot fit "
                f"the model's context of {engine.context_length} tokens",
                len(ids),
                engine.context_length,
            )
        # drop the oldest turn: a user message and the replies that follow it
        cut = 1
        while cut < len(turns) - 1 and turns[cut]["role"] != "user":
            cut += 1
        turns = turns[cut:]
        dropped += cut


class ChatSession:
    """A conversation bound to an engine: `send` streams the reply and records it in the history."""

    def __init__(self, engine: Engine, conversation: Conversation | None = None, params: SamplingParams | None = None):
        self.engine = engine
        self.conversation = conversation or Conversation()
        self.params = (params or SamplingParams()).validate()
        self.last_dropped = 0

    def reply_budget(self) -> int:
        """Tokens reserved for the reply when fitting the history: max_new_tokens, capped at half the context."""
        wanted = self.params.max_new_tokens or self.engine.context_length // 4
        return min(wanted, self.engine.context_length // 2)

    def send(self, text: str) -> Iterator[Delta]:
        """Add the user's message, then stream the reply; the reply (complete or interrupted) is kept."""
        self.conversation.add("user", text)
        try:
            prompt = build_prompt(self.engine, self.conversation.messages, self.reply_budget())
            stream = self.engine.stream(prompt.ids, self.params)
        except GptchatError:
            self.conversation.messages.pop()  # the message was not answered: leave the history as it was
            raise
        self.last_dropped = prompt.dropped
        return self._record(stream)

    def _record(self, stream: Iterator[Delta]) -> Iterator[Delta]:
        parts = []
        try:
            for delta in stream:
                parts.append(delta.text)
                yield delta
        finally:  # also on Ctrl-C or when the consumer stops early: keep what was shown
            stream.close()
            self.conversation.add("assistant", "".join(parts))
