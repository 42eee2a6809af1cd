"""Train a byte-level BPE tokenizer (GPT-2 style) on your own text, with the chat special tokens.

Byte-level means every string can be encoded (no unknown token): the base alphabet is the 256 bytes
and BPE learns merges on top. `<|endoftext|>` separates documents, `<|im_start|>`/`<|im_end|>` frame
ChatML turns; the saved tokenizer carries the ChatML template, so `gptchat chat` works with it.
"""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from .data import read_texts
from .errors import GptchatError
from .templates import CHATML_TEMPLATE
from .tokenizer import Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def split_heldout(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the tail of every document (cut at a space), so even one file gives both parts."""
    train, heldout = [], []
    for t in texts:
        cut = int(len(t) * (1 - fraction))
        space = t.rfind(" ", 0, cut)
        cut = space if space > 0 else cut
        train.append(t[:cut])
        if t[cut:].strip():
            heldout.append(t[cut:])
    return train, heldout


def train_tokenizer(paths, vocab_size: int, *, heldout_fraction: float = 0.05, field: str = "text",
                    min_frequency: int = 2) -> tuple[Tokenizer, float | None]:
    """A Tokenizer trained on the files, and its bytes per token on the held-out text (None if none)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise GptchatError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (the 256 bytes and the special tokens)")
    texts = [t for _, t in read_texts(paths, field)]
    train, heldout = split_heldout(texts, heldout_fraction)
    backend = tokenizers.Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(train, trainer=trainer)
    eot, _, im_end = (backend.token_to_id(t) for t in SPECIAL_TOKENS)
    tok = Tokenizer(backend, bos_id=None, eos_id=eot, eos_ids={eot, im_end}, pad_id=eot, add_bos=False,
                    chat_template=CHATML_TEMPLATE, name_or_path="trained")
    return tok, bytes_per_token(tok, heldout)


def bytes_per_token(tok: Tokenizer, texts: list[str]) -> float | None:
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens if n_tokens else None

