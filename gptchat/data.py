"""Training data: text -> token shards for pre-training, dialogues -> (ids, loss mask) for fine-tuning.

Pre-training text is tokenised once into flat token files (numpy memmaps, uint16 when the vocabulary
fits, else uint32): `train.bin` and a held-out `val.bin`, described by `meta.json`. A batch is a set
of random windows whose offsets depend only on (seed, step, micro-step), so a resumed run reads
exactly the batches the uninterrupted run would have read; no iterator state needs saving.

Dialogues (OpenAI `{"messages": [...]}` or ShareGPT `{"conversations": [{"from", "value"}]}`) are
rendered with the model's chat template one message at a time, so we know which tokens each message
produced: the loss is taken on the assistant's tokens only, up to and including its end-of-turn token.

Bad data is an error that names the file and line, never a silent drop.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from .errors import GptchatError
from .templates import render_chat

TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


# ---- reading text ----------------------------------------------------------------------------


def text_files(paths) -> list[Path]:
    """Files, and the text/JSONL files inside folders (recursively, in sorted order)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise GptchatError(f"{p}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise GptchatError(f"{p}: no such file or directory")
    return files


def read_nonempty(path: Path) -> str:
    """A file's UTF-8 text; a clear error naming the file when it is unreadable or empty."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GptchatError(f"{path}: cannot read as UTF-8 text ({e})") from None
    if not content.strip():
        raise GptchatError(f"{path}: empty file")
    return content


def read_texts(paths, field: str = "text"):
    """Yield (where, text) documents: a whole text file, or one JSONL line's `field`."""
    for f in text_files(paths):
        content = read_nonempty(f)
        if f.suffix.lower() != ".jsonl":
            yield str(f), content
            continue
        for n, line in enumerate(content.split("\n"), 1):
            if not line.strip():
                continue
            record = _json_line(f, n, line)
            text = record.get(field)
            if not isinstance(text, str):
                raise GptchatError(f"{f}:{n}: no text field {field!r}")
            if not text.strip():
                raise GptchatError(f"{f}:{n}: empty text")
            yield f"{f}:{n}", text


def read_jsonl(path):
    """Yield ("file:line", record) for each non-blank line of a JSONL file; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise GptchatError(f"{path}: no such file")
    for n, line in enumerate(read_nonempty(path).split("\n"), 1):
        if line.strip():
            yield f"{path}:{n}", _json_line(path, n, line)


def _json_line(f: Path, n: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise GptchatError(f"{f}:{n}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise GptchatError(f"{f}:{n}: expected a JSON object")
    return record


# ---- pre-training shards ---------------------------------------------------------------------


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:16]


def sources_of(paths) -> list[list]:
    """What a shard set was made from (path, size, mtime): a change means tokenising again."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in text_files(paths)]


def prepare_text(paths, tokenizer, out_dir, *, val_fraction: float = 0.05, field: str = "text") -> dict:
    """Tokenise the documents (each followed by the end-of-text token) into train.bin and val.bin.

    The validation split is the last `val_fraction` of the token stream (at least one window's worth
    is left to train on). Reuses existing shards made from the same files with the same tokenizer.
    """
    out_dir = Path(out_dir)
    sources, fingerprint = sources_of(paths), tokenizer_fingerprint(tokenizer)
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("sources") == sources and meta.get("tokenizer") == fingerprint:
            return meta
    sep = tokenizer.eos_id
    dtype = token_dtype(tokenizer.vocab_size)
    chunks, n_bytes = [], 0
    for where, text in read_texts(paths, field):
        ids = tokenizer.encode(text)
        if not ids:
            raise GptchatError(f"{where}: the text tokenises to nothing")
        chunks.append(np.asarray(ids + ([sep] if sep is not None else []), dtype=dtype))
        n_bytes += len(text.encode("utf-8"))
    tokens = np.concatenate(chunks)
    n_val = max(1, int(len(tokens) * val_fraction))
    if len(tokens) - n_val < 2:
        raise GptchatError(f"too little text to train on ({len(tokens)} tokens)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", tokens[:-n_val]), ("val", tokens[-n_val:])):
        m = np.memmap(out_dir / f"{name}.bin", dtype=dtype, mode="w+", shape=part.shape)
        m[:] = part
        m.flush()
        del m
    meta = {"dtype": np.dtype(dtype).name, "train_tokens": int(len(tokens) - n_val), "val_tokens": n_val,
            "bytes_per_token": n_bytes / len(tokens), "tokenizer": fingerprint, "sources": sources}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


class TextData:
    """Random windows of a token shard; batch (step, micro) is a pure function of the seed."""

    def __init__(self, directory, batch_size: int, seq_len: int, seed: int = 0, val_batches: int = 8):
        directory = Path(directory)
        self.meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.train = np.memmap(directory / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(directory / "val.bin", dtype=dtype, mode="r")
        self.batch_size, self.seq_len, self.seed, self.n_val_batches = batch_size, seq_len, seed, val_batches
        self.bytes_per_token = self.meta["bytes_per_token"]
        if len(self.train) <= seq_len:
            raise GptchatError(f"{len(self.train)} training tokens cannot fill one window of {seq_len}; "
                               f"use a shorter --seq-len or more text")

    def batch(self, step: int, micro: int = 0):
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(0, len(self.train) - self.seq_len, size=self.batch_size)
        return self._windows(self.train, starts)

    def val_batches(self):
        """Consecutive windows from the start of the validation split (the same ones every time)."""
        n = min(len(self.val) - 1, self.seq_len)
        if n < 1:
            return
        starts = list(range(0, len(self.val) - n, n))[: self.n_val_batches * self.batch_size]
        for i in range(0, len(starts), self.batch_size):
            yield self._windows(self.val, starts[i : i + self.batch_size], n)

    def _windows(self, tokens, starts, n=None):
        n = n or self.seq_len
        w = torch.from_numpy(np.stack([tokens[s : s + n + 1].astype(np.int64) for s in starts]))
        return w[:, :-1], w[:, 1:], None


# ---- dialogues -------------------------------------------------------------------------------


def read_dialogues(path) -> list[list[dict]]:
    """Conversations from a JSONL file in OpenAI messages or ShareGPT format, as OpenAI messages."""
    path = Path(path)
    content = read_nonempty(path)
    dialogues = []
    for n, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        record = _json_line(path, n, line)
        if "messages" in record:
            raw, role_key, text_key, roles = record["messages"], "role", "content", {r: r for r in ROLES}
        elif "conversations" in record:
            raw, role_key, text_key, roles = record["conversations"], "from", "value", SHAREGPT_ROLES
        else:
            raise GptchatError(f"{path}:{n}: expected \"messages\" (OpenAI) or \"conversations\" (ShareGPT)")
        if not isinstance(raw, list) or not raw:
            raise GptchatError(f"{path}:{n}: the conversation is empty or not a list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or not isinstance(m.get(text_key), str):
                raise GptchatError(f"{path}:{n}: message {i} needs a text {text_key!r}")
            role = m.get(role_key)
            if role not in roles:
                raise GptchatError(f"{path}:{n}: message {i} has unknown role {role!r}")
            messages.append({"role": roles[role], "content": m[text_key]})
        if not any(m["role"] == "assistant" for m in messages):
            raise GptchatError(f"{path}:{n}: no assistant message to learn from")
        dialogues.append(messages)
    return dialogues


def encode_dialogue(tokenizer, messages: list[dict], max_len: int | None = None):
    """(ids, mask) for one conversation: mask is 1 on the assistant's tokens, end-of-turn included.

    Each message is rendered as the difference between the template applied to the messages up to
    it and to those before it, so any template that renders a conversation as a growing prefix works.
    A conversation longer than `max_len` keeps its leading turns up to the last assistant reply that
    fits; None if not even the first reply fits.
    """
    template, eos_ids = tokenizer.chat_template, tokenizer.eos_ids

    def render(msgs, gen=False):
        return render_chat(template, msgs, add_generation_prompt=gen,
                           bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)

    ids, mask, done, kept = [], [], "", None
    for k, m in enumerate(messages):
        if m["role"] == "assistant":  # the header ("<|im_start|>assistant\n") is prompt, not reply
            header = render(messages[:k], gen=True)
            _extend(tokenizer, ids, mask, _suffix(done, header), 0)
            done = header
        text = render(messages[: k + 1])
        piece = _suffix(done, text)
        done = text
        if m["role"] != "assistant":
            _extend(tokenizer, ids, mask, piece, 0)
            continue
        reply = tokenizer.encode(piece)
        last_end = max((i for i, t in enumerate(reply) if t in eos_ids), default=len(reply) - 1)
        ids += reply
        mask += [1] * (last_end + 1) + [0] * (len(reply) - last_end - 1)
        if max_len is None or len(ids) <= max_len:
            kept = len(ids)
    if kept is None:
        return None
    return ids[:kept], mask[:kept]


def _suffix(done: str, text: str) -> str:
    if not text.startswith(done):
        raise GptchatError("the chat template does not render a conversation as a growing prefix; "
                           "it cannot be used to build training masks")
    return text[len(done):]


def _extend(tokenizer, ids, mask, text, value):
    new = tokenizer.encode(text) if text else []
    ids += new
    mask += [value] * len(new)


class DialogueData:
    """Encoded conversations; a batch is a seeded random pick of them, right-padded, with loss masks."""

    def __init__(self, paths, tokenizer, batch_size: int, max_len: int, seed: int = 0, val_fraction: float = 0.1):
        examples, skipped = [], 0
        for p in paths:
            for messages in read_dialogues(p):
                enc = encode_dialogue(tokenizer, messages, max_len + 1)
                if enc is None:
                    skipped += 1
                else:
                    examples.append(enc)
        if not examples:
            raise GptchatError(f"no conversation fits {max_len} tokens ({skipped} too long)")
        self.skipped = skipped
        n_val = int(len(examples) * val_fraction) if len(examples) >= 2 else 0
        if val_fraction > 0 and len(examples) >= 2:
            n_val = max(1, n_val)
        # every k-th conversation is held out: spread over the file, the same on every run
        step = len(examples) / n_val if n_val else math.inf
        val_idx = {int(i * step) for i in range(n_val)}
        self.val = [e for i, e in enumerate(examples) if i in val_idx]
        self.train = [e for i, e in enumerate(examples) if i not in val_idx]
        self.batch_size, self.seed, self.pad_id = batch_size, seed, tokenizer.pad_id or 0
        self.bytes_per_token = None  # bits-per-byte is a pre-training figure

    def batch(self, step: int, micro: int = 0):
        rng = np.random.default_rng([self.seed, step, micro])
        return self.collate([self.train[i] for i in rng.integers(0, len(self.train), size=self.batch_size)])

    def val_batches(self):
        for i in range(0, len(self.val), self.batch_size):
            yield self.collate(self.val[i : i + self.batch_size])

    def collate(self, examples):
        T = max(len(ids) for ids, _ in examples) - 1
        x = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        m = torch.zeros((len(examples), T), dtype=torch.bool)
        for row, (ids, mask) in enumerate(examples):
            n = len(ids) - 1
            x[row, :n] = torch.tensor(ids[:-1])
            y[row, :n] = torch.tensor(ids[1:])
            m[row, :n] = torch.tensor(mask[1:], dtype=torch.bool)
        return x, y, m
