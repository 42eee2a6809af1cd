"""gptchat's AVX2 kernel for quantized matmuls (gptchat/kernels) against the dequantized
float32 matmul, and the fallback to PyTorch's kernels. (~30 s, most of it compiling the kernel once)

The kernel quantizes each row of x per block of 32 columns to 16-bit integers (x ~= qx * dx, dx = max|x| /
32767), so each x is off by at most dx / 2: |y - x @ w.T| <= sum over columns of |w| * dx / 2 bounds the error. The
kernel's result is the dequantized w times the quantized x: with x quantized in Python, the two must match to
float rounding. The kernel reads the weights in its own layout (8 rows side by side, `to_lanes`), which must
hold the same values as the portable one.
"""

import os

import pytest
import torch

from gptchat import kernels, quantize
from gptchat.cpu import cpu_flags
from gptchat.quantize import Int4Linear, Int8Linear, quantize_int8

SHAPES = [(96, 576), (44, 1536), (12290, 576)]  # (N, K): a small layer, SmolLM2's down_proj K, a tall head
# (44 and 12290 rows: the kernel layout pads the last group of 8 rows)
ROWS = [1, 3, 6, 16, 37]  # tiles of 4, 3, 2 and 1 rows of x; 37: a prompt


@pytest.fixture(scope="module")
def ops():
    if not kernels.cpu_supported():
        pytest.skip("the kernel needs AVX2, FMA and F16C")
    ops = kernels.ops()
    assert ops is not None, "the kernel did not build (see the log)"
    return ops


@pytest.fixture
def has_avx512(ops):
    """Whether this CPU has what the kernels' AVX-512 paths need (simd.h); afterwards set_vnni is back at the
    library's default, whatever the test switched it to."""
    yield {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu_flags()
    ops.set_vnni(os.environ.get("GPTCHAT_VNNI") != "0")


def layer(kind, N, K):
    g = torch.Generator().manual_seed(N + K)
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = torch.randn(N, K, generator=g) * 0.05
    if kind == "int4":
        return Int4Linear.from_linear(linear)
    q = Int8Linear(K, N, False)
    q.weight, q.scale = quantize_int8(linear.weight.detach(), 32 if kind == "int8 grouped" else None)
    return q


def portable(q):
    return list(q.portable().values())


def kernel_matmul(ops, q, x):
    """x @ w.T by the kernel, from the layer's portable tensors converted to the kernel's layout."""
    parts = ops.to_lanes(*portable(q), *([] if isinstance(q, Int4Linear) else [None]))
    linear = ops.int4_linear if isinstance(q, Int4Linear) else ops.int8_linear
    return linear(x, *parts, q.out_features)


def quantized_x(x):
    """x as the kernel sees it (per block of 32: round(x * 32767 / max|x|) * max|x| / 32767), and dx / 2."""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 32767 / amax, 0))
    return (q * (amax / 32767)).view_as(x), (amax / 65534).expand_as(blocks).reshape_as(x)


@pytest.mark.parametrize("kind", ["int4", "int8 grouped", "int8 per row"])
@pytest.mark.parametrize("N,K", SHAPES)
def test_kernel_matches_dequantized_matmul(ops, kind, N, K):
    q = layer(kind, N, K)
    w = q.dequantized()
    for M in ROWS:
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        y = kernel_matmul(ops, q, x)
        assert y.shape == (M, N) and y.dtype == torch.float32
        xq, half_step = quantized_x(x)
        exact = x @ w.T
        rounding = 1e-5 * exact.abs().max()  # float32 sums in another order
        assert ((y - xq @ w.T).abs() <= rounding).all(), (kind, M)
        assert ((y - exact).abs() <= half_step @ w.abs().T + rounding).all(), (kind, M)
        assert torch.equal(q(x), y)  # the layer's forward uses the kernel, for decoding and prompts
    assert q.lanes  # and from then on holds the kernel's layout


@pytest.mark.parametrize("kind", ["int4", "int8 grouped", "int8 per row"])
def test_vnni_and_avx2_dot_products_give_the_same_numbers(ops, has_avx512, kind):
    """Where the CPU has AVX-512 with VNNI the kernel's integer dot products take vpdpwssd on 512-bit vectors
    of 16 rows; its sums are exact, as _mm256_madd_epi16's and an addition's are, so both tiles give the same
    result bit for bit, at every tile size. Elsewhere set_vnni(True) says it is off."""
    q = layer(kind, 44, 1536)
    assert ops.set_vnni(True) == has_avx512
    for M in ROWS:
        x = torch.randn(M, 1536, generator=torch.Generator().manual_seed(M))
        assert ops.set_vnni(True) == has_avx512
        vnni = kernel_matmul(ops, q, x)
        assert ops.set_vnni(False) is False
        assert torch.equal(vnni, kernel_matmul(ops, q, x)), (kind, M)


@pytest.mark.parametrize("kind", ["int4", "int8 grouped", "int8 per row"])
@pytest.mark.parametrize("N", [8, 21, 64])
def test_kernel_layout_holds_the_same_weights(ops, kind, N):
    """A layer in the kernel's layout gives back its portable tensors (state_dict), bit for bit, and the same
    embedding rows and dequantized weights; loading a state dict into it takes the portable form again."""
    q = layer(kind, N, 96)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    idx = torch.tensor([[0, N - 1], [N // 2, 7 % N]])
    rows, w = q.rows(idx), q.dequantized()
    parts = ops.to_lanes(*portable(q), *([] if kind == "int4" else [None]))
    offset = parts[2] if kind == "int4" else None
    back = quantize.lanes_to_portable(parts[0], parts[1], offset, N, 96)
    back["scale"] = back["scale"][:, : before["scale"].shape[1]]  # per row: the layout repeats it per block
    assert all(torch.equal(back[k], before[k]) for k in before)
    q(torch.randn(1, 96))
    assert q.lanes and q.weight.shape[0] == -(-N // quantize.LANES)
    after = q.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(q.rows(idx), rows) and torch.equal(q.dequantized(), w)
    q.load_state_dict(before)
    assert not q.lanes and all(torch.equal(getattr(q, k), before[k]) for k in before)


def test_quantizers_give_float16_scales_and_offsets(ops):
    """What the kernel's layout holds in float16 (and GGUF's blocks do): the quantizers round them so, and the
    layout holds them exactly."""
    for kind in ("int4", "int8 grouped", "int8 per row"):
        q = layer(kind, 40, 96)
        parts = portable(q)[1:]
        assert all(t.dtype == torch.float32 and torch.equal(t, t.half().float()) for t in parts), kind
        lanes = ops.to_lanes(*portable(q), *([] if kind == "int4" else [None]))
        assert all(t.dtype == torch.float16 for t in lanes[1:]), kind


def test_scales_that_are_not_float16_values(ops):
    """A layer saved with float32 scales (an older checkpoint): the layout rounds them to float16, and the
    layer then reports the weights its kernel reads."""
    q = layer("int4", 16, 64)
    q.scale = q.scale * (1 + 2.0**-14)  # between float16 values
    x = torch.randn(2, 64)
    y = q(x)
    assert q.lanes
    w = q.dequantized()
    assert torch.equal(q.portable()["scale"], q.portable()["scale"].half().float())
    xq, _ = quantized_x(x)
    assert ((y - xq @ w.T).abs() <= 1e-5 * y.abs().max()).all()


def test_scales_beyond_float16_stay_out_of_the_kernel(ops):
    """float16 holds magnitudes up to 65504: a layer with larger scales is not converted, and its matmul
    stays right (PyTorch's path)."""
    q = layer("int8 per row", 16, 64)
    q.scale = q.scale * 1e9
    x = torch.randn(2, 64)
    y = q(x)
    assert not q.lanes
    assert torch.allclose(y, x @ q.dequantized().T, rtol=2e-2, atol=2e-2 * y.abs().max().item())


def test_bad_inputs_get_a_clear_error(ops):
    q = layer("int4", 32, 64)
    parts = ops.to_lanes(*portable(q))
    with pytest.raises(RuntimeError, match="x has 32 columns; the weight wants 64"):
        ops.int4_linear(torch.randn(1, 32), *parts, 32)
    with pytest.raises(RuntimeError, match="to_lanes: int4 weights need an offset"):
        ops.to_lanes(q.weight, q.scale, None)


def test_weights_in_any_memory_layout(ops):
    q, x = layer("int4", 64, 128), torch.randn(2, 128)
    parts = ops.to_lanes(*portable(q))
    strided = [t.t().contiguous().t() for t in parts]  # same values, column-major
    assert torch.equal(ops.int4_linear(x, *strided, 64), ops.int4_linear(x, *parts, 64))
    strided = [t.t().contiguous().t() for t in portable(q)]
    assert all(torch.equal(a, b) for a, b in zip(ops.to_lanes(*strided), parts))


@pytest.mark.parametrize("kind", ["int4", "int8 grouped", "int8 per row"])
@pytest.mark.parametrize("N,K", [(8, 32), (21, 96), (96, 576), (44, 1536)])
def test_bf16_dequantization_equals_dequantized_weights(ops, kind, N, K):
    """lanes_to_bf16 gives the layer's dequantized float32 weights rounded to bfloat16, bit for bit, for row
    counts that fill the last group of 8 or not."""
    q = layer(kind, N, K)
    expected = q.dequantized().bfloat16()
    parts = ops.to_lanes(*portable(q), *([] if kind == "int4" else [None]))
    got = ops.lanes_to_bf16(parts[0], parts[1], parts[2] if kind == "int4" else None, N)
    assert got.dtype == torch.bfloat16 and got.shape == (N, K)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("kind", ["int4", "int8 grouped", "int8 per row"])
def test_prompts_under_bf16_autocast_take_a_bf16_matmul(ops, kind):
    """Under bfloat16 autocast (the engine's prompts on CPUs with avx512_bf16), a layer given at least
    BF16_PROMPT_ROWS rows multiplies them in bfloat16 by its dequantized weights; fewer rows, and every row
    without autocast, go through the kernel in float32."""
    q = layer(kind, 40, 96)
    q.bias = torch.randn(40)
    w = q.dequantized()
    for rows in (1, quantize.BF16_PROMPT_ROWS - 1, quantize.BF16_PROMPT_ROWS, 200):
        x = torch.randn(1, rows, 96, generator=torch.Generator().manual_seed(rows))
        kernel = q(x)
        assert kernel.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = q(x)
            reference = torch.nn.functional.linear(x, w.bfloat16(), q.bias)
        if rows < quantize.BF16_PROMPT_ROWS:
            assert torch.equal(y, kernel)
        else:
            assert y.dtype == torch.bfloat16 and y.shape == (1, rows, 40)
            assert torch.equal(y, reference)
            torch.testing.assert_close(y.float(), x @ w.T + q.bias, rtol=0.02, atol=0.02)


def test_fake_kernel_for_torch_compile(ops):
    q = layer("int8 grouped", 60, 128)
    parts = ops.to_lanes(q.weight, q.scale, None)
    torch.library.opcheck(torch.ops.gptchat.int8_linear.default, (torch.randn(3, 128), *parts, 60))
    q = layer("int4", 60, 128)
    parts = ops.to_lanes(*portable(q))
    torch.library.opcheck(torch.ops.gptchat.int4_linear.default, (torch.randn(3, 128), *parts, 60))
    torch.library.opcheck(torch.ops.gptchat.to_lanes.default, portable(q))
    torch.library.opcheck(torch.ops.gptchat.lanes_to_bf16.default, (*parts, 60))


def test_aten_fallback(ops, monkeypatch):
    q, x = layer("int4", 96, 576), torch.randn(1, 576)  # one row: gptchat's kernel by default
    ours = q(x)
    monkeypatch.setenv("GPTCHAT_KERNELS", "aten")
    assert kernels.ops() is None
    theirs = q(x)  # PyTorch's int4 kernel, bfloat16 activations
    assert not torch.equal(ours, theirs)
    exact = x @ q.dequantized().T
    assert (theirs - exact).abs().max() <= 2e-2 * exact.abs().max()


def test_failed_build_falls_back_with_a_log(monkeypatch, caplog, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "cpu_supported", lambda: True)
    monkeypatch.setattr(kernels, "build_target", lambda: ("gptchat_quant_matmul_test", tmp_path))  # not built yet
    with caplog.at_level("WARNING", logger="gptchat.kernels"):
        assert kernels.build() is None
    assert "could not build quant_matmul.cpp" in caplog.text and "g++: command not found" in caplog.text


def test_a_damaged_library_is_built_again(monkeypatch, caplog, tmp_path):
    """A compiled library that no longer loads (a truncated file) is rebuilt, not a crash."""
    from torch.utils import cpp_extension

    (tmp_path / "gptchat_quant_matmul_test.so").write_bytes(b"not a library")
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs["name"]))
    monkeypatch.setattr(kernels, "cpu_supported", lambda: True)
    monkeypatch.setattr(kernels, "build_target", lambda: ("gptchat_quant_matmul_test", tmp_path))
    with caplog.at_level("WARNING", logger="gptchat.kernels"):
        kernels.build()
    assert calls == ["gptchat_quant_matmul_test"] and "building it again" in caplog.text
    assert not (tmp_path / "gptchat_quant_matmul_test.so").exists()  # removed, so the build really runs


@pytest.mark.parametrize("head_dim", [64, 16])  # 32 columns per task, or 8
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("keys", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the cache's
def test_decode_attention_ops_equal_sdpa(ops, group, keys, head_dim, dtype):
    """One query per row over a cache (views of a larger capacity, as the KV cache hands them out): gqa_scores,
    softmax and gqa_mix give PyTorch's scaled_dot_product_attention with enable_gqa; a float16 cache gives
    what PyTorch computes on its values in float32."""
    B, kv_heads, D, capacity = 2, 2, head_dim, 512
    g = torch.Generator().manual_seed(keys * group)
    cache_k, cache_v = torch.randn(2, B, kv_heads, capacity, D, generator=g).to(dtype).float()
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]
    q = torch.randn(B, kv_heads * group, 1, D, generator=g)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)
    k, v = cache_k.to(dtype)[:, :, :keys], cache_v.to(dtype)[:, :, :keys]
    scores = ops.gqa_scores(q[:, :, 0] * D**-0.5, k)
    assert scores.shape == (B, kv_heads * group, keys)
    y = ops.gqa_mix(scores.softmax(-1), v)
    assert (y[:, :, None] - expected).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the cache's (float16: a quantized model's own)
def test_decode_attention_in_the_model(ops, tiny_llama_dir, dtype):
    """A quantized model decodes one token with the ops (its kernel is loaded), alone or in a padded batch (the
    padding keys masked), and gives PyTorch's attention's logits."""
    import gptchat
    from gptchat.model import KVCache, decode_attention_ops

    lm = gptchat.load_model(tiny_llama_dir[0], quant="int8")
    assert decode_attention_ops(torch.zeros(1, 4, 1, lm.config.head_dim), 2) is ops
    logits, batch_logits = {}, {}
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])  # a batch: the first row left-padded, keys masked
    key_mask = ids != 0
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    step_mask = torch.cat([key_mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    for name, kernels_env in (("ours", None), ("pytorch", "aten")):
        with pytest.MonkeyPatch.context() as mp:
            if kernels_env:
                mp.setattr(kernels, "loaded", lambda: None)
            cache, batch = KVCache(lm.config, 1, 32, dtype=dtype), KVCache(lm.config, 2, 32, dtype=dtype)
            with torch.inference_mode():
                lm.model(torch.tensor([[5, 6, 7, 8, 9]]), cache=cache)
                logits[name] = lm.model(torch.tensor([[10]]), cache=cache)[0, -1]
                lm.model(ids, cache=batch, positions=positions, key_mask=key_mask)
                batch_logits[name] = lm.model(torch.tensor([[11], [12]]), cache=batch, positions=positions[:, -1:] + 1,
                                              key_mask=step_mask)[:, -1]
    for got in (logits, batch_logits):
        assert (got["ours"] - got["pytorch"]).abs().max() < 1e-4 * got["pytorch"].abs().max()


def test_decode_attention_bad_shapes(ops):
    with pytest.raises(RuntimeError, match="H / Hkv <= 8"):
        ops.gqa_scores(torch.randn(1, 18, 64), torch.randn(1, 2, 5, 64))
    with pytest.raises(RuntimeError, match="head sizes differ"):
        ops.gqa_scores(torch.randn(1, 4, 64), torch.randn(1, 2, 5, 32))
    with pytest.raises(RuntimeError, match="float32 or float16"):
        ops.gqa_mix(torch.randn(1, 4, 5), torch.randn(1, 2, 5, 64, dtype=torch.bfloat16))


def causal_sdpa(q, k, v):
    """PyTorch's attention in float32 for queries at the last T of S key positions, grouped heads."""
    T, S = q.shape[2], k.shape[2]
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                            enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (8, 40), (2, 8), (3, 96)])  # 40: 32 + 8 columns
@pytest.mark.parametrize("queries,past", [(1, 0), (5, 0), (37, 0), (100, 3), (17, 300)])  # past: keys in the cache
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                    (torch.float16, torch.bfloat16)])  # (queries and output, cache)
def test_prompt_attention_equals_sdpa(ops, group, head_dim, queries, past, dtypes):
    """A prompt's causal attention (query blocks of 16, score tiles of 6 rows, key tiles of 16: these shapes
    have every kind of remainder) gives PyTorch's attention on the same values, in float32 to float rounding and
    otherwise to the output dtype's rounding. The queries are a strided view, as the model hands them over."""
    B, kv_heads = 2, 2
    q_dtype, cache_dtype = dtypes
    g = torch.Generator().manual_seed(queries * group + past)
    qkv = torch.randn(B, queries, kv_heads * (group + 2), head_dim, generator=g).to(q_dtype)
    q = qkv[:, :, : kv_heads * group].transpose(1, 2)
    cache = torch.randn(2, B, kv_heads, 512, head_dim, generator=g).to(cache_dtype)
    k, v = cache[:, :, :, : past + queries]  # views of a larger capacity, as the KV cache hands them out
    y = ops.prompt_attention(q, k, v)
    expected = causal_sdpa(q, k, v)
    assert y.shape == expected.shape and y.dtype == q_dtype
    assert y.transpose(1, 2).is_contiguous()  # [B, T, H, D] in memory: the model's reshape is free
    if q_dtype == torch.float32:
        assert (y - expected).abs().max() < 2e-6
    else:
        assert (y.float() - expected).abs().max() <= 2**-8 * expected.abs().max()


@pytest.mark.parametrize("group,head_dim,queries,past", [(3, 64, 37, 0), (8, 40, 100, 3), (2, 8, 17, 300), (1, 96, 5, 0)])
def test_prompt_attention_avx512_and_avx2_tiles_agree(ops, has_avx512, group, head_dim, queries, past):
    """Where the CPU has AVX-512 the score and mix tiles take 512-bit vectors and more rows at once, doing each
    output's float32 operations in the same order as the AVX2 tiles: the two give the same numbers, bit for bit.
    Elsewhere set_vnni(True) says it is off and both runs take the AVX2 tiles."""
    g = torch.Generator().manual_seed(group + head_dim)
    q = torch.randn(1, 2 * group, queries, head_dim, generator=g).bfloat16()
    k, v = torch.randn(2, 1, 2, past + queries, head_dim, generator=g).half()
    assert ops.set_vnni(True) == has_avx512
    wide = ops.prompt_attention(q, k, v)
    assert ops.set_vnni(False) is False
    assert torch.equal(wide, ops.prompt_attention(q, k, v))


def test_prompt_attention_bad_inputs(ops):
    q, k = torch.randn(1, 4, 5, 64), torch.randn(1, 2, 5, 64)
    with pytest.raises(RuntimeError, match="H not a multiple of Hkv"):
        ops.prompt_attention(torch.randn(1, 3, 5, 64), k, k)
    with pytest.raises(RuntimeError, match="key count"):
        ops.prompt_attention(q, k[:, :, :4], k[:, :, :4])
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.prompt_attention(q[..., :12], k[..., :12], k[..., :12])
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.prompt_attention(q, k, k.half())
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.prompt_attention(q.double(), k.double(), k.double())
    torch.library.opcheck(torch.ops.gptchat.prompt_attention.default, (q, k, k))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_prompt_attention_in_the_model(ops, tiny_llama_dir, precision):
    """A quantized model's prompt, in one piece and continued in a second chunk over its cache, goes through
    prompt_attention (float32, or bfloat16 autocast over a float16 cache as the engine's prompts on avx512_bf16
    CPUs) and gives PyTorch's attention's logits. Training keeps PyTorch's attention (the op has no backward)."""
    import gptchat
    from gptchat.model import prompt_attention_ops

    lm = gptchat.load_model(tiny_llama_dir[0], quant="int8")
    assert prompt_attention_ops(torch.zeros(1, 4, 7, lm.config.head_dim)) is ops
    assert prompt_attention_ops(torch.zeros(1, 4, 7, lm.config.head_dim, requires_grad=True)) is None
    calls = []
    logits = {}
    for name in ("ours", "pytorch"):
        with pytest.MonkeyPatch.context() as mp:
            if name == "pytorch":
                mp.setattr(kernels, "loaded", lambda: None)
            else:
                real = ops.prompt_attention
                mp.setattr(ops, "prompt_attention", lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
            cache = lm.model.new_cache(1, 64)
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bfloat16"):
                first = lm.model(torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), cache=cache)
                second = lm.model(torch.tensor([[12, 13, 14]]), cache=cache)
            logits[name] = torch.cat([first, second], dim=1).float()
    assert len(calls) == 2 * lm.config.n_layer and calls[-1][2] == 3
    tolerance = 1e-4 if precision == "float32" else 2e-2
    assert (logits["ours"] - logits["pytorch"]).abs().max() < tolerance * logits["pytorch"].abs().max()


def rope_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("width", [576, 37])  # SmolLM2's, and one with a tail past the 8-wide vectors
def test_elementwise_ops_equal_pytorch(ops, width):
    """rms_norm as F.rms_norm (the squares summed in another order), rope bit for bit as the model's own
    float32 operations (q and k heads viewed inside the fused qkv output, float32 or bfloat16), silu_mul as
    silu(gate) * up: float32 to rounding, bfloat16 rounded once (no further from float32 than PyTorch's ops)."""
    import torch.nn.functional as F

    from gptchat.model import rope_cos_sin

    g = torch.Generator().manual_seed(0)
    x, weight = 3 * torch.randn(2, 9, width, generator=g), torch.randn(width, generator=g)
    reference = F.rms_norm(x, (width,), weight, 1e-5)
    assert (ops.rms_norm(x, weight, 1e-5) - reference).abs().max() < 1e-6 * reference.abs().max()
    assert (ops.rms_norm(x[:, ::2], weight, 1e-5) - reference[:, ::2]).abs().max() < 1e-6 * reference.abs().max()

    head_dim = 2 * (width // 4)  # 288 or 18 (halves of 144 and 9: vectors and a tail)
    qkv = torch.randn(2, 9, 5, head_dim, generator=g)
    qk = qkv.split((4, 1), dim=2)[0]  # a view: rows are 5 heads apart
    for positions in (torch.arange(3, 12).expand(2, 9), torch.arange(9)[None]):
        cos, sin = rope_cos_sin(positions, head_dim, 10000.0)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(ops.rope(qk.to(dtype), cos, sin), rope_reference(qk.to(dtype), cos, sin))

    gate_up = 4 * torch.randn(3, 7, 2 * width, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    exact = F.silu(gate.double()) * up.double()
    assert (ops.silu_mul(gate_up) - exact).abs().max() < 1e-6 * exact.abs().max()
    half_gate, half_up = gate_up.bfloat16().chunk(2, dim=-1)
    exact = F.silu(half_gate.double()) * half_up.double()
    ours = (ops.silu_mul(gate_up.bfloat16()).double() - exact).abs().max()
    assert ours <= (F.silu(half_gate) * half_up - exact).abs().max() and ours <= 2**-8 * exact.abs().max()


def test_elementwise_ops_bad_inputs(ops):
    with pytest.raises(RuntimeError, match="weight has 3 values for rows of 4"):
        ops.rms_norm(torch.zeros(2, 4), torch.zeros(3), 1e-5)
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        ops.rms_norm(torch.zeros(2, 4).double(), torch.zeros(4), 1e-5)
    with pytest.raises(RuntimeError, match="an even last dimension"):
        ops.silu_mul(torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match=r"cos and sin \[B or 1, T, 1, D\]"):
        ops.rope(torch.zeros(1, 3, 2, 8), torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_elementwise_ops_in_the_model(ops, tiny_llama_dir, precision):
    """A quantized model's prompt and decoded tokens go through rms_norm, rope and silu_mul, from its very first
    call, and give the logits of PyTorch's ops; training (gradients) keeps PyTorch's ops."""
    import gptchat
    from gptchat.model import fused_ops

    lm = gptchat.load_model(tiny_llama_dir[0], quant="int8")
    assert fused_ops(torch.zeros(2, 3, requires_grad=True)) is None
    with torch.no_grad():
        assert fused_ops(torch.zeros(2, 3, requires_grad=True)) is ops
    calls, logits = [], {}
    for name in ("ours", "pytorch"):
        with pytest.MonkeyPatch.context() as mp:
            if name == "pytorch":
                mp.setattr(kernels, "loaded", lambda: None)
            else:
                for op in ("rms_norm", "rope", "silu_mul"):
                    real = getattr(ops, op)
                    mp.setattr(ops, op, lambda *a, real=real, op=op: calls.append(op) or real(*a), raising=False)
            cache = lm.model.new_cache(1, 64)
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bfloat16"):
                first = lm.model(torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), cache=cache)
                second = lm.model(torch.tensor([[12]]), cache=cache)
            logits[name] = torch.cat([first, second], dim=1).float()
    layers = lm.config.n_layer
    assert sorted(set(calls)) == ["rms_norm", "rope", "silu_mul"]
    assert calls.count("rms_norm") == 2 * (2 * layers + 1) and calls.count("rope") == calls.count("silu_mul") == 2 * layers
    tolerance = 1e-4 if precision == "float32" else 2e-2
    assert (logits["ours"] - logits["pytorch"]).abs().max() < tolerance * logits["pytorch"].abs().max()

