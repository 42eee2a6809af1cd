"""Weight-only int8 quantization: a quarter of the bytes per decoded token.

Decoding one token reads every weight once, so at batch 1 its speed is set by memory bandwidth:
float32 weights cap SmolLM2-135M near 40 tok/s on one core's bandwidth; int8 (one byte per weight plus
one scale per output row) reads 4x less. The decode path uses PyTorch's int8 weight-only matmul
kernel (`aten._weight_int8pack_mm`, fast with bfloat16 activations); prompts (many rows at once) are
compute-bound, so there the weight is dequantized to float32 and multiplied as usual.

Symmetric per-output-channel: w ~= q * scale, q in [-127, 127], scale = max|w_row| / 127.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InvalidParameterError

QUANT_MODES = ("none", "int8")
SMALL_BATCH = 16  # at most this many rows go through the int8 kernel; more are dequantized


def int8_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights [N, K], float32 scales [N]) for a float weight [N, K]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self._scale_bf16 = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight, q.scale = quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            q.bias = linear.bias.detach().float()
        return q

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= SMALL_BATCH and x.device.type == "cpu" and int8_kernel_available():
            if self._scale_bf16 is None:
                self._scale_bf16 = self.scale.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.weight, self._scale_bf16)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


class Int8Embedding(nn.Module):
    """Token embeddings stored as int8 rows; also serves as the tied output head."""

    def __init__(self, num_embeddings: int, dim: int, device=None):
        super().__init__()
        self.head = Int8Linear(dim, num_embeddings, bias=False, device=device)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        e = cls(emb.num_embeddings, emb.embedding_dim, device="meta")
        e.head.weight, e.head.scale = quantize_int8(emb.weight.detach())
        return e

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output head: logits = x @ embeddings^T."""
        return self.head(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head.weight[idx].float() * self.head.scale[idx, None]


def resolve_mode(mode: str | None) -> str:
    """'auto' (or None) picks int8 where the int8 kernel exists, else none."""
    if mode in (None, "auto"):
        return "int8" if int8_kernel_available() else "none"
    if mode not in QUANT_MODES:
        raise InvalidParameterError("quant", f"unknown quantization {mode!r} (known: auto, {', '.join(QUANT_MODES)})")
    return mode


def quantize_model(model: nn.Module, mode: str, *, empty: bool = False) -> nn.Module:
    """Replace every Linear (and the token embedding, the tied head) in place.

    empty=True only builds the quantized structure on the meta device, for loading a state dict
    that is already quantized (a cached or saved int8 checkpoint).
    """
    if mode == "none":
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                new = (Int8Linear(child.in_features, child.out_features, child.bias is not None, device="meta")
                       if empty else Int8Linear.from_linear(child))
                setattr(module, name, new)
            elif isinstance(child, nn.Embedding) and name == "tok_emb":
                new = (Int8Embedding(child.num_embeddings, child.embedding_dim, device="meta")
                       if empty else Int8Embedding.from_embedding(child))
                setattr(module, name, new)
    return model


def quantization_of(model: nn.Module) -> str:
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else "none"
