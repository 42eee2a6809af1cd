"""GGUF files (llama.cpp's format): metadata -> GPTConfig, tensors -> our state dict, tokenizer and template.

Quantized tensors are dequantized to float32 with the `gguf` package, except where the requested
quantization can hold a tensor's blocks exactly (`EXACT`): then its Q8_0 / Q4_0 / Q4_1 blocks become the
int8 / int4 tensors of our quantized layers, value for value. llama.cpp stores the q/k
projections of Llama models permuted for its interleaved RoPE; we undo that so our rotate-half RoPE
(the Hugging Face convention) computes exactly the same thing.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelLoadError
from ..model import GPTConfig, fuse_projections
from ..quantize import from_blocks

GGUF_ARCHS = {"llama": "llama", "gpt2": "gpt2"}

# GGUF tensor name (after "blk.N.") -> our name (after "blocks.N.")
BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_qkv": "attn.wqkv",  # GPT-2: already fused, rows [q; k; v]
    "attn_q": "attn.wq",
    "attn_k": "attn.wk",
    "attn_v": "attn.wv",
    "attn_output": "attn.wo",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.w_gate",
    "ffn_up": "mlp.w_up",
    "ffn_down": "mlp.w_down",
}
# GGUF block types each quantization mode takes as they are. int4 keeps Q8_0 tensors at 8 bits: the file's
# author chose more precision for them (llama.cpp's Q4 files do so for the embedding, the largest matrix).
EXACT = {"none": (), "int8": ("Q8_0",), "int4": ("Q8_0", "Q4_0", "Q4_1")}
TOP_NAMES = {"token_embd": "tok_emb", "position_embd": "pos_emb", "output_norm": "norm", "output": "lm_head"}


def open_reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors for damaged files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from None


def field_value(reader, name: str, default=None):
    field = reader.fields.get(name)
    if field is None:
        return default
    return field.contents()


def read_config(reader, path: str) -> GPTConfig:
    arch = field_value(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama, gpt2)")

    def get(key, default=None):
        value = field_value(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    n_head = int(get("attention.head_count"))
    n_embd = int(get("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = field_value(reader, f"{arch}.vocab_size")
    if vocab is None:
        if "tokenizer.ggml.tokens" not in reader.fields:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eps_key = "attention.layer_norm_rms_epsilon" if arch == "llama" else "attention.layer_norm_epsilon"
    return GPTConfig(
        arch=GGUF_ARCHS[arch],
        vocab_size=int(vocab),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        n_embd=n_embd,
        head_dim=int(get("attention.key_length", n_embd // n_head)),
        n_inner=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")),
        norm_eps=float(get(eps_key)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensor_names,
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE), per head."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def our_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight / bias
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        mapped = BLOCK_NAMES.get(part)
        return f"blocks.{layer}.{mapped}.{suffix}" if mapped else None
    mapped = TOP_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def tensor_types(reader) -> dict[str, int]:
    """How many tensors of each type: 'Q4_1' -> 210, ... (what `gptchat info` shows)."""
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def read_state_dict(reader, config: GPTConfig, path: str, quant: str = "none") -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        name = our_name(t.name)
        if name is None:
            if t.name.startswith("rope_freqs"):
                raise ModelLoadError(f"{path}: RoPE frequency scaling (rope_freqs) is not supported")
            continue  # tensors we do not use (none in llama/gpt2 files we know of)
        shape = [int(d) for d in reversed(t.shape)]
        parts = None
        if t.tensor_type.name in EXACT[quant] and len(shape) == 2 and not name.startswith("pos_emb."):
            parts = from_blocks(t.tensor_type.name, t.data, *shape)
        if parts is None:
            try:
                w = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise ModelLoadError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantized") from None
            # a copy: for F32 tensors dequantize() returns a view into the read-only memory map of the file
            parts = {"weight": torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape))}
        base = name.removesuffix("weight").removesuffix("bias")
        if base == "tok_emb." and "scale" in parts:
            base = "tok_emb.head."  # the quantized embedding lives in its head (QuantizedEmbedding)
        for kind, tensor in parts.items():
            if config.arch == "llama" and ".attn.wq." in name:
                tensor = unpermute(tensor, config.n_head)  # rows of every part: weights, scales, offsets
            elif config.arch == "llama" and ".attn.wk." in name:
                tensor = unpermute(tensor, config.n_kv_head)
            state[base + (kind if kind != "weight" else name.rpartition(".")[2])] = tensor
    return fuse_projections(state, config.n_layer)


def load_gguf(path: str, quant: str = "none"):
    """(config, state_dict, tokenizer, info) from a GGUF file; `quant` says which blocks to keep as they are."""
    from ..tokenizer import Tokenizer

    reader = open_reader(path)
    config = read_config(reader, path)
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    state = read_state_dict(reader, config, path, quant)
    types = tensor_types(reader)
    info = {
        "name": field_value(reader, "general.name") or "",
        "source_format": "gguf",
        "source_dtypes": types,
    }
    return config, state, tokenizer, info
