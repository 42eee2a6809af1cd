"""Weight-only int8 / int4: kernels against dequantize-then-matmul, GGUF blocks loaded bit-exactly,
quantized native checkpoints and conversion-cache entries loaded back as they are. (~25 s)"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

import gptchat  # noqa: E402
import gptchat.checkpoints as checkpoints  # noqa: E402
import gptchat.quantize as quantize  # noqa: E402
from gptchat.checkpoints.gguf import unpermute  # noqa: E402
from gptchat.checkpoints.native import save_native  # noqa: E402
from gptchat.quantize import (  # noqa: E402
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    dequantize_parts,
    from_blocks,
    quantize_int4,
)

from gguf_writer import write_gguf  # noqa: E402
from tiny_models import hf_llama  # noqa: E402

needs_int4 = pytest.mark.skipif(not quantize.int4_kernel_available(), reason="no int4 CPU kernel in this torch")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCHAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def random_weight(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, :40] *= 20  # an outlier group: scales differ from group to group
    return w


def gguf_blocks(w: torch.Tensor, qtype: Q) -> np.ndarray:
    return gguf.quants.quantize(w.numpy(), qtype)


# ---- GGUF blocks -> our tensors, bit for bit ----


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_blocks_dequantize_bit_exactly(qtype):
    w = random_weight(48, 96)
    blocks = gguf_blocks(w, qtype)
    parts = from_blocks(qtype.name, blocks, 48, 96)
    assert parts["weight"].dtype == (torch.int8 if qtype == Q.Q8_0 else torch.uint8)
    expected = gguf.quants.dequantize(blocks, qtype)
    np.testing.assert_array_equal(dequantize_parts(parts).numpy(), expected)
    # and the layer built from them gives the same weight, its embedding rows too
    module = (Int8Linear(96, 48, False, groups=3) if qtype == Q.Q8_0 else Int4Linear(96, 48, False))
    for name, tensor in parts.items():
        setattr(module, name, tensor)
    np.testing.assert_array_equal(module.dequantized().numpy(), expected)
    np.testing.assert_array_equal(module.rows(torch.tensor([[3, 0], [47, 3]])).numpy(), expected[[[3, 0], [47, 3]]])


# ---- kernels against dequantize-then-matmul ----


def check_against_dequantized(module, in_features):
    reference = torch.nn.functional.linear
    ours = gptchat.kernels.ops() is not None and module.kernel_serves()
    for rows in (1, 5, 64):  # gptchat's kernel at every row count (16-bit activations); else few rows: PyTorch's
        x = torch.randn(rows, in_features)  # kernels (bfloat16 activations), many: a float32 matmul
        expected = reference(x, module.dequantized(), module.bias)
        # each output's error is ~1% of the sum of |x w| it adds up at most (8-bit activations)
        tolerance = 2e-2 * (x.abs() @ module.dequantized().abs().T) if ours or rows <= quantize.SMALL_BATCH else 1e-5
        assert ((module(x) - expected).abs() <= tolerance).all(), rows
        assert module(x[None]).shape == (1, rows, module.out_features)


@needs_int4
def test_int4_linear_matches_dequantized_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    linear.weight.data = random_weight(96, 256)
    q = Int4Linear.from_linear(linear)
    w = linear.weight
    step = q.scale.repeat_interleave(32, dim=1)
    assert ((q.dequantized() - w).abs() <= step / 2 + 1e-6).all()  # the rounding error bound
    check_against_dequantized(q, 256)


@needs_int4
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_layers_from_gguf_blocks_match_dequantized_matmul(qtype):
    parts = from_blocks(qtype.name, gguf_blocks(random_weight(64, 128, seed=1), qtype), 64, 128)
    module = Int8Linear(128, 64, True, groups=4) if qtype == Q.Q8_0 else Int4Linear(128, 64, True)
    for name, tensor in parts.items():
        setattr(module, name, tensor)
    module.bias = torch.randn(64)
    check_against_dequantized(module, 128)


def test_int8_per_row_linear_matches_dequantized_matmul():
    """One scale per row (int8 checkpoints written before grouped scales, or no int4 kernel): the int8 kernel."""
    linear = torch.nn.Linear(256, 96)
    q = Int8Linear(256, 96, True)
    q.weight, q.scale = quantize.quantize_int8(linear.weight.detach())
    q.bias = linear.bias.detach()
    assert q.scale.shape == (96, 1)
    assert (q.dequantized() - linear.weight).abs().max() <= q.scale.max() / 2 + 1e-7
    check_against_dequantized(q, 256)


def test_odd_shapes_fall_back_to_int8():
    model = torch.nn.Sequential(torch.nn.Linear(40, 24))  # 40 columns: no whole groups of 32
    quantize.quantize_model(model, "int4")
    assert isinstance(model[0], Int8Linear)


# ---- whole models: GGUF -> int4 exactly, native checkpoints, the cache ----

TYPES = {"token_embd": "Q8_0", "blk.*.attn_*": "Q4_1", "blk.0.ffn_*": "Q4_0", "blk.1.ffn_*": "Q4_1"}


@pytest.fixture(scope="module")
def tied_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("qsrc")
    model = hf_llama(root / "src", seed=7, tie=True)
    return write_gguf(model, root / "src", root / "q.gguf", types=TYPES)


def test_gguf_loads_into_int4_bit_exactly(tied_gguf):
    lm = gptchat.load_model(tied_gguf, quant="int4", use_cache=False)
    assert lm.info["quant"] == "int4"
    model, c = lm.model, lm.config
    assert isinstance(model.tok_emb, QuantizedEmbedding) and isinstance(model.tok_emb.head, Int8Linear)
    by_name = {t.name: t for t in gguf.GGUFReader(tied_gguf).tensors}

    def ggml(name):
        t = by_name[name]
        return gguf.quants.dequantize(t.data, t.tensor_type)

    np.testing.assert_array_equal(model.tok_emb.head.dequantized().numpy(), ggml("token_embd.weight"))
    for i, block in enumerate(model.blocks):
        assert isinstance(block.attn.wqkv, Int4Linear) and isinstance(block.mlp.w_gate_up, Int4Linear)
        qkv = np.concatenate([unpermute(ggml(f"blk.{i}.attn_q.weight"), c.n_head),
                              unpermute(ggml(f"blk.{i}.attn_k.weight"), c.n_kv_head), ggml(f"blk.{i}.attn_v.weight")])
        np.testing.assert_array_equal(block.attn.wqkv.dequantized().numpy(), qkv)
        gate_up = np.concatenate([ggml(f"blk.{i}.ffn_gate.weight"), ggml(f"blk.{i}.ffn_up.weight")])
        np.testing.assert_array_equal(block.mlp.w_gate_up.dequantized().numpy(), gate_up)
        np.testing.assert_array_equal(block.mlp.w_down.dequantized().numpy(), ggml(f"blk.{i}.ffn_down.weight"))

    exact = gptchat.load_model(tied_gguf, quant="none", use_cache=False).model
    ids = torch.randint(0, c.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - exact(ids)).abs().max() < 1e-4  # prompt rows: the same float32 weights
        a, b = model(ids[:, :1]), exact(ids[:, :1])  # one row: the bfloat16 kernels
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_mixed_block_types_are_fused_after_dequantizing(tmp_path):
    """q, k, v of different types cannot share one quantized layer: they are requantized together."""
    model = hf_llama(tmp_path / "src", seed=8, tie=False)
    path = write_gguf(model, tmp_path / "src", tmp_path / "m.gguf",
                      types={"blk.*.attn_q": "Q8_0", "blk.*.attn_k": "Q4_0", "*": "Q4_1"})
    lm = gptchat.load_model(path, quant="int4", use_cache=False)
    exact = gptchat.load_model(path, quant="none", use_cache=False)
    assert isinstance(lm.model.blocks[0].attn.wqkv, Int4Linear) and isinstance(lm.model.lm_head, Int4Linear)
    w = lm.model.blocks[0].attn.wqkv.dequantized()
    ref = exact.model.blocks[0].attn.wqkv.weight
    assert 0 < (w - ref).abs().max() <= lm.model.blocks[0].attn.wqkv.scale.max() / 2 + 1e-6


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_native_checkpoint_loads_without_requantizing(tied_gguf, tmp_path, monkeypatch, mode):
    lm = gptchat.load_model(tied_gguf, quant=mode)
    save_native(tmp_path / "q", lm.config, lm.model.state_dict(), lm.tokenizer, {"name": "tiny"})

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a quantized checkpoint was quantized again")

    monkeypatch.setattr(quantize, "quantize_int8", no_quantizing)
    monkeypatch.setattr(quantize, "quantize_int4", no_quantizing)
    again = gptchat.load_model(tmp_path / "q", quant="auto")  # auto: as saved
    assert again.info["quant"] == mode
    ids = torch.randint(0, lm.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(lm.model(ids), again.model(ids))
        assert torch.equal(lm.model(ids[:, :2]), again.model(ids[:, :2]))
    other = "int8" if mode == "int4" else "int4"
    for wrong in ("none", other):
        with pytest.raises(gptchat.ModelLoadError, match=mode):
            gptchat.load_model(tmp_path / "q", quant=wrong)
    # and the conversion cache gives the same model without reading the GGUF again
    monkeypatch.setattr(checkpoints, "load_gguf", no_quantizing)
    cached = gptchat.load_model(tied_gguf, quant=mode)
    with torch.no_grad():
        assert torch.equal(cached.model(ids), lm.model(ids))


def test_int4_from_float_weights(tiny_llama_dir):
    exact = gptchat.load_model(tiny_llama_dir[0])
    lm = gptchat.load_model(tiny_llama_dir[0], quant="int4")
    assert lm.info["quant"] == "int4" and isinstance(lm.model.lm_head, Int4Linear)
    w, q = exact.model.blocks[0].mlp.w_down.weight, lm.model.blocks[0].mlp.w_down
    assert torch.equal(q.weight, quantize_int4(w)[0])
    ids = torch.randint(0, exact.config.vocab_size, (1, 30))
    with torch.no_grad():
        a, b = exact.model(ids), lm.model(ids)
    assert (a - b).abs().max() < 0.2 * a.abs().max()  # 16 levels per group of random weights: ~8% per weight
