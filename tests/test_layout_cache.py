"""The kernel layout saved in a conversion-cache entry (gptchat/layout_cache.py): written by the first load
that converts, memory-mapped by later loads instead of converting, never read when it does not match, and never
written into a checkpoint a user saved. (~10 s)"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import gptchat  # noqa: E402
from gptchat import kernels, layout_cache, quantize  # noqa: E402
from gptchat.checkpoints.native import save_native  # noqa: E402
from gptchat.pages import file_mappings  # noqa: E402

from gguf_writer import write_gguf  # noqa: E402
from tiny_models import hf_llama  # noqa: E402

TYPES = {"token_embd": "Q8_0", "blk.*.attn_*": "Q4_1", "blk.0.ffn_*": "Q4_0", "blk.1.ffn_*": "Q4_1"}


@pytest.fixture(scope="module")
def ops():
    """The kernel, loaded (built once into the session's cache) before any test points the cache elsewhere."""
    if kernels.ops() is None:
        pytest.skip("gptchat's kernel is not available on this machine")


@pytest.fixture(scope="module")
def q_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_src")
    return write_gguf(hf_llama(root / "src", seed=7, tie=True), root / "src", root / "q.gguf", types=TYPES)


@pytest.fixture
def cache_dir(ops, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCHAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def loaded(path, mode):
    """A model loaded and put in the kernel layout (as an Engine does)."""
    lm = gptchat.load_model(path, quant=mode)
    quantize.use_kernel_layout(lm.model)
    return lm


def outputs(lm):
    ids = torch.arange(3, 40).remainder(lm.config.vocab_size)[None]
    with torch.no_grad():
        return lm.model(ids), lm.model(ids[:, :1])  # a prompt and one decoded row: both kernel paths


def saved_layouts(cache_dir):
    return sorted(cache_dir.glob("models/*/*/kernel-layout-*.safetensors"))


def kernel_layers(lm):
    return [m for m in lm.model.modules() if isinstance(m, quantize.KernelLayout)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_later_loads_map_the_saved_layout_instead_of_converting(q_gguf, cache_dir, monkeypatch, mode):
    first = loaded(q_gguf, mode)
    assert len(saved_layouts(cache_dir)) == 1
    want = outputs(first)

    def no_converting(*args, **kwargs):
        raise AssertionError("a layer was converted again")

    monkeypatch.setattr(quantize.KernelLayout, "to_lanes", no_converting)
    again = loaded(q_gguf, mode)
    layers = kernel_layers(again)
    assert layers and all(m.lanes for m in layers)
    mapped = file_mappings()
    for m in layers:  # the file's pages, not a copy
        assert any(lo <= m.weight.data_ptr() < hi for lo, hi in mapped)
        for part, (shape, dtype) in layout_cache.expected_shapes(m).items():
            assert tuple(getattr(m, part).shape) == shape and getattr(m, part).dtype == dtype
    for a, b in zip(outputs(again), want):
        assert torch.equal(a, b)
    portable, first_portable = again.model.state_dict(), first.model.state_dict()
    assert portable.keys() == first_portable.keys()
    assert all(torch.equal(portable[k], first_portable[k]) for k in portable)  # and saves as it was loaded


def test_a_layout_that_does_not_match_is_converted_again_and_replaced(q_gguf, cache_dir):
    want = outputs(loaded(q_gguf, "int4"))
    [path] = saved_layouts(cache_dir)
    good = {k: v.clone() for k, v in load_file(str(path)).items()}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({k: v[:1].clone() for k, v in good.items()}, str(path), metadata=meta)  # wrong shapes
    for a, b in zip(outputs(loaded(q_gguf, "int4")), want):
        assert torch.equal(a, b)
    restored = load_file(str(path))
    assert restored.keys() == good.keys() and all(torch.equal(restored[k], good[k]) for k in good)

    path.write_bytes(path.read_bytes()[:100])  # damaged
    for a, b in zip(outputs(loaded(q_gguf, "int4")), want):
        assert torch.equal(a, b)
    assert load_file(str(path)).keys() == good.keys()


def test_a_layout_saved_for_another_kernel_is_replaced(q_gguf, cache_dir):
    loaded(q_gguf, "int4")
    [path] = saved_layouts(cache_dir)
    other = path.with_name("kernel-layout-0000000000000000.safetensors")
    path.rename(other)
    loaded(q_gguf, "int4")
    assert saved_layouts(cache_dir) == [path]


def test_a_saved_checkpoint_is_not_written_into(q_gguf, cache_dir, tmp_path):
    lm = gptchat.load_model(q_gguf, quant="int4")
    save_native(tmp_path / "mine", lm.config, lm.model.state_dict(), lm.tokenizer, {"name": "tiny"})
    before = sorted(p.name for p in (tmp_path / "mine").iterdir())
    again = loaded(tmp_path / "mine", "int4")
    assert all(m.lanes for m in kernel_layers(again))  # converted in memory, as before
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == before
