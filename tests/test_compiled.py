"""The compiled decode step (gptchat/compiled.py) gives the same tokens as eager decoding.

test_compiled_equals_eager compiles a tiny model ahead of time: ~30 s on 2 quiet cores, so slow.
"""

import os
import time
import warnings

import pytest
import torch

import gptchat
import gptchat.compiled as compiled
from gptchat import Engine, SamplingParams, kernels
from gptchat.engine import DecodeBatch

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int4"])
def test_compiled_equals_eager(tiny_llama_dir, quant, monkeypatch):
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
    assert not engine.decoder.failed
    assert first.token_ids == eager.token_ids
    assert second.token_ids == Engine(lm).generate(follow, params).token_ids
    # a batch of one row (the server with a single client) decodes through the compiled step too
    calls = []
    real_call = compiled.CompiledDecoder.__call__
    monkeypatch.setattr(compiled.CompiledDecoder, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    assert engine.generate_batch([PROMPT], params)[0].token_ids == eager.token_ids
    assert len(calls) >= len(eager.token_ids) - 1
    monkeypatch.undo()
    # the logits themselves stay close to eager ones (fused float32 loops add in another order)
    cache_a, cache_b = (gptchat.model.KVCache(lm.config, 1, 8, dtype=lm.model.cache_dtype()) for _ in range(2))
    with torch.inference_mode():
        lm.model(torch.tensor([PROMPT]), cache=cache_a)
        lm.model(torch.tensor([PROMPT]), cache=cache_b)
        eager_logits = lm.model(torch.tensor([[9]]), cache=cache_a)[0, -1]
        compiled_logits = engine.decoder(9, cache_b)  # the cache grows past its 8 positions: a new capacity
    assert cache_b.length == cache_a.length
    assert (compiled_logits - eager_logits).abs().max() < 1e-3 * eager_logits.abs().max()

    # a new process (here: a new decoder) loads the package instead of compiling again
    path = compiled.package_path(lm.model)
    assert path.is_file()
    stamp, old = path.stat().st_ino, time.time() - 3600
    os.utime(path, (old, old))
    again = Engine(lm, compile=True)
    assert again.generate(PROMPT, params).token_ids == eager.token_ids
    assert path.stat().st_ino == stamp  # the same file: not built again (a build replaces it)
    assert path.stat().st_mtime > old + 60  # marked as used (compiled.remove_unused_packages)

    # with gptchat's kernel the package holds code only and reads the model's own tensors: another model
    # of the same shape (a fine-tune) reuses it, with its own weights
    if compiled.weights_outside():
        tuned = gptchat.load_model(tiny_llama_dir[0], quant=quant)
        with torch.no_grad():
            tuned.model.norm.weight.mul_(torch.linspace(0.2, 3.0, tuned.model.norm.weight.numel()))
        assert compiled.package_path(tuned.model) == path
        tuned_eager = Engine(tuned).generate(PROMPT, params).token_ids
        assert tuned_eager != eager.token_ids  # the change matters...
        assert Engine(tuned, compile=True).generate(PROMPT, params).token_ids == tuned_eager  # ...and is seen
        assert path.stat().st_ino == stamp


@pytest.mark.slow
def test_compiled_batch_equals_eager(tiny_llama_dir, monkeypatch):
    """The batched step: rows of unequal prompts (left-padded, each at its own position) that finish at
    different steps, one package for every batch size, the same tokens as eager batched decoding."""
    lm = gptchat.load_model(tiny_llama_dir[0], quant="int4")
    eos = {i: -100.0 for i in lm.tokenizer.eos_ids}
    prompts = [PROMPT, [7, 3], PROMPT * 2, [12, 13, 14]]
    params = [SamplingParams(temperature=0, max_new_tokens=n, logit_bias=eos) for n in (20, 6, 14, 20)]
    eager = [r.token_ids for r in Engine(lm).generate_batch(prompts, params)]
    engine = Engine(lm, compile=True)
    calls = []
    real_call = compiled.CompiledBatchDecoder.__call__
    monkeypatch.setattr(compiled.CompiledBatchDecoder, "__call__",
                        lambda self, *a: calls.append(a[0].shape[0]) or real_call(self, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to eager would warn: fail instead
        assert [r.token_ids for r in engine.generate_batch(prompts, params)] == eager
        assert [r.token_ids for r in engine.generate_batch(prompts[:2], params[:2])] == eager[:2]
    assert not engine.batch_decoder.failed and compiled.package_path(lm.model, batched=True).is_file()
    assert {4, 3, 2} <= set(calls)  # batches shrank as rows finished, through the same package
    # rows that join a running batch (as the server's do) with shorter and longer prompts: each row's tokens
    # are its tokens decoded alone
    alone = [Engine(lm).generate(p, q).token_ids for p, q in zip(prompts, params)]
    batch = DecodeBatch(lm.model, engine.decoder, engine.batch_decoder)
    outs = [engine.start(p, q) for p, q in zip(prompts, params)]
    join_at = {0: 0, 1: 2, 2: 3, 3: 7}
    calls.clear()
    with torch.inference_mode():
        for step in range(40):
            for i in [i for i, at in join_at.items() if at == step]:
                cache = lm.model.new_cache(1, len(prompts[i]))
                delta = outs[i].step(engine.prefill_chunk(cache, prompts[i]))
                batch.join(cache, torch.ones(1, len(prompts[i]), dtype=torch.bool), [outs[i]], [delta])
            if batch:
                batch.step()
    assert [o.result().token_ids for o in outs] == alone and len(set(calls)) >= 2
    monkeypatch.undo()
    # its logits stay close to eager ones for a padded batch
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    key_mask = ids != 0
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    caches = [lm.model.new_cache(2, 8) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            lm.model(ids, cache=cache, positions=positions, key_mask=key_mask)
        step_mask = torch.cat([key_mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        step_ids, step_pos = torch.tensor([[11], [12]]), positions[:, -1:] + 1
        eager_logits = lm.model(step_ids, cache=caches[0], positions=step_pos, key_mask=step_mask)[:, -1]
        compiled_logits = engine.batch_decoder(step_ids, step_pos, step_mask, caches[1])
    assert caches[1].length == caches[0].length
    assert (compiled_logits - eager_logits).abs().max() < 1e-3 * eager_logits.abs().max()


@pytest.mark.slow
def test_cli_generate_compiles_once(tiny_llama_dir, tmp_path):
    """`gptchat generate --compile`: the first run says it compiles, the second loads the package, both
    print what eager decoding prints; neither leaves files behind but the package (inductor's build folder
    and the package's unpacked copy in the temporary folder are removed when the command ends)."""
    from test_cli import run_cli

    temp = tmp_path / "temp"
    temp.mkdir()
    args = ["generate", "--model", tiny_llama_dir[0], "--quant", "int4", "-t", "0", "--max-new-tokens", "12", "--raw",
            "hello"]
    eager = run_cli([*args, "--no-compile"], cache=tmp_path, cwd=tmp_path)
    first = run_cli([*args, "--compile"], cache=tmp_path, cwd=tmp_path, TMPDIR=str(temp))
    second = run_cli([*args, "--compile"], cache=tmp_path, cwd=tmp_path, TMPDIR=str(temp))
    assert eager.returncode == first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "compiling the decode step" in first.stderr
    assert "compiling" not in second.stderr and "Warning" not in second.stderr
    assert first.stdout == second.stdout == eager.stdout
    assert [p.name for p in (tmp_path / "compiled").iterdir()] == [compiled.package_path(
        gptchat.load_model(tiny_llama_dir[0], quant="int4").model).name]
    assert list(temp.iterdir()) == []


def test_stale_build_dirs_are_removed(tmp_path, monkeypatch):
    """Inductor's build folders of processes that are gone go, with the shared folder older versions grew
    once it is an hour old; a live process's folder stays, and so do the packages. At exit only the process
    that made a build folder removes it."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name in (f".inductor-{gone.stdout.strip()}-abc", f".inductor-{os.getpid()}-def", "inductor/x/y",
                 "decode-0123.pt2"):
        (tmp_path / name).mkdir(parents=True)
    compiled.remove_stale_build_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".inductor-{os.getpid()}-def", "decode-0123.pt2",
                                                          "inductor"]  # the legacy folder was just made
    mine = tmp_path / f".inductor-{os.getpid()}-def"
    compiled.remove_build_dir(mine, os.getpid() + 1)  # as a forked child would at its exit: not its folder
    assert mine.is_dir()
    old = time.time() - compiled.STALE_LEGACY_S - 60
    os.utime(tmp_path / "inductor", (old, old))
    compiled.remove_stale_build_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".inductor-{os.getpid()}-def", "decode-0123.pt2"]
    compiled.remove_build_dir(mine, os.getpid())
    assert not mine.exists()


def test_packages_unused_for_a_month_are_removed(tmp_path):
    """A build sweeps the packages (and failure markers) no run has loaded for UNUSED_PACKAGE_S, never the
    one just built nor anything that is not a package."""
    old = time.time() - compiled.UNUSED_PACKAGE_S - 60
    names = ["decode-old.pt2", "decode-batch-old.pt2", "decode-old.failed", "decode-recent.pt2", "decode-new.pt2",
             "notes-decode.txt", "decode-old.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        if "old" in name or name == "decode-new.pt2":
            os.utime(tmp_path / name, (old, old))
    compiled.remove_unused_packages(tmp_path, keep=tmp_path / "decode-new.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode-new.pt2", "decode-old.txt", "decode-recent.pt2",
                                                          "notes-decode.txt"]
    compiled.touch_package(tmp_path / "decode-new.pt2")
    assert (tmp_path / "decode-new.pt2").stat().st_mtime > old + 60
    compiled.touch_package(tmp_path / "missing.pt2")  # best effort: no error


def test_failed_compile_falls_back_to_eager(tiny_llama_dir, monkeypatch):
    """Where torch.compile cannot work (no C++ compiler, say), decoding goes on eagerly, with one warning."""
    lm = gptchat.load_model(tiny_llama_dir[0])

    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    engine = Engine(lm, compile=True)
    with pytest.warns(UserWarning, match="no working C"):
        result = engine.generate(PROMPT, params)
    assert engine.decoder.failed
    assert result.token_ids == Engine(lm).generate(PROMPT, params).token_ids
    # the failure is remembered: the next process does not spend minutes failing again, nor warns again
    marker = compiled.package_path(lm.model).with_suffix(".failed")
    assert "no working C" in marker.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled.CompiledDecoder(lm.model).load() is None
    marker.unlink()


def test_a_step_that_fails_while_running_is_not_run_again(tiny_llama_dir):
    """A package that loaded but fails when run (a damaged library, say): one warning, the caller decodes
    eagerly, and later tokens do not try it again."""
    lm = gptchat.load_model(tiny_llama_dir[0], quant="none")
    runs = []

    class Broken:
        def boxed_run(self, inputs):
            runs.append(1)
            raise RuntimeError("segment of the library is damaged")

    decoder = compiled.CompiledDecoder(lm.model)
    decoder._runner = Broken()
    cache = gptchat.model.KVCache(lm.config, 1, 8)
    with torch.inference_mode():
        lm.model(torch.tensor([PROMPT]), cache=cache)
    with pytest.warns(UserWarning, match="the compiled decode step failed .*damaged"):
        assert decoder(9, cache) is None
    assert decoder(9, cache) is None and len(runs) == 1 and cache.length == len(PROMPT)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("prompt_len", [37, 100])  # below and above quantize.BF16_PROMPT_ROWS
def test_bf16_prefill_stays_close(tiny_llama_dir, monkeypatch, quant, prompt_len):
    """Prefill in bfloat16 (automatic on CPUs with avx512_bf16/AMX; forced here) keeps the greedy tokens, in
    the engine and in the server's chunked prefill; prompts of 64 tokens or more take the quantized layers'
    bfloat16 matmul, shorter ones gptchat's kernel."""
    from gptchat import engine as engine_module
    from gptchat import quantize

    lm = gptchat.load_model(tiny_llama_dir[0], quant=quant)
    prompt = [3 + i % 300 for i in range(prompt_len)]
    params = SamplingParams(temperature=0, max_new_tokens=8)
    monkeypatch.setenv("GPTCHAT_PREFILL_DTYPE", "float32")
    assert engine_module.prefill_dtype() == torch.float32
    fp32 = Engine(lm)
    exact = fp32._prefill(prompt, prompt_len + 10)
    expected = Engine(lm).generate(PROMPT, params).token_ids
    monkeypatch.setenv("GPTCHAT_PREFILL_DTYPE", "bfloat16")
    took_bf16 = []
    bf16_prompt = quantize.bf16_prompt
    monkeypatch.setattr(quantize, "bf16_prompt", lambda x, k: took_bf16.append(bf16_prompt(x, k)) or took_bf16[-1])
    bf16 = Engine(lm)
    approx = bf16._prefill(prompt, prompt_len + 10)
    assert approx.dtype == torch.float32 and bf16._cache.k.dtype == lm.model.cache_dtype()  # not bfloat16
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()
    assert any(took_bf16) == (prompt_len >= quantize.BF16_PROMPT_ROWS and kernels.ops() is not None)
    cache = lm.model.new_cache(1, prompt_len + 10)
    with torch.inference_mode():
        chunked = bf16.prefill_chunk(cache, prompt[:50])
        chunked = bf16.prefill_chunk(cache, prompt[50:]) if prompt_len > 50 else chunked
    assert chunked.dtype == torch.float32 and (chunked - exact).abs().max() < 0.05 * exact.abs().max()
    assert Engine(lm).generate(PROMPT, params).token_ids == expected