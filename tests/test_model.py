"""The GPT against transformers on the same weights, the KV cache, batching, native checkpoints, int8."""

import os

import pytest
import torch

import gptchat
from gptchat.checkpoints.native import save_native
from gptchat.engine import Engine
from gptchat.model import GPT, GPTConfig, KVCache
from gptchat.quantize import Int8Linear, quantize_int8
from gptchat.sampling import SamplingParams


def logits_diff(ref, lm, ids):
    with torch.no_grad():
        return (ref(ids).logits - lm.model(ids)).abs().max().item()


@pytest.mark.parametrize("which", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_hf_directory_matches_transformers(which, request):
    directory, ref = request.getfixturevalue(which)
    lm = gptchat.load_model(directory)
    assert lm.info["format"] == "hf"
    ids = torch.randint(0, lm.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    assert logits_diff(ref, lm, ids) < 1e-4


def test_llama_gqa_and_untied_head_are_read(tiny_llama_dir):
    lm = gptchat.load_model(tiny_llama_dir[0])
    c = lm.config
    assert (c.arch, c.n_head, c.n_kv_head, c.tie_embeddings, c.rope_theta) == ("llama", 4, 2, False, 5000.0)


def test_tied_llama_matches_transformers(tmp_path):
    import tiny_models

    ref = tiny_models.hf_llama(tmp_path, seed=3, tie=True)
    lm = gptchat.load_model(tmp_path)
    assert lm.config.tie_embeddings and not hasattr(lm.model, "lm_head")
    ids = torch.randint(0, lm.config.vocab_size, (2, 25))
    assert logits_diff(ref, lm, ids) < 1e-4


def test_native_round_trip(tiny_llama_dir, tmp_path):
    lm = gptchat.load_model(tiny_llama_dir[0])
    save_native(tmp_path / "ckpt", lm.config, lm.model.state_dict(), lm.tokenizer, {"name": "tiny"})
    again = gptchat.load_model(tmp_path / "ckpt")
    assert again.info["format"] == "native" and again.name == "tiny"
    ids = torch.randint(0, lm.config.vocab_size, (2, 30))
    with torch.no_grad():
        assert torch.equal(lm.model(ids), again.model(ids))
    assert again.tokenizer.encode("Hello 你好") == lm.tokenizer.encode("Hello 你好")
    assert again.tokenizer.chat_template == lm.tokenizer.chat_template


def test_native_int8_checkpoint_loads_quantized(tiny_llama_dir, tmp_path):
    lm = gptchat.load_model(tiny_llama_dir[0], quant="int8")
    assert lm.info["quant"] == "int8"
    save_native(tmp_path / "q", lm.config, lm.model.state_dict(), lm.tokenizer)
    again = gptchat.load_model(tmp_path / "q", quant="int8")
    assert any(isinstance(m, Int8Linear) for m in again.model.modules())
    ids = torch.randint(0, lm.config.vocab_size, (1, 30))
    with torch.no_grad():
        assert torch.equal(lm.model(ids), again.model(ids))
    with pytest.raises(gptchat.ModelLoadError, match="int8"):
        gptchat.load_model(tmp_path / "q", quant="none")


@pytest.mark.parametrize("which", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_kv_cache_decoding_equals_full_recompute(which, request):
    lm = gptchat.load_model(request.getfixturevalue(which)[0])
    model = lm.model
    ids = [5, 17, 99, 3, 250, 41, 7]
    cache = KVCache(lm.config, 1, 4)  # small on purpose: it must grow
    with torch.no_grad():
        step_logits = [model(torch.tensor([ids]), cache=cache)[0, -1]]
        for _ in range(15):
            token = int(step_logits[-1].argmax())
            ids.append(token)
            step_logits.append(model(torch.tensor([[token]]), cache=cache)[0, -1])
        full = model(torch.tensor([ids]))[0]
    # every cached step's logits equal the full sequence's logits at that position, so tokens agree too
    for i, logits in enumerate(step_logits[:-1]):
        assert (logits - full[6 + i]).abs().max() < 1e-4
    assert [int(full[6 + i].argmax()) for i in range(15)] == ids[7:]


def test_cache_continuation_with_several_tokens(tiny_llama_dir):
    """Prefill in pieces (a chat turn appended to a cached history) equals prefill at once."""
    lm = gptchat.load_model(tiny_llama_dir[0])
    ids = torch.randint(0, lm.config.vocab_size, (1, 40))
    cache = KVCache(lm.config, 1, 40)
    with torch.no_grad():
        parts = [lm.model(ids[:, a:b], cache=cache) for a, b in ((0, 13), (13, 30), (30, 40))]
        assert (torch.cat(parts, 1) - lm.model(ids)).abs().max() < 1e-4


def test_cache_rows_and_front_moves_keep_what_is_filled(tiny_llama_dir):
    """select (rows leave a batch) and drop_front (padding no row needs) move the filled positions only."""
    lm = gptchat.load_model(tiny_llama_dir[0])
    cache = KVCache(lm.config, 3, 16)
    keys = torch.randn(lm.config.n_layer, 3, lm.config.n_kv_head, 10, lm.config.head_dim)
    cache.k[:, :, :, :10], cache.v[:, :, :, :10] = keys, -keys
    cache.advance(10)
    cache.select([2, 0])
    assert (cache.batch_size, cache.length, cache.capacity) == (2, 10, 16)
    assert torch.equal(cache.k[:, :, :, :10], keys[:, [2, 0]]) and torch.equal(cache.v[:, :, :, :10], -keys[:, [2, 0]])
    cache.drop_front(4)
    assert (cache.length, cache.capacity) == (6, 12)
    assert torch.equal(cache.k[:, :, :, :6], keys[:, [2, 0], :, 4:])
    assert not cache.k[:, :, :, 6:].any()  # beyond the filled positions: zeros, as a new cache
    cache.reserve(20)
    assert cache.capacity == 24 and torch.equal(cache.v[:, :, :, :6], -keys[:, [2, 0], :, 4:])


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_cache_memory_is_resident_only_where_filled():
    """A cache reserved for a long context costs only the positions written: 2 x 128 MiB reserved here, of
    which 1/64 is filled."""
    config = GPTConfig(n_layer=4, n_head=4, n_kv_head=4, n_embd=256, max_seq_len=8192)
    before = resident_mib()
    cache = KVCache(config, 4, 8192)
    assert cache.k.numel() * cache.k.element_size() == 128 * 2**20
    cache.k[:, :, :, :128] = 1.0
    cache.v[:, :, :, :128] = 1.0
    assert resident_mib() - before < 16
    assert not cache.k[:, :, :, 128:].any()  # the rest reads as zeros, Linux's shared zero page
    assert resident_mib() - before < 16


@pytest.mark.parametrize("which", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_batch_decoding_equals_decoding_alone(which, request):
    engine = Engine(gptchat.load_model(request.getfixturevalue(which)[0]))
    prompts = [[5, 6, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108], [42], [9, 8, 7, 6, 5, 4]]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (12, 5, 20, 9)]
    batch = engine.generate_batch(prompts, params)
    for prompt, p, got in zip(prompts, params, batch):
        alone = engine.generate(prompt, p)
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text and got.finish_reason == alone.finish_reason


def test_padding_rows_stay_finite(tiny_llama_dir):
    lm = gptchat.load_model(tiny_llama_dir[0])
    ids = torch.tensor([[0, 0, 0, 5, 6], [1, 2, 3, 4, 5]])
    key_mask = torch.tensor([[False, False, False, True, True], [True] * 5])
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = lm.model(ids, positions=positions, key_mask=key_mask, cache=KVCache(lm.config, 2, 5))
        alone = lm.model(torch.tensor([[5, 6]]))
    assert torch.isfinite(out).all()
    assert (out[0, -2:] - alone[0]).abs().max() < 1e-4


def test_chunked_prefill_equals_one_shot(tiny_llama_dir, monkeypatch):
    lm = gptchat.load_model(tiny_llama_dir[0])
    prompt = list(range(3, 60))
    params = SamplingParams(max_new_tokens=10, temperature=0)
    whole = Engine(lm).generate(prompt, params)
    monkeypatch.setattr(gptchat.engine, "PREFILL_CHUNK", 7)
    assert Engine(lm).generate(prompt, params).token_ids == whole.token_ids


def test_engine_reuses_shared_prefix(tiny_llama_dir):
    engine = Engine(gptchat.load_model(tiny_llama_dir[0]))
    params = SamplingParams(max_new_tokens=8, temperature=0)
    first = engine.generate([5, 6, 7, 8, 9], params)
    follow = [5, 6, 7, 8, 9] + first.token_ids + [11, 12]
    reused = engine.generate(follow, params)
    assert engine._cached_ids[: len(follow)] == follow
    assert reused.token_ids == Engine(engine.lm).generate(follow, params).token_ids


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        GPTConfig(n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="architecture"):
        GPTConfig(arch="mamba")
    model = GPT(GPTConfig(arch="gpt2", vocab_size=50, n_layer=1, n_head=2, n_embd=16, max_seq_len=8))
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_fresh_model_is_initialised():
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, max_seq_len=16))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert 0.01 < model.tok_emb.weight.std().item() < 0.03


def test_int8_linear_matches_dequantized_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    q = Int8Linear.from_linear(linear)
    w_int8, scale = quantize_int8(linear.weight, q.group_size)
    assert torch.equal(q.weight, w_int8)
    assert (q.dequantized() - linear.weight).abs().max() <= scale.max() / 2 + 1e-7  # rounding error bound
    reference = torch.nn.functional.linear
    ours = gptchat.kernels.ops() is not None  # gptchat's kernel for every row count (16-bit activations)
    for rows in (1, 4, 64):  # else few rows: PyTorch's int8 kernel in bfloat16; many: dequantized float32
        x = torch.randn(rows, 256)
        expected = reference(x, q.dequantized(), q.bias)
        tolerance = 2e-2 * expected.abs().max() if ours or rows <= 16 else 1e-5
        assert (q(x) - expected).abs().max() <= tolerance


def test_int8_model_stays_close(tiny_llama_dir):
    exact = gptchat.load_model(tiny_llama_dir[0])
    quant = gptchat.load_model(tiny_llama_dir[0], quant="int8")
    ids = torch.randint(0, exact.config.vocab_size, (1, 30))
    with torch.no_grad():
        a, b = exact.model(ids), quant.model(ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_cache_dtype_follows_the_weights(tiny_llama_dir):
    """Quantized models keep their keys and values in float16 where gptchat's kernel reads them (half the bytes
    a decoded token reads); float32 models keep the exact float32 path."""
    exact = gptchat.load_model(tiny_llama_dir[0])
    assert exact.model.cache_dtype() == torch.float32
    quant = gptchat.load_model(tiny_llama_dir[0], quant="int8")
    expected = torch.float16 if gptchat.kernels.ops() is not None else torch.float32
    assert quant.model.cache_dtype() == expected
    engine = Engine(quant)
    engine.generate([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=0))
    assert engine._cache.dtype == expected
    # a prompt that continues the cache runs PyTorch's attention over the float16 keys and values
    params = SamplingParams(max_new_tokens=3, temperature=0)
    again = engine.generate([1, 2, 3, 4, 5], params)
    assert again.token_ids == Engine(quant).generate([1, 2, 3, 4, 5], params).token_ids
