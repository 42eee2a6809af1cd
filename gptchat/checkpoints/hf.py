"""Hugging Face model directories: config.json + *.safetensors + tokenizer.json.

GPT2LMHeadModel, LlamaForCausalLM (and Qwen2ForCausalLM, a Llama with q/k/v biases). GPT-2 stores its
projections as Conv1D, i.e. transposed relative to nn.Linear; we transpose them on load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..model import GPTConfig, fuse_projections

SUPPORTED = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama"}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from None


def rope_theta(cfg: dict, path: Path) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in (None, "default"):
        raise ModelLoadError(f"{path}: RoPE scaling {kind!r} is not supported")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def config_from_hf(cfg: dict, path: Path) -> GPTConfig:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        archs = ", ".join(cfg.get("architectures") or [str(model_type)])
        raise ModelLoadError(f"{path}: model type {archs} is not supported (supported: GPT-2, Llama, Qwen2)")
    if model_type == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        return GPTConfig(
            arch="gpt2",
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            n_embd=cfg["n_embd"],
            n_inner=cfg.get("n_inner"),
            max_seq_len=cfg["n_positions"],
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            activation={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act, act),
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: activation {cfg.get('hidden_act')!r} is not supported for Llama models")
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{path}: MLP biases are not supported for Llama models")
    return GPTConfig(
        arch="llama",
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"],
        n_kv_head=cfg.get("num_key_value_heads"),
        n_embd=cfg["hidden_size"],
        head_dim=cfg.get("head_dim"),
        n_inner=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta(cfg, path),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        bias=False,
        attn_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
    )


GPT2_RULES = [  # (pattern on the HF name without "transformer.", our name, transposed Conv1D?)
    (r"wte\.weight", "tok_emb.weight", False),
    (r"wpe\.weight", "pos_emb.weight", False),
    (r"h\.(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.attn_norm.\2", False),
    (r"h\.(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.mlp_norm.\2", False),
    (r"h\.(\d+)\.attn\.c_attn\.weight", r"blocks.\1.attn.wqkv.weight", True),  # fused, rows [q; k; v]
    (r"h\.(\d+)\.attn\.c_attn\.bias", r"blocks.\1.attn.wqkv.bias", False),
    (r"h\.(\d+)\.attn\.c_proj\.weight", r"blocks.\1.attn.wo.weight", True),
    (r"h\.(\d+)\.attn\.c_proj\.bias", r"blocks.\1.attn.wo.bias", False),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", r"blocks.\1.mlp.w_up.weight", True),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", r"blocks.\1.mlp.w_up.bias", False),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", r"blocks.\1.mlp.w_down.weight", True),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", r"blocks.\1.mlp.w_down.bias", False),
    (r"ln_f\.(weight|bias)", r"norm.\1", False),
    (r"lm_head\.weight", "lm_head.weight", False),
]
LLAMA_RULES = [
    (r"embed_tokens\.weight", "tok_emb.weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blocks.\1.attn.wq.\2"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blocks.\1.attn.wk.\2"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blocks.\1.attn.wv.\2"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", r"blocks.\1.attn.wo.weight"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", r"blocks.\1.mlp.w_gate.weight"),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", r"blocks.\1.mlp.w_up.weight"),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", r"blocks.\1.mlp.w_down.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def rename(hf_state: dict[str, torch.Tensor], arch: str, n_layer: int, path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in hf_state.items():
        short = re.sub(r"^(transformer|model)\.", "", name)
        if arch == "gpt2":
            if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", short):
                continue  # old causal-mask buffers, not weights
            rules = GPT2_RULES
        else:
            rules = [(p, r, False) for p, r in LLAMA_RULES]
        for pattern, replacement, transposed in rules:
            if re.fullmatch(pattern, short):
                state[re.sub(pattern, replacement, short)] = tensor.t().contiguous() if transposed else tensor
                break
        else:
            if "rotary_emb" not in short:
                raise ModelLoadError(f"{path}: unexpected tensor {name!r} in a {arch} checkpoint")
    return fuse_projections(state, n_layer)


def load_hf(directory: Path):
    """(config, state_dict, tokenizer, info) from a Hugging Face model directory."""
    from safetensors.torch import load_file

    from ..tokenizer import Tokenizer

    cfg = read_json(directory / "config.json")
    config = config_from_hf(cfg, directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weights (PyTorch .bin files are not loaded: convert them to safetensors)")
    hf_state = {}
    for f in files:
        hf_state.update(load_file(str(f)))
    state = rename(hf_state, config.arch, config.n_layer, directory)
    if not (directory / "tokenizer.json").exists():
        raise ModelLoadError(f"{directory}: no tokenizer.json")
    tokenizer = Tokenizer.from_file(directory)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in hf_state.values()})
    info = {"name": cfg.get("_name_or_path") or directory.name, "source_format": "hf", "source_dtypes": dtypes}
    return config, state, tokenizer, info
