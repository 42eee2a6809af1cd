"""Streaming text out of a growing list of token ids: whole characters only, cut exactly at stop strings.

Two small state machines, used one after the other for each new token:

    token id -> IncrementalDetokenizer.push -> text delta -> StopStringMatcher.push -> text to send

The detokenizer never sends half a UTF-8 character; the matcher never sends text that may turn out
to be the start of a stop string.
"""

from __future__ import annotations

from typing import Callable, Sequence

from gptchat.errors import InvalidParameterError

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first new ones, for correct spacing


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level BPE tokens may hold part of a UTF-8 character (Chinese, emoji): a delta never ends in an
    incomplete character (the decoded text then ends with U+FFFD); it is sent once a later token
    completes it.

    The vLLM/TGI technique: decode only a small window, ids[prefix_offset:], and send what it adds to
    the text of ids[prefix_offset:read_offset] (already sent). Decoding a window rather than the new
    token alone keeps the spacing right for tokenizers that drop the leading space of the first token
    they decode (SentencePiece), and keeps the per-token cost independent of the sequence length.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int] | None = None):
        self.decode = decode
        self.ids: list[int] = list(prompt_ids or [])
        self.prefix_offset = max(len(self.ids) - PROMPT_CONTEXT_TOKENS, 0)  # window start
        self.read_offset = len(self.ids)  # ids before this are sent
        self._sent: list[str] = []

    def _pending(self) -> tuple[str, str]:
        """(text of the window, the part of it not yet sent)."""
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        return new_text, new_text[len(prefix_text) :]

    def _advance(self, delta: str) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._sent.append(delta)
        return delta

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", e.g. mid-character)."""
        self.ids.append(token_id)
        new_text, delta = self._pending()
        if not delta or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(delta)

    def flush(self) -> str:
        """At the end: whatever is held back, even an incomplete character."""
        if self.read_offset == len(self.ids):
            return ""
        return self._advance(self._pending()[1])

    @property
    def text(self) -> str:
        """All text sent so far plus what is held back."""
        held = self._pending()[1] if self.read_offset < len(self.ids) else ""
        return "".join(self._sent) + held


class StopStringMatcher:
    """Holds back the tail of the text that could be the start of a stop string, and cuts exactly at
    the first stop string.

    "First" means the one that starts first in the full text. So when a stop is found while an earlier
    position could still start a longer one (stops "abcd" and "bc", text so far "abc"), the matcher
    waits for more text before deciding.
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        if any(not s for s in stops):
            raise InvalidParameterError("stop", "stop strings must be non-empty")
        self.stops = tuple(stops)
        self.held = ""  # text received but not yet returned
        self.stopped = False

    def _earliest_match(self) -> int:
        """Start of the first stop string in the held text, or -1."""
        starts = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        return min(starts, default=-1)

    def _partial_start(self) -> int:
        """Start of the longest tail of the held text that is a proper prefix of a stop string."""
        text = self.held
        for start in range(max(len(text) - max(map(len, self.stops)) + 1, 0), len(text)):
            tail = text[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return start
        return len(text)

    def push(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to send now, stopped?).

        Once stopped, the returned text runs up to (not including) the stop string; push no more.
        """
        if not self.stops:
            return delta, False
        self.held += delta
        match, partial = self._earliest_match(), self._partial_start()
        if match >= 0 and match <= partial:
            self.stopped = True
            out, self.held = self.held[:match], ""
            return out, True
        out, self.held = self.held[:partial], self.held[partial:]
        return out, False

    def flush(self) -> str:
        """At the end of generation: release the held text (up to a stop string, if one is in it)."""
        match = self._earliest_match()
        if match >= 0:
            self.stopped = True
            out = self.held[:match]
        else:
            out = self.held
        self.held = ""
        return out
