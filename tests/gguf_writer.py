"""Write GGUF files from tiny transformers models, the way llama.cpp's convert_hf_to_gguf.py does.

    path = write_gguf(model, tokenizer_dir, tmp_path / "m.gguf", types={"blk.0.*": "Q8_0", "*": "F16"})

`model` is a GPT2LMHeadModel or LlamaForCausalLM (tests/tiny_models.py), `tokenizer_dir` the directory
its tokenizer was saved to (tokenizer.json, tokenizer_config.json, chat_template.jinja).

What is written, as llama.cpp writes it:
- metadata: general.architecture/name, {arch}.block_count, context_length, embedding_length,
  feed_forward_length, attention.head_count(_kv), rope.freq_base + rope.dimension_count (llama),
  attention.layer_norm_rms_epsilon (llama) / attention.layer_norm_epsilon (gpt2), vocab_size;
  tokenizer.ggml.model "gpt2", pre, tokens, token_type, merges, bos/eos/padding ids, chat_template.
- tensors: token_embd, position_embd (gpt2), blk.N.{attn_norm, attn_q/k/v (llama) or attn_qkv (gpt2,
  fused, with bias), attn_output, ffn_norm, ffn_gate (llama), ffn_up, ffn_down}, output_norm, and
  output when the head is not tied. GPT-2's Conv1D weights are transposed to Linear layout
  ([out, in]); llama q/k rows are permuted for llama.cpp's interleaved RoPE (`permute` below).

Tensor types: every 2-D weight gets the type the caller chooses (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...
anything gguf.quants.quantize can do; rows must be a multiple of the block size, 32 here). Q4_K and
Q6_K, which gguf-py cannot quantize, are written as random blocks with sane f16 scales (the tensor's
values are then NOT the model's; compare against another reader of the same file). They need rows of
256 elements: `hf_llama_wide` builds a model with 256-wide rows. 1-D tensors (norms, biases) stay F32.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Callable, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# types gguf-py cannot quantize: we write random blocks of these
RANDOM_BLOCK_TYPES = {Q.Q4_K, Q.Q6_K}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (rotate-half -> interleaved RoPE rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().copy()


# ---- model -> (gguf name, float32 array) ----


def llama_tensors(model, output: bool | None = None) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    sd = model.state_dict()
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = [("token_embd.weight", _np(sd["model.embed_tokens.weight"]))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", _np(sd[p + "input_layernorm.weight"])),
            (b + "attn_q.weight", permute(_np(sd[p + "self_attn.q_proj.weight"]), n_head)),
            (b + "attn_k.weight", permute(_np(sd[p + "self_attn.k_proj.weight"]), n_kv)),
            (b + "attn_v.weight", _np(sd[p + "self_attn.v_proj.weight"])),
            (b + "attn_output.weight", _np(sd[p + "self_attn.o_proj.weight"])),
            (b + "ffn_norm.weight", _np(sd[p + "post_attention_layernorm.weight"])),
            (b + "ffn_gate.weight", _np(sd[p + "mlp.gate_proj.weight"])),
            (b + "ffn_up.weight", _np(sd[p + "mlp.up_proj.weight"])),
            (b + "ffn_down.weight", _np(sd[p + "mlp.down_proj.weight"])),
        ]
    out.append(("output_norm.weight", _np(sd["model.norm.weight"])))
    if output if output is not None else not cfg.tie_word_embeddings:
        out.append(("output.weight", _np(sd["lm_head.weight"])))
    return out


def gpt2_tensors(model, output: bool | None = None) -> list[tuple[str, np.ndarray]]:
    """GPT-2's Conv1D weights are [in, out]: transposed to Linear's [out, in], as llama.cpp does.

    llama.cpp itself writes `output` as a copy of token_embd for GPT-2 (pass output=True for that).
    """
    cfg = model.config
    sd = model.state_dict()
    out = [
        ("token_embd.weight", _np(sd["transformer.wte.weight"])),
        ("position_embd.weight", _np(sd["transformer.wpe.weight"])),
    ]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", _np(sd[p + "ln_1.weight"])),
            (b + "attn_norm.bias", _np(sd[p + "ln_1.bias"])),
            (b + "attn_qkv.weight", _np(sd[p + "attn.c_attn.weight"]).T.copy()),
            (b + "attn_qkv.bias", _np(sd[p + "attn.c_attn.bias"])),
            (b + "attn_output.weight", _np(sd[p + "attn.c_proj.weight"]).T.copy()),
            (b + "attn_output.bias", _np(sd[p + "attn.c_proj.bias"])),
            (b + "ffn_norm.weight", _np(sd[p + "ln_2.weight"])),
            (b + "ffn_norm.bias", _np(sd[p + "ln_2.bias"])),
            (b + "ffn_up.weight", _np(sd[p + "mlp.c_fc.weight"]).T.copy()),
            (b + "ffn_up.bias", _np(sd[p + "mlp.c_fc.bias"])),
            (b + "ffn_down.weight", _np(sd[p + "mlp.c_proj.weight"]).T.copy()),
            (b + "ffn_down.bias", _np(sd[p + "mlp.c_proj.bias"])),
        ]
    out += [("output_norm.weight", _np(sd["transformer.ln_f.weight"])), ("output_norm.bias", _np(sd["transformer.ln_f.bias"]))]
    if output if output is not None else not cfg.tie_word_embeddings:
        out.append(("output.weight", _np(sd["lm_head.weight"])))
    return out


def model_arch(model) -> str:
    kind = model.config.model_type
    if kind not in ("llama", "gpt2"):
        raise ValueError(f"no GGUF conversion for model_type {kind!r}")
    return kind


# ---- tensor types ----


def as_qtype(t) -> Q:
    return t if isinstance(t, Q) else Q[str(t).upper()]


def choose_type(types, name: str, shape: tuple) -> Q:
    """The type of one tensor: 1-D tensors are always F32; see write_gguf for `types`."""
    if len(shape) < 2 or types is None:
        return Q.F32
    if callable(types) and not isinstance(types, (str, Q)):
        return as_qtype(types(name, shape))
    if isinstance(types, Mapping):
        base = name.rsplit(".", 1)[0]
        for pattern, t in types.items():  # first match wins: exact names, then patterns in order
            if pattern in (name, base):
                return as_qtype(t)
        for pattern, t in types.items():
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(base, pattern):
                return as_qtype(t)
        return Q.F32
    return as_qtype(types)


def random_kquant_blocks(shape: tuple, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K data for a float tensor of `shape` (numpy order; last dim a multiple of 256).

    The scales are chosen so the dequantized values are roughly zero-mean with std ~0.05.
    Returns the uint8 byte array (shape [..., row bytes]) GGUFWriter.add_tensor takes with raw_dtype.
    """
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block_size}, got shape {shape}")
    n_blocks = int(np.prod(shape)) // block_size
    if qtype == Q.Q4_K:  # d f16, dmin f16, 12 bytes packed 6-bit scales/mins, 128 bytes of 4-bit quants
        # x = d * sc * q - dmin * m with sc, m, q uniform: zero mean when dmin = 7.5 d
        d = rng.uniform(1.2e-4, 2.2e-4, size=(n_blocks, 1))
        head = np.concatenate([d, d * 7.5], axis=1).astype("<f2").view(np.uint8)
        body = rng.integers(0, 256, size=(n_blocks, 12 + 128), dtype=np.uint8)
        blocks = np.concatenate([head, body], axis=1)
    elif qtype == Q.Q6_K:  # ql 128, qh 64, scales 16 x int8, d f16; x = d * scale * (q - 32)
        quants = rng.integers(0, 256, size=(n_blocks, 128 + 64), dtype=np.uint8)
        scales = rng.integers(-64, 65, size=(n_blocks, 16)).astype(np.int8).view(np.uint8)
        d = rng.uniform(5e-5, 9e-5, size=(n_blocks, 1)).astype("<f2").view(np.uint8)
        blocks = np.concatenate([quants, scales, d], axis=1)
    else:
        raise ValueError(f"no random block writer for {qtype.name}")
    assert blocks.shape[1] == type_size
    return np.ascontiguousarray(blocks).reshape(*shape[:-1], shape[-1] // block_size * type_size)


def encode_tensor(data: np.ndarray, qtype: Q, rng: np.random.Generator):
    """(array, raw_dtype or None) for GGUFWriter.add_tensor."""
    if qtype == Q.F32:
        return data.astype(np.float32), None
    if qtype == Q.F16:
        return data.astype(np.float16), None
    if qtype in RANDOM_BLOCK_TYPES:
        return random_kquant_blocks(data.shape, qtype, rng), qtype
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


# ---- tokenizer metadata ----


def tokenizer_metadata(tokenizer_dir: str | os.PathLike, pre: str = "gpt-2") -> dict:
    """tokenizer.ggml.* and the chat template from a transformers tokenizer directory (byte-level BPE)."""
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    source = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = source.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the vocabulary has holes")
    added = {t.content: t for t in source.get_added_tokens_decoder().values()}
    types = [(CONTROL if added[t].special else USER_DEFINED) if t in added else NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(source.to_str())["model"]["merges"]]
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    def token_id(key):
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return vocab.get(token) if token is not None else None

    template = config.get("chat_template")
    if (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    meta = {
        "tokenizer_model": "gpt2",
        "tokenizer_pre": pre,
        "token_list": tokens,
        "token_types": types,
        "token_merges": merges,
        "bos_token_id": token_id("bos_token"),
        "eos_token_id": token_id("eos_token"),
        "pad_token_id": token_id("pad_token"),
        "add_bos_token": False,
        "chat_template": template,
    }
    return {k: v for k, v in meta.items() if v is not None}


# ---- the writer ----


def architecture_metadata(model, arch: str) -> dict:
    cfg = model.config
    if arch == "llama":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope_theta = getattr(cfg, "rope_theta", None)
        if rope_theta is None:  # transformers 5 keeps it in rope_parameters
            rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return {
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_hidden_layers,
            "feed_forward_length": cfg.intermediate_size,
            "rope_dimension_count": head_dim,
            "head_count": cfg.num_attention_heads,
            "head_count_kv": cfg.num_key_value_heads,
            "layer_norm_rms_eps": cfg.rms_norm_eps,
            "rope_freq_base": float(rope_theta),
        }
    return {
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.n_positions,
        "embedding_length": cfg.n_embd,
        "block_count": cfg.n_layer,
        "feed_forward_length": cfg.n_inner or 4 * cfg.n_embd,
        "head_count": cfg.n_head,
        "layer_norm_eps": cfg.layer_norm_epsilon,
    }


def write_gguf(
    model,
    tokenizer_dir: str | os.PathLike | None,
    path: str | os.PathLike,
    *,
    types=None,
    output: bool | None = None,
    arch: str | None = None,
    name: str = "tiny",
    pre: str = "gpt-2",
    seed: int = 0,
    metadata: dict | None = None,
    skip: Callable[[str], bool] | None = None,
) -> str:
    """Convert `model` (+ the tokenizer saved in `tokenizer_dir`) into a GGUF file at `path`.

    types: the type of each 2-D weight. None: all F32. A type name ("Q8_0") or GGMLQuantizationType:
        all of them. A mapping {gguf name or fnmatch pattern: type}, e.g. {"blk.0.*": "Q4_0",
        "token_embd": "F16", "*": "Q8_0"}: exact names first, then the first matching pattern,
        else F32. A callable (gguf name, numpy shape) -> type.
    output: write output.weight; None: only when the model's head is not tied.
    arch: general.architecture to write (default: the model's; the tensors still follow the model).
    seed: for the random Q4_K/Q6_K blocks.
    metadata: more metadata, applied over what the model and tokenizer give: {GGUFWriter add_* method
        name without "add_" (e.g. "chat_template", "vocab_size"): value, None to leave that key out}, or
        {"full.key.name": value} written as a bool / uint32 / float32 / string.
    skip: leave out tensors whose gguf name it accepts (for broken-file tests).
    tokenizer_dir None: no tokenizer metadata at all.
    """
    real_arch = model_arch(model)
    arch = arch or real_arch
    tensors = llama_tensors(model, output) if real_arch == "llama" else gpt2_tensors(model, output)
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), arch)
    meta = {"name": name, **architecture_metadata(model, real_arch)}
    if tokenizer_dir is not None:
        meta.update(tokenizer_metadata(tokenizer_dir, pre))
    meta.update(metadata or {})
    for key, value in meta.items():
        if value is None:
            continue
        if "." in key:
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            else:
                writer.add_string(key, str(value))
        else:
            getattr(writer, f"add_{key}")(value)

    for tensor_name, data in tensors:
        if skip is not None and skip(tensor_name):
            continue
        qtype = choose_type(types, tensor_name, data.shape)
        array, raw_dtype = encode_tensor(data, qtype, rng)
        writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def tensor_types_in(path: str | os.PathLike) -> dict[str, str]:
    """{gguf tensor name: type name} of a written file (to check what a test really wrote)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


# ---- a model with 256-wide rows (for Q4_K / Q6_K) ----


def hf_llama_wide(directory: Path, seed: int = 0, vocab_size: int = 384, hidden: int = 256, intermediate: int = 512,
                  layers: int = 1, heads: int = 4, kv_heads: int = 2, tie: bool = True, max_positions: int = 128):
    """Like tiny_models.hf_llama, with sizes of our choosing (every row a multiple of 256 by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import perturb_norms, save_tokenizer, train_bpe

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    perturb_norms(model)
    model.save_pretrained(directory)
    save_tokenizer(train_bpe(vocab_size), directory)
    return model
