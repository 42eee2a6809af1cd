"""Tokenizer: text <-> token ids, plus what a chat needs to know about the vocabulary.

The encoding itself is done by Hugging Face `tokenizers` (fast and exact). What we add is loading:

- `from_file`: a model directory in the Hugging Face layout (tokenizer.json and friends); this is
  also what `save` writes.
- `from_gguf`: a GGUF file carries no tokenizer.json, only the vocabulary, merges and token types
  as metadata. We rebuild the `tokenizers` pipeline those describe, with the pre-tokenizer the
  model was trained with (llama.cpp's `tokenizer.ggml.pre` names it).

and the chat facts: which ids are BOS/EOS/PAD, which ids end a turn, and the chat template.
"""

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from gptchat.errors import GptchatError, InvalidParameterError, ModelLoadError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Special tokens that end an assistant turn in common chat formats. Generation stops on any of them
# (when the vocabulary has it as a special token), not only on the model's one official EOS.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML (SmolLM, Qwen)
    "<|endoftext|>",  # GPT-2 style end of text
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3 tool calls
    "<|end_of_text|>",  # Llama 3 base
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
)

# Pre-tokenizer split regexes, by llama.cpp's `tokenizer.ggml.pre` name. Byte-level BPE merges only
# reproduce the model's tokens if text is split into words exactly as during training.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT),
}
# llama.cpp groups these: every digit is its own word, then GPT-2's regex (SmolLM's tokenizer.json
# spells this Digits(individual_digits=True) + ByteLevel).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_GPT2 = {None, "default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2"}
# Llama 3's vocabulary is used whole-word-first: a word that is itself a token is not re-merged.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what chat needs: special ids, eos set, chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids=(),
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        name_or_path: str = "",
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        # every id that ends a turn; always includes eos
        self.eos_ids = set(eos_ids) | ({eos_id} if eos_id is not None else set())
        self.pad_id = pad_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.name_or_path = str(name_or_path)

    def __repr__(self):
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"

    # ---- loading ----

    @classmethod
    def from_file(cls, directory: str | Path) -> "Tokenizer":
        """A Hugging Face (or our own, see `save`) model directory.

        tokenizer.json is the tokenizer. The special tokens, add_bos_token and the chat template
        come from tokenizer_config.json (the template may instead be in chat_template.jinja or
        chat_template.json, which win, as in transformers); generation_config.json and config.json
        fill in missing ids and add their eos ids to the turn-ending set.
        """
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"no tokenizer.json in {directory}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"cannot read {path}: {_one_line(e)}") from e
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        model_config = _read_json(directory / "config.json")

        def special_id(name: str) -> int | None:
            # "bos_token" in tokenizer_config, else "bos_token_id" in generation_config / config
            token = _token_content(config.get(f"{name}_token"))
            if token is not None and backend.token_to_id(token) is not None:
                return backend.token_to_id(token)
            for source in (generation, model_config):
                ids = _id_list(source.get(f"{name}_token_id"))
                if ids:
                    return ids[0]
            return None

        bos_id, eos_id, pad_id = special_id("bos"), special_id("eos"), special_id("pad")
        if "eos_ids" in config:  # written by `save`: exactly this set
            eos_ids = set(_id_list(config["eos_ids"]))
        else:
            listed = _id_list(generation.get("eos_token_id")) + _id_list(model_config.get("eos_token_id"))
            eos_ids = _end_of_turn_ids(backend, eos_id, listed)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: BOS is added if tokenizer.json's post-processor adds it
            add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=eos_ids,
            pad_id=pad_id,
            add_bos=bool(add_bos),
            chat_template=_chat_template(directory, config),
            name_or_path=str(directory),
        )

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """Build the tokenizer a GGUF file's metadata describes (`reader` is a gguf.GGUFReader).

        Supported: tokenizer.ggml.model "gpt2" (byte-level BPE, as GPT-2, Llama 3, Qwen, SmolLM)
        and "llama" (SentencePiece BPE with byte fallback, as Llama 2, Mistral).
        """
        model = _gguf_value(reader, "tokenizer.ggml.model")
        if model is None:
            raise ModelLoadError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        if model not in ("gpt2", "llama"):
            raise ModelLoadError(f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")
        try:
            tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
            if not tokens:
                raise ModelLoadError("the GGUF file has no tokenizer.ggml.tokens")
            types = _gguf_value(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
            merges = _gguf_value(reader, "tokenizer.ggml.merges")

            def token_id(key: str) -> int | None:
                value = _gguf_value(reader, f"tokenizer.ggml.{key}")
                return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

            bos_id, eos_id, unk_id, pad_id = (
                token_id(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
            )
            if model == "gpt2":
                backend = _byte_level_bpe(tokens, types, merges, _gguf_value(reader, "tokenizer.ggml.pre"))
            else:
                scores = _gguf_value(reader, "tokenizer.ggml.scores")
                add_prefix = _gguf_value(reader, "tokenizer.ggml.add_space_prefix", True)
                unk = tokens[unk_id] if unk_id is not None else None
                backend = _sentencepiece_bpe(tokens, merges, scores, unk, add_prefix)

            # Control tokens (<|im_start|>...) and user-defined ones (<think>...) are matched whole in
            # the text before BPE, so a chat template's markers become single ids. Control ones are
            # special: decode(skip_special_tokens=True) drops them.
            specials = [t for t, kind in zip(tokens, types) if kind == CONTROL]
            specials += [tokens[i] for i in (bos_id, eos_id, unk_id, pad_id) if i is not None]
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
            user = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED]
            backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

            turn_ends = [token_id("eot_token_id"), token_id("eom_token_id")]
            add_bos = _gguf_value(reader, "tokenizer.ggml.add_bos_token", model == "llama")
            template = _gguf_value(reader, "tokenizer.chat_template")
        except GptchatError:
            raise
        except Exception as e:  # bad UTF-8, merges naming unknown tokens, wrong value types...
            raise ModelLoadError(f"invalid tokenizer metadata in the GGUF file: {_one_line(e)}") from e
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=_end_of_turn_ids(backend, eos_id, turn_ends),
            pad_id=pad_id,
            add_bos=bool(add_bos),
            chat_template=template,
            name_or_path=str(getattr(reader.data, "filename", "") or ""),
        )

    # ---- using ----

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in it ("<|im_start|>") become their ids.

        add_special_tokens prepends BOS when the model wants one. Chat prompts usually should not:
        templates that want a BOS write it themselves.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_str(self, id: int) -> str:
        """The raw vocabulary entry for `id` (e.g. "Ġhello" in a byte-level vocabulary)."""
        token = self.backend.id_to_token(int(id)) if int(id) >= 0 else None
        if token is None:
            raise InvalidParameterError("token_id", f"token id {id} is not in the vocabulary (size {self.vocab_size})")
        return token

    def token_bytes(self, id: int) -> bytes:
        """The bytes token `id` stands for, also when it is only part of a UTF-8 character."""
        text = self.decode([id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode()
        raw = self.token_to_str(id)
        if set(raw) <= _CHAR_TO_BYTE.keys():  # byte-level BPE: one character per byte
            return bytes(_CHAR_TO_BYTE[c] for c in raw)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", raw):  # SentencePiece byte fallback
            return bytes([int(raw[3:5], 16)])
        return text.encode()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str:
        """BOS as text ("" if none), for chat templates that write it."""
        return "" if self.bos_id is None else self.backend.id_to_token(self.bos_id) or ""

    @property
    def eos_token(self) -> str:
        return "" if self.eos_id is None else self.backend.id_to_token(self.eos_id) or ""

    # ---- saving ----

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so that `from_file` gives this tokenizer back.

        The config is Hugging Face's layout (transformers can load the directory too), plus our
        "eos_ids". A chat_template.jinja/.json left in the directory would shadow the template we
        write, so those are removed.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)

        def token(id):
            return self.backend.id_to_token(id) if id is not None else None

        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(self.bos_id),
            "eos_token": token(self.eos_id),
            "pad_token": token(self.pad_id),
            "add_bos_token": self.add_bos,
            "eos_ids": sorted(self.eos_ids),
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_atomic(directory / "tokenizer.json", self.backend.to_str())
        _write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        for name in ("chat_template.jinja", "chat_template.json"):
            (directory / name).unlink(missing_ok=True)


# ---- building tokenizers from GGUF metadata ----


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str] | None, pre: str | None):
    """GPT-2 style BPE over bytes, each byte spelled as one printable character ("Ġ" for space)."""
    alphabet = set(_BYTE_TO_CHAR.values())
    # Some converters store a normal token as raw text; respell it in the byte alphabet, as
    # transformers does. Control and user-defined tokens keep their text: they are matched whole.
    vocab = {
        t if kind in (CONTROL, USER_DEFINED) or set(t) <= alphabet else "".join(_BYTE_TO_CHAR[b] for b in t.encode()): i
        for i, (t, kind) in enumerate(zip(tokens, types))
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges or []]
    backend = tokenizers.Tokenizer(BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        if _SPLITS[pre] is _QWEN2_SPLIT:
            backend.normalizer = normalizers.NFC()  # as in Qwen2's own tokenizer.json
    else:
        if pre not in _GPT2:
            warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}; splitting text as GPT-2 does", stacklevel=3)
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens, merges, scores, unk: str | None, add_prefix_space: bool):
    """SentencePiece-style BPE (Llama 2): spaces are "▁", unknown bytes fall back to <0xNN> tokens.

    Built as transformers' LlamaTokenizer builds it (non-legacy: the "▁" prefix only at the start).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores:
        pairs = _merges_from_scores(tokens, scores)
    else:
        raise ModelLoadError("the GGUF SentencePiece tokenizer has neither merges nor scores")
    backend = tokenizers.Tokenizer(BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files keep scores, not merges. Every split of a token into two tokens is a merge,
    best-scoring result first; ties keep the order transformers' `generate_merges` gives them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        splits = ((piece[:k], piece[k:]) for k in range(1, len(piece)))
        local = [(left, right, score) for left, right in splits if left in vocab and right in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bytes_to_chars() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_chars()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _gguf_value(reader, key: str, default=None):
    """A metadata value as a Python str/int/float/bool or list of them; `default` if absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    import gguf  # older gguf: decode the raw parts by hand

    values = [field.parts[i] for i in field.data]
    if field.types[-1] == gguf.GGUFValueType.STRING:
        values = [bytes(v).decode() for v in values]
    else:
        values = [v.tolist()[0] for v in values]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


# ---- helpers ----


def _end_of_turn_ids(backend: tokenizers.Tokenizer, eos_id: int | None, listed=()) -> set[int]:
    """eos, the ids a config lists, and whichever END_OF_TURN_TOKENS the vocabulary has as special tokens."""
    specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    ids = {i for i in (eos_id, *listed) if i is not None}
    return ids | {specials[t] for t in END_OF_TURN_TOKENS if t in specials}


def _chat_template(directory: Path, config: dict) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the one named "default", else the first
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"chat_template in {directory} is neither a string nor a list of named templates")
    return template


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    """An id field that may be an int, a list of ints, or missing."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"cannot read {path}: expected a JSON object")
    return data


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temp file next to `path`, then rename over it: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
