"""Export to a Hugging Face model directory that transformers (and so vLLM, TGI, ...) loads offline.

    OUT/config.json             LlamaForCausalLM, Qwen2ForCausalLM (a Llama with q/k/v biases) or GPT2LMHeadModel
    OUT/model.safetensors       float32 weights under transformers' names
    OUT/tokenizer.json, tokenizer_config.json   with the chat template and bos/eos/pad tokens
    OUT/generation_config.json  bos/eos/pad ids (every end-of-turn id is an eos)

The weight mapping is the inverse of checkpoints/hf.py: our fused `attn.wqkv` is split back into
q/k/v (rows [q; k; v]), `mlp.w_gate_up` into gate/up, and GPT-2's matrices are transposed back into
its Conv1D layout ([in, out]). A model whose weights are int8 in memory is exported dequantized
(int8 x per-row scale, as float32): transformers has no int8 layout of ours, and the float export of
the same checkpoint loaded with `--quant none` is the exact one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import GptchatError
from ..model import GPT, GPTConfig
from ..quantize import dequantize_parts
from ..templates import CHATML_TEMPLATE
from .native import atomic_directory

HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # our GPT-2 activation -> transformers' name


def float_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict in float32 on the CPU; quantized layers (int8 or int4: weight + scale [+ offset])
    become their dequantized weight, exactly what our forward computes with."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name in [k for k in state if k.endswith(".scale")]:
        base = name[: -len("scale")]  # "...wqkv." or "tok_emb.head."
        parts = {k: state.pop(base + k) for k in ("weight", "scale", "offset") if base + k in state}
        target = "tok_emb.weight" if base == "tok_emb.head." else base + "weight"
        state[target] = dequantize_parts(parts)
    return {k: v.float().contiguous() for k, v in state.items()}


def hf_config(config: GPTConfig, tokenizer) -> dict:
    """config.json for the transformers class that computes what our model computes."""
    c = config
    ids = special_ids(tokenizer)
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32", **ids}
    if c.arch == "gpt2":
        if c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.n_embd or not c.bias:
            raise GptchatError("this GPT-2-family model (grouped-query attention, head size or no biases) "
                               "has no GPT2LMHeadModel equivalent")
        if c.activation not in HF_ACTIVATIONS:
            raise GptchatError(f"activation {c.activation!r} has no GPT-2 equivalent in transformers")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head,
                "n_embd": c.n_embd, "n_inner": c.n_inner, "n_positions": c.max_seq_len, "n_ctx": c.max_seq_len,
                "layer_norm_epsilon": c.norm_eps, "activation_function": HF_ACTIVATIONS[c.activation],
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}
    if c.activation != "silu" or c.bias:
        raise GptchatError("this Llama-family model (activation or biases outside q/k/v) has no transformers equivalent")
    qwen2 = c.attn_bias  # q/k/v biases and nothing else: Qwen2's layout
    if qwen2 and c.head_dim * c.n_head != c.n_embd:
        raise GptchatError("a Llama with q/k/v biases and a custom head size has no transformers equivalent")
    return {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
            "hidden_size": c.n_embd, "intermediate_size": c.n_inner, "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
            "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, **common}


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names and layouts (the inverse of checkpoints/hf.py)."""
    c, ours = model.config, float_state_dict(model)
    out = {}
    if c.arch == "gpt2":
        conv1d = {"attn.wqkv": "attn.c_attn", "attn.wo": "attn.c_proj", "mlp.w_up": "mlp.c_fc", "mlp.w_down": "mlp.c_proj"}
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = ours["tok_emb.weight"], ours["pos_emb.weight"]
        for i in range(c.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours_name, hf_name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                for kind in ("weight", "bias"):
                    out[f"{h}{hf_name}.{kind}"] = ours[f"{p}{ours_name}.{kind}"]
            for ours_name, hf_name in conv1d.items():
                out[f"{h}{hf_name}.weight"] = ours[f"{p}{ours_name}.weight"].t().contiguous()  # Conv1D: [in, out]
                out[f"{h}{hf_name}.bias"] = ours[f"{p}{ours_name}.bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = ours["norm.weight"], ours["norm.bias"]
    else:
        q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        out["model.embed_tokens.weight"] = ours["tok_emb.weight"]
        for i in range(c.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = ours[p + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = ours[p + "mlp_norm.weight"]
            kinds = ("weight", "bias") if c.attn_bias else ("weight",)
            for kind in kinds:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), ours[f"{p}attn.wqkv.{kind}"].split((q, kv, kv))):
                    out[f"{h}self_attn.{name}.{kind}"] = part.contiguous()
            out[h + "self_attn.o_proj.weight"] = ours[p + "attn.wo.weight"]
            gate, up = ours[p + "mlp.w_gate_up.weight"].chunk(2)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
            out[h + "mlp.down_proj.weight"] = ours[p + "mlp.w_down.weight"]
        out["model.norm.weight"] = ours["norm.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    return out


def special_ids(tokenizer) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json. A tokenizer without a pad token
    pads with eos (what transformers' generate does anyway, minus its warning)."""
    eos = sorted(tokenizer.eos_ids, key=lambda i: i != tokenizer.eos_id)  # the official eos first
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": pad}


def write_tokenizer(tokenizer, directory: Path):
    """tokenizer.json + tokenizer_config.json (Tokenizer.save) with the template the engine uses (ChatML
    when the model has none) and a pad token, so `apply_chat_template` renders what `gptchat chat` renders."""
    tokenizer.save(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = tokenizer.chat_template if tokenizer.chat_template is not None else CHATML_TEMPLATE
    if config.get("pad_token") is None:
        config["pad_token"] = config.get("eos_token")
    config.pop("eos_ids", None)  # ours only; generation_config.json carries the end-of-turn ids for transformers
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(lm, out: str | Path) -> Path:
    """Write `lm` (a LoadedModel) as a Hugging Face directory at `out`, atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    out = Path(out)
    config = hf_config(lm.config, lm.tokenizer)
    state = hf_state_dict(lm.model)
    with atomic_directory(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        write_tokenizer(lm.tokenizer, tmp)
    return out
