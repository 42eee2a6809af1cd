"""Tiny models the tests build themselves: a byte-level BPE trained here, and randomly initialised
transformers GPT-2 / Llama models saved with save_pretrained (the reference for parity tests)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Hello there! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Numbers: 12345 and 3.14159; emoji 🙂🚀 and accents café naïve.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, directory: Path, chat_template: str | None = CHATML):
    """Write tokenizer.json + tokenizer_config.json as transformers does."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)


def perturb_norms(model):
    """Random init leaves norm weights at 1 and biases at 0: perturb them so a mapping mistake shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def hf_gpt2(directory: Path, seed: int = 0, vocab_size: int = 384, n_positions: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg).eval()
    perturb_norms(model)
    model.save_pretrained(directory)
    save_tokenizer(train_bpe(vocab_size), directory)
    return model


def hf_llama(directory: Path, seed: int = 0, vocab_size: int = 384, tie: bool = False, max_positions: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    perturb_norms(model)
    model.save_pretrained(directory)
    save_tokenizer(train_bpe(vocab_size), directory)
    return model
