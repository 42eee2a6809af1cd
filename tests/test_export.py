"""`gptchat export --format hf`: transformers loads the directory offline and computes our logits.

Each case: our model (from a transformers save, a GGUF, our own init, our own training, int8 in memory) ->
export -> AutoModelForCausalLM / AutoTokenizer -> logits within 1e-4 of ours, same tokens, same chat
prompt. About 10 s in all (tiny models; one CLI run).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import gptchat
import tiny_models
from gguf_writer import write_gguf
from gptchat.checkpoints.export_hf import export_hf, float_state_dict
from gptchat.checkpoints.native import save_native
from gptchat.chat import prompt_ids
from gptchat.data import TextData, prepare_text
from gptchat.errors import GptchatError
from gptchat.model import GPT, GPTConfig
from gptchat.templates import render_chat
from gptchat.train import TrainSettings, train

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello there! The capital of France is Paris. 你好，世界！ def add(a, b): return a + b 🙂"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]


def check_export(lm, out: Path, n_tokens: int = 40):
    """Export `lm`, load it with transformers, compare logits, tokens and the chat prompt."""
    export_hf(lm, out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = lm.tokenizer.encode(TEXT * 3)[:n_tokens]
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == lm.tokenizer.encode(TEXT)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = lm.model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # the chat template round-trips: transformers renders and tokenizes what our chat sends the model
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    tk = lm.tokenizer
    assert text == render_chat(tk.chat_template, CHAT, bos_token=tk.bos_token, eos_token=tk.eos_token)
    assert tok(text, add_special_tokens=False)["input_ids"] == prompt_ids(gptchat.Engine(lm), CHAT)
    assert tok.eos_token == tk.eos_token and tok.pad_token is not None
    return hf


def test_llama_untied_gqa_from_transformers(tiny_llama_dir, tmp_path):
    hf_dir, ref = tiny_llama_dir
    lm = gptchat.load_model(hf_dir)
    hf = check_export(lm, tmp_path / "out")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == 2 and not hf.config.tie_word_embeddings
    assert hf.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"]
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert lm.tokenizer.eos_id in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"])


def test_gpt2_from_transformers(tiny_gpt2_dir, tmp_path):
    hf_dir, ref = tiny_gpt2_dir
    hf = check_export(gptchat.load_model(hf_dir), tmp_path / "out")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    # the Conv1D transposes round-trip: the exported weights are transformers' own
    theirs = ref.state_dict()
    for name, tensor in hf.state_dict().items():
        if name in theirs:
            assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("arch, extra", [("llama", {"tie_embeddings": True, "n_kv_head": 2}),
                                         ("llama", {"attn_bias": True, "n_kv_head": 2, "rope_theta": 1e5}),
                                         ("gpt2", {"tie_embeddings": False})],
                         ids=["llama-tied-gqa", "qwen2", "gpt2-untied"])
def test_our_own_models(arch, extra, tiny_llama_dir, tmp_path):
    hf_dir, _ = tiny_llama_dir
    tokenizer = gptchat.load_model(hf_dir).tokenizer
    torch.manual_seed(0)
    config = GPTConfig(arch=arch, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=64, max_seq_len=64, **extra)
    model = GPT(config)
    tiny_models.perturb_norms(model)
    save_native(tmp_path / "ours", config, model.state_dict(), tokenizer)
    hf = check_export(gptchat.load_model(tmp_path / "ours"), tmp_path / "out")
    assert type(hf).__name__ == {"llama": "Qwen2ForCausalLM" if config.attn_bias else "LlamaForCausalLM",
                                 "gpt2": "GPT2LMHeadModel"}[arch]


def test_quantized_gguf_exports_dequantized(tiny_llama_dir, tmp_path):
    hf_dir, ref = tiny_llama_dir
    path = write_gguf(ref, hf_dir, tmp_path / "m.gguf", types={"blk.0.*": "Q4_0", "*": "Q8_0"})
    check_export(gptchat.load_model(path, quant="none", use_cache=False), tmp_path / "out")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_in_memory_exports_its_dequantized_weights(tiny_llama_dir, tmp_path, quant):
    hf_dir, _ = tiny_llama_dir
    lm = gptchat.load_model(hf_dir, quant=quant)
    assert lm.info.get("quant", quant) == quant
    # 40 positions: more rows than the decode kernels take, so our forward uses the dequantized weights too
    hf = check_export(lm, tmp_path / "out", n_tokens=40)
    ours = float_state_dict(lm.model)
    assert torch.equal(hf.state_dict()["model.layers.0.mlp.down_proj.weight"], ours["blocks.0.mlp.w_down.weight"])


def test_a_model_trained_by_pretrain(tiny_llama_dir, tmp_path):
    hf_dir, _ = tiny_llama_dir
    tokenizer = gptchat.load_model(hf_dir).tokenizer
    (tmp_path / "t.txt").write_text(" ".join(tiny_models.CORPUS[:5]) * 4)
    prepare_text([tmp_path / "t.txt"], tokenizer, tmp_path / "shards")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64))
    data = TextData(tmp_path / "shards", batch_size=4, seq_len=32)
    train(model, tokenizer, data, TrainSettings(out=str(tmp_path / "run"), steps=5, lr=3e-3), log=lambda _: None,
          progress=False)
    check_export(gptchat.load_model(tmp_path / "run" / "model"), tmp_path / "out")


def test_unexportable_model_is_a_clear_error_and_writes_nothing(tiny_llama_dir, tmp_path):
    hf_dir, _ = tiny_llama_dir
    lm = gptchat.load_model(hf_dir)
    lm.model.config.activation = "gelu"  # a Llama with GELU: transformers' Llama has no such option
    with pytest.raises(GptchatError, match="no transformers equivalent"):
        export_hf(lm, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_replaces_the_directory_atomically(tiny_gpt2_dir, tmp_path):
    hf_dir, _ = tiny_gpt2_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, "-m", "gptchat.cli", "export", "--model", str(hf_dir), "--format", "hf", str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "GPT2LMHeadModel" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    r = subprocess.run([sys.executable, "-m", "gptchat.cli", "export", "--model", str(tmp_path / "nope"), str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("gptchat: error:") and "Traceback" not in r.stderr
