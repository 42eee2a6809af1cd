"""The compiled decode step (gptchat/compiled.py) gives the same tokens as eager decoding.

test_compiled_equals_eager compiles a tiny model: ~40 s on 2 quiet cores (minutes on a busy machine), so slow.
"""

import warnings

import pytest
import torch

import gptchat
import gptchat.compiled as compiled
from gptchat import Engine, SamplingParams

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int4"])
def test_compiled_equals_eager(tiny_llama_dir, quant):
    lm = gptchat.load_model(tiny_llama_dir[0], quant=quant)
    eos = {i: -100.0 for i in lm.tokenizer.eos_ids}
    params = SamplingParams(temperature=0, max_new_tokens=24, logit_bias=eos)
    eager = Engine(lm).generate(PROMPT, params)
    engine = Engine(lm, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to eager would warn: fail instead
        first = engine.generate(PROMPT, params)
        # a second turn continues the cached prefix through the same compiled graph
        follow = PROMPT + first.token_ids + [11, 12]
        second = engine.generate(follow, params)
    assert not engine._decoder.failed
    assert first.token_ids == eager.token_ids
    assert second.token_ids == Engine(lm).generate(follow, params).token_ids


def test_failed_compile_falls_back_to_eager(tiny_llama_dir, monkeypatch):
    """Where torch.compile cannot work (no C++ compiler, say), decoding goes on eagerly, with one warning."""
    lm = gptchat.load_model(tiny_llama_dir[0])

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_STEP", None)  # not the graphs another test compiled
    params = SamplingParams(temperature=0, max_new_tokens=10)
    engine = Engine(lm, compile=True)
    with pytest.warns(UserWarning, match="no working C"):
        result = engine.generate(PROMPT, params)
    assert engine._decoder.failed
    assert result.token_ids == Engine(lm).generate(PROMPT, params).token_ids
    assert compiled.CompiledDecoder(lm.model).failed is False


def test_bf16_prefill_stays_close(tiny_llama_dir, monkeypatch):
    """Prefill in bfloat16 (automatic on CPUs with avx512_bf16/AMX; forced here) keeps the greedy tokens."""
    from gptchat import engine as engine_module

    lm = gptchat.load_model(tiny_llama_dir[0], quant="int8")
    params = SamplingParams(temperature=0, max_new_tokens=8)
    monkeypatch.setenv("GPTCHAT_PREFILL_DTYPE", "float32")
    assert engine_module.prefill_dtype() == torch.float32
    fp32 = Engine(lm)
    exact = fp32._prefill(list(range(3, 40)), 50)
    expected = Engine(lm).generate(PROMPT, params).token_ids
    monkeypatch.setenv("GPTCHAT_PREFILL_DTYPE", "bfloat16")
    bf16 = Engine(lm)
    approx = bf16._prefill(list(range(3, 40)), 50)
    assert approx.dtype == torch.float32 and bf16._cache.k.dtype == torch.float32
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()
    assert Engine(lm).generate(PROMPT, params).token_ids == expected
