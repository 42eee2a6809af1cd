"""Weight-only quantization, int8 and int4: fewer bytes read per decoded token.

Decoding one token reads every weight once, so at batch 1 its speed is set by memory bandwidth and by
how fast a kernel turns packed weights back into numbers. Two kinds of quantized Linear:

    Int8Linear   w ~= q * scale,           q int8 in [-127, 127], a scale per group of 32 columns (or per row)
    Int4Linear   w ~= q * scale + offset,  q in [0, 15] (two per byte), scale and offset per group of 32

Both dequantize exactly as llama.cpp's GGUF blocks do (Q8_0: d * q; Q4_0: d * (q - 8); Q4_1: d * q + m), so
those blocks load without any loss (`from_blocks`). From float weights, int8 is symmetric and int4 min/max,
both per group of GROUP_SIZE columns. Scales and offsets are held in float32 tensors but are float16 values,
as in GGUF's blocks: gptchat's kernel reads them as float16 (fewer bytes per token), and so reads exactly the
weights that `dequantized()` gives.

Matmuls: on the CPU, decoding and prompts alike go through gptchat's own kernel where it builds
(gptchat/kernels: AVX2, integer activations). Without it, a few rows (decoding) go through PyTorch's
weight-only CPU kernels, which are fast only with bfloat16 activations: `aten._weight_int8pack_mm` (int8 with
one scale per row) and `aten._weight_int4pack_mm_for_cpu` (int4 groups; int8 groups run on it too, as two
4-bit halves); more rows (a prompt), and other devices, dequantize the weight to float32 and multiply as
usual. PyTorch's kernels'
packed layout depends on the CPU's vector width, so checkpoints store the portable form above and the
kernel form is derived in memory on first use. gptchat's kernel reads 16 weight rows side by side (its "lanes"
layout): a layer converts to it on its first use by the kernel and then holds only that form in memory; its
state_dict still gives the portable form. A model from gptchat's conversion cache keeps its converted layout
in its cache entry, and later loads map it from there (layout_cache).
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .errors import InvalidParameterError
from .pages import file_mappings, release_file_pages

QUANT_MODES = ("none", "int8", "int4")
GROUP_SIZE = 32  # int4 columns sharing a scale and an offset (llama.cpp's Q4_0/Q4_1 blocks are 32 too)
SMALL_BATCH = 16  # at most this many rows go through PyTorch's weight-only kernels; more are dequantized
BF16_PROMPT_ROWS = 64  # rows from which, under bfloat16 autocast, a layer is dequantized for a bfloat16 matmul
PACK_ROWS = 4096  # rows converted to the int4 kernel layout at a time (bounds the int32 temporary)


def int8_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_kernel_available() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")


def int4_fits(out_features: int, in_features: int, group_size: int = GROUP_SIZE) -> bool:
    """The int4 kernel wants rows in multiples of 16 and whole groups of columns."""
    return out_features % 16 == 0 and in_features % group_size == 0 and group_size % 16 == 0


# ---- quantizing float weights ----


FLOAT16_MAX = 65504.0
FLOAT16_TINY = 2.0**-24  # the smallest positive float16 (subnormal)


def float16_values(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the nearest float16 values (clamped to float16's range), kept in float32."""
    return t.float().clamp(-FLOAT16_MAX, FLOAT16_MAX).half().float()


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights [N, K], float32 scales [N, K/g]) for a float weight [N, K]; one scale per row when
    group_size is None: w ~= q * scale, scale = max|w| / 127 over the row or group, a float16 value."""
    N, K = w.shape
    g = w.float().reshape(N, -1, group_size or K)
    scale = float16_values(g.abs().amax(dim=-1) / 127.0).clamp(min=FLOAT16_TINY)
    q = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(N, K), scale


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed nibbles uint8 [N, K/2], scales [N, K/g], offsets [N, K/g]) for a float weight [N, K].

    Each group spans its own [min, max] in 16 steps: w ~= q * scale + offset, offset = min (both float16
    values, as in GGUF's Q4_1).
    """
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = float16_values(g.amin(dim=-1)), g.amax(dim=-1)
    scale = float16_values((hi - lo) / 15.0).clamp(min=FLOAT16_TINY)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_nibbles(q.reshape(N, K)), scale, lo


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> [N, K/2]: column 2j in the low nibble, 2j + 1 in the high one."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ---- the kernels' own layout ----


def int4_kernel_weight(q: torch.Tensor) -> torch.Tensor:
    """int values 0..15 [N, K] -> the int4 kernel's packed layout (depends on this CPU's vector width)."""
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    parts = [convert(q[i : i + PACK_ROWS].to(torch.int32).contiguous(), 1) for i in range(0, q.shape[0], PACK_ROWS)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def int4_kernel_scales(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, G] scales and zeros -> [G, N, 2] bfloat16; the kernel computes (q - 8) * scale + zero."""
    return torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


LANES = kernels.LANES  # weight rows side by side in gptchat's kernel layout


def lane_pairs(weight: torch.Tensor, blocks: int, int4: bool) -> torch.Tensor:
    """A kernel-layout weight viewed as [groups, blocks, chunks, LANES, 2]: the byte pairs of each row."""
    return weight.view(-1, blocks, 8 if int4 else 16, LANES, 2)


def lane_values(pairs: torch.Tensor, int4: bool) -> torch.Tensor:
    """One row's byte pairs [..., chunks, 2] as its values in column order [..., 32 per block]: int8, chunk c
    holds values 2c, 2c + 1; int4, values 4c, 4c + 2 (low, high nibble of the first byte), 4c + 1, 4c + 3."""
    if not int4:
        return pairs.flatten(-2)
    lo, hi = pairs[..., 0], pairs[..., 1]
    return torch.stack((lo & 15, hi & 15, lo >> 4, hi >> 4), dim=-1).flatten(-2)


def lanes_to_portable(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, rows: int,
                      cols: int) -> dict[str, torch.Tensor]:
    """gptchat's kernel layout (quant_matmul.cpp: `to_lanes`) back to the portable tensors, by tensor ops: for
    a state_dict, an export, or PyTorch's kernels. The layout's float16 scales and offsets come back as float32."""
    groups, blocks = weight.shape[0], cols // kernels.BLOCK
    int4 = offset is not None
    values = lane_values(lane_pairs(weight, blocks, int4).permute(0, 3, 1, 2, 4), int4).reshape(groups * LANES, cols)
    q = pack_nibbles(values) if int4 else values

    def per_row(t):
        return t.view(groups, blocks, LANES).transpose(1, 2).reshape(groups * LANES, blocks)[:rows].float()

    parts = {"weight": q[:rows].contiguous(), "scale": per_row(scale).contiguous()}
    if offset is not None:
        parts["offset"] = per_row(offset).contiguous()
    return parts


_to_lanes_lock = threading.Lock()


class KernelLayout:
    """What Int8Linear and Int4Linear share: the switch of their tensors to gptchat's kernel layout, and a
    state_dict (and loading) in the portable layout whichever is held."""

    lanes = False  # True once the tensors are in the kernel layout (weight [N/8, ...], float16 scale [N/8, K/4])
    PARTS: tuple[str, ...] = ()

    def lanes_fit(self) -> bool:
        """Whether the kernel's layout can hold this layer: on the CPU, whole blocks of 32 columns, and scales
        and offsets within float16's range (checked once, before converting)."""
        if self.lanes:
            return True
        parts = [getattr(self, name) for name in self.PARTS[1:]]
        return (self.in_features % kernels.BLOCK == 0 and self.weight.device.type == "cpu"
                and all(bool(t.abs().max() <= FLOAT16_MAX) for t in parts if t.numel()))

    def to_lanes(self, ops, mappings: list[tuple[int, int]] | None = None) -> None:
        """Hold the tensors in the kernel layout from now on (once; safe against concurrent first calls).
        `mappings`: the process's file mappings, if the caller has just read them (release_file_pages)."""
        self._switch_to_lanes(lambda portable: (ops.to_lanes(*portable, *([None] if len(portable) == 2 else [])),
                                                self.scale.shape[1]), mappings)

    def adopt_lanes(self, parts: dict[str, torch.Tensor], portable_scale_groups: int,
                    mappings: list[tuple[int, int]] | None = None) -> None:
        """Hold `parts`, tensors already in the kernel layout (a saved copy: layout_cache), from now on, as
        `to_lanes` holds the ones it converts."""
        self._switch_to_lanes(lambda portable: ([parts[name] for name in self.PARTS], portable_scale_groups), mappings)

    def _switch_to_lanes(self, lanes_of, mappings: list[tuple[int, int]] | None) -> None:
        """The switch to_lanes and adopt_lanes share: once, under the lock; `lanes_of(portable tensors)` gives the
        kernel layout's tensors and the portable scale's column count; the portable tensors' file pages are
        given back after."""
        with _to_lanes_lock:
            if self.lanes:
                return
            portable = [getattr(self, name) for name in self.PARTS]
            tensors, self.portable_scale_groups = lanes_of(portable)
            for name, t in zip(self.PARTS, tensors):
                setattr(self, name, t)
            self.lanes = True
            release_file_pages(portable, mappings)

    def kernel_ready(self, ops) -> bool:
        """Whether gptchat's kernel (`ops`, None where there is none) serves this layer; if it does, the tensors
        are in its layout (converted now, the first time)."""
        if ops is None or not (self.kernel_serves() and self.lanes_fit()):
            return False
        if not self.lanes:
            self.to_lanes(ops)
        return True

    def lane_rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Rows `idx` from the kernel layout (row n is lane n % 16 of group n // 16): their values [..., blocks, 32]
        and their scales (and offsets) [..., blocks]."""
        blocks, int4 = self.in_features // kernels.BLOCK, len(self.PARTS) == 3
        g, j = idx // LANES, idx % LANES
        values = lane_values(lane_pairs(self.weight, blocks, int4)[g, :, :, j, :], int4)
        return values, tuple(getattr(self, n).view(-1, blocks, LANES)[g, :, j].float() for n in self.PARTS[1:])

    def lane_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weight, scale, offset), offset None for int8: the kernel layout's tensors as its ops take them."""
        offset = self.offset if len(self.PARTS) == 3 else None
        return self.weight, self.scale, offset

    def bf16_linear(self, ops, x: torch.Tensor) -> torch.Tensor:
        """x times the weights dequantized to bfloat16 (`lanes_to_bf16`), plus the bias: a prompt under bfloat16
        autocast (bf16_prompt)."""
        return F.linear(x, ops.lanes_to_bf16(*self.lane_tensors(), self.out_features), self.bias)

    def portable(self) -> dict[str, torch.Tensor]:
        """The tensors in the portable layout (converted back when the kernel layout is held)."""
        if not self.lanes:
            return {name: getattr(self, name) for name in self.PARTS}
        parts = lanes_to_portable(*self.lane_tensors(), self.out_features, self.in_features)
        parts["scale"] = parts["scale"][:, : self.portable_scale_groups].contiguous()  # one scale per row, if so
        return parts

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.lanes:
            for name, t in self.portable().items():
                destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.lanes:  # loading a portable state dict over the kernel layout: back to portable first
            with _to_lanes_lock:
                for name, t in self.portable().items():
                    setattr(self, name, t)
                self.lanes = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def use_kernel_layout(model: nn.Module) -> None:
    """Convert every quantized Linear that gptchat's kernel will serve now, rather than each on its first use:
    when an Engine is made (a model's first use), and before a compiled step is exported or handed the model's
    tensors, which must be those the kernel reads. A model with nothing to convert never builds the kernel.
    A model from gptchat's conversion cache (`kernel_layout_dir`, set by the loader) takes the layout saved in
    its cache entry instead, and saves it there after converting (layout_cache)."""
    todo = {name: m for name, m in model.named_modules() if isinstance(m, KernelLayout) and not m.lanes
            and m.kernel_serves() and m.weight.device.type == "cpu"}
    saved_in = getattr(model, "kernel_layout_dir", None)
    if saved_in is None:  # (with a saved layout, only the layers it lacks are checked: that reads their scales)
        todo = {name: m for name, m in todo.items() if m.lanes_fit()}
    if not todo or (ops := kernels.ops()) is None:
        return
    if saved_in is not None:
        from . import layout_cache

        adopted = set(layout_cache.adopt(todo, saved_in))
        todo = {name: m for name, m in todo.items() if name not in adopted and m.lanes_fit()}
        if not todo:
            return
    mappings = file_mappings()  # stays valid throughout: the loop maps no file and unmaps none
    for m in todo.values():
        m.to_lanes(ops, mappings)
    if saved_in is not None:
        layout_cache.save({name: m for name, m in model.named_modules() if isinstance(m, KernelLayout) and m.lanes},
                          saved_in)


def few_rows(x: torch.Tensor, in_features: int) -> bool:
    return x.numel() // in_features <= SMALL_BATCH and x.device.type == "cpu"


def own_kernel_for(x: torch.Tensor, in_features: int):
    """gptchat's kernel ops if they should multiply x (on the CPU: decoding, batches and prompts alike), else
    None. With the weights in its lanes layout it beat PyTorch's int4 kernel at every row count from 1 to 16, and
    dequantize + float32 matmul at every row count up to a 512-token prompt chunk (int4, SmolLM2's layers,
    2 threads: 2.4x at 64 rows, 1.5x at 128, 1.08x at 512; int8: 1.5-3.1x at 64, 1.0-1.4x at 512, the head 1.5x
    at 512). It also never materializes a layer's weights in float32."""
    if x.device.type != "cpu":
        return None
    return kernels.ops()


def bf16_prompt(x: torch.Tensor, in_features: int) -> bool:
    """Whether gptchat's kernel should hand this matmul to a bfloat16 one on the layer's dequantized weights
    (`lanes_to_bf16`): a prompt of at least BF16_PROMPT_ROWS rows under bfloat16 autocast, which the engine
    enables for prompts where the CPU has native bfloat16 (engine.prefill_dtype). The kernel multiplies at
    float32's rate; oneDNN's bfloat16 matmul, with avx512_bf16, twice as fast. On SmolLM2's int4 layers, 2
    threads of an avx512_bf16 Zen 4, dequantizing included: 1.4x faster at 64 rows, 2.4x at 512; even at 32;
    3x slower at 8."""
    # autocast first: it is off while the decode steps are traced, so their symbolic batch size is never compared
    return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and x.numel() >= BF16_PROMPT_ROWS * in_features)


def rows_output(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's [rows, N] result back in x's dtype and leading shape, plus the bias."""
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    return y + bias if bias is not None else y


class Int8Linear(KernelLayout, nn.Module):
    """int8 weights with a float32 scale per row ([N, 1]) or per group of columns ([N, K/g], e.g. Q8_0)."""

    PARTS = ("weight", "scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, groups: int = 1, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self._kernel = None  # derived on first use: tensors in the layout the CPU kernel wants

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Scales per group of GROUP_SIZE columns where the (int4) kernel for that exists: on SmolLM2 that
        keeps perplexity within 0.4% of float32, against 3% with one scale per row, for ~10% slower decoding."""
        N, K = linear.out_features, linear.in_features
        grouped = int4_kernel_available() and int4_fits(N, 2 * K)
        q = cls(K, N, linear.bias is not None, device="meta")
        q.weight, q.scale = quantize_int8(linear.weight.detach(), GROUP_SIZE if grouped else None)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float()
        return q

    @property
    def group_size(self) -> int:
        return self.in_features // (self.portable_scale_groups if self.lanes else self.scale.shape[1])

    def kernel_serves(self) -> bool:
        """gptchat's kernel takes scales per block of 32 columns, or per row."""
        return self.in_features % kernels.BLOCK == 0 and self.group_size in (kernels.BLOCK, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weights."""
        w, scale = self.portable().values()
        N, K = w.shape
        return (w.float().view(N, -1, self.group_size) * scale[..., None]).view(N, K)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `idx` (an embedding lookup)."""
        if self.lanes:
            q, (scale,) = self.lane_rows(idx)
            return (q.float() * scale[..., None]).flatten(-2)
        w = self.weight[idx].float()
        return (w.unflatten(-1, (-1, self.group_size)) * self.scale[idx][..., None]).flatten(-2)

    def kernel(self):
        """Per-row scales: the int8 kernel. Grouped scales: the int4 kernel on the two halves of each byte,
        q = 16 * hi + lo (hi in [-8, 7], lo in [0, 15]): x @ [hi | lo]^T with scales 16d and d."""
        if self._kernel is None:
            q, d = self.portable().values()
            if d.shape[1] == 1:
                self._kernel = ("int8", q, d[:, 0].to(torch.bfloat16))
            else:  # int8 arithmetic throughout: a 49152-row head must not spike memory
                halves = torch.cat(((q >> 4) + 8, q & 15), dim=1)  # [N, 2K], values 0..15
                scale = torch.cat((16 * d, d), dim=1)
                zero = torch.cat((torch.zeros_like(d), 8 * d), dim=1)
                self._kernel = ("int4x2", int4_kernel_weight(halves), int4_kernel_scales(scale, zero))
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_row = self.group_size == self.in_features
        ops = own_kernel_for(x, self.in_features)
        if self.kernel_ready(ops):
            if bf16_prompt(x, self.in_features):
                return self.bf16_linear(ops, x)
            y = ops.int8_linear(x.reshape(-1, self.in_features).float(), self.weight, self.scale, self.out_features)
            return rows_output(x, y, self.bias)
        usable = int8_kernel_available() if per_row else int4_kernel_available() and int4_fits(
            self.out_features, 2 * self.in_features, self.group_size)
        if usable and few_rows(x, self.in_features):
            kind, w, s = self.kernel()
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if kind == "int8":
                y = torch.ops.aten._weight_int8pack_mm(x2, w, s)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat((x2, x2), dim=1), w, self.group_size, s)
            return rows_output(x, y, self.bias)
        return F.linear(x, self.dequantized().to(x), self.bias)


class Int4Linear(KernelLayout, nn.Module):
    """4-bit weights, two per byte, with a float32 scale and offset per group: w = q * scale + offset."""

    PARTS = ("weight", "scale", "offset")

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = GROUP_SIZE, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self._kernel = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE) -> "Int4Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, device="meta")
        q.weight, q.scale, q.offset = quantize_int4(linear.weight.detach(), group_size)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float()
        return q

    def kernel_serves(self) -> bool:
        """gptchat's kernel takes groups of 32 columns."""
        return self.group_size == kernels.BLOCK and self.in_features % kernels.BLOCK == 0

    def dequantized(self) -> torch.Tensor:
        """The float32 weights."""
        w, scale, offset = self.portable().values()
        N, K = self.out_features, self.in_features
        q = unpack_nibbles(w).float().view(N, -1, self.group_size)
        return (q * scale[..., None] + offset[..., None]).view(N, K)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.lanes:
            q, (scale, offset) = self.lane_rows(idx)
            return (q.float() * scale[..., None] + offset[..., None]).flatten(-2)
        q = torch.stack((self.weight[idx] & 15, self.weight[idx] >> 4), dim=-1).flatten(-2).float()
        q = q.unflatten(-1, (-1, self.group_size))
        return (q * self.scale[idx][..., None] + self.offset[idx][..., None]).flatten(-2)

    def kernel(self):
        if self._kernel is None:  # the kernel's zero: (q - 8) * scale + zero = q * scale + offset
            w, scale, offset = self.portable().values()
            self._kernel = (int4_kernel_weight(unpack_nibbles(w)), int4_kernel_scales(scale, offset + 8 * scale))
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = own_kernel_for(x, self.in_features)
        if self.kernel_ready(ops):
            if bf16_prompt(x, self.in_features):
                return self.bf16_linear(ops, x)
            y = ops.int4_linear(x.reshape(-1, self.in_features).float(), self.weight, self.scale, self.offset,
                                self.out_features)
            return rows_output(x, y, self.bias)
        if int4_kernel_available() and few_rows(x, self.in_features):
            w, s = self.kernel()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features).to(torch.bfloat16), w, self.group_size, s)
            return rows_output(x, y, self.bias)
        return F.linear(x, self.dequantized().to(x), self.bias)


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


class QuantizedEmbedding(nn.Module):
    """Token embeddings held by a quantized Linear [vocab, dim]; also serves as the tied output head."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output head: logits = x @ embeddings^T."""
        return self.head(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head.rows(idx)


# ---- GGUF blocks, loaded without loss ----


def from_blocks(type_name: str, blocks, rows: int, cols: int) -> dict[str, torch.Tensor] | None:
    """Q8_0 / Q4_0 / Q4_1 blocks (a uint8 array, 32 values per block along each row) as the tensors of an
    Int8Linear ({weight, scale}) or Int4Linear ({weight, scale, offset}); None for other types."""
    import numpy as np

    blocks = np.asarray(blocks, dtype=np.uint8).reshape(rows * (cols // 32), -1)
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32)).view(rows, -1)
    if type_name == "Q8_0":
        q = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).view(rows, cols)
        return {"weight": q, "scale": d}
    if type_name not in ("Q4_0", "Q4_1"):
        return None
    start = 2 if type_name == "Q4_0" else 4
    qs = torch.from_numpy(blocks[:, start:].copy())  # [blocks, 16]: value j low nibble, value j + 16 high
    q = torch.cat((qs & 15, qs >> 4), dim=1).view(rows, cols)
    if type_name == "Q4_0":  # d * (q - 8) = q * d + (-8 d), exactly
        offset = -8 * d
    else:  # d * q + m
        offset = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).astype(np.float32)).view(rows, -1)
    return {"weight": pack_nibbles(q), "scale": d, "offset": offset}


def dequantize_parts(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight of quantized tensors as from_blocks / quantize_* give them."""
    w, scale = parts["weight"], parts["scale"]
    if "offset" in parts:
        q = unpack_nibbles(w).float()
        offset = parts["offset"]
    else:
        q, offset = w.float(), torch.zeros_like(scale)
    N, K = q.shape
    g = K // scale.shape[1]
    return (q.view(N, -1, g) * scale[..., None] + offset[..., None]).view(N, K)


def same_format(state: dict[str, torch.Tensor], prefixes: list[str]) -> None:
    """Before Linears are fused (concatenated rows), their tensors must be alike: if some are quantized
    differently from the others (or not at all), dequantize the quantized ones to float32."""

    def fmt(p):
        scale = state.get(p + "scale")
        return (state[p + "weight"].dtype, None if scale is None else scale.shape[1], p + "offset" in state)

    if len({fmt(p) for p in prefixes}) > 1:
        for p in prefixes:
            if p + "scale" in state:
                parts = {k: state.pop(p + k) for k in ("weight", "scale", "offset") if p + k in state}
                state[p + "weight"] = dequantize_parts(parts)


# ---- whole models ----


def resolve_mode(mode: str | None, source_format: str | None = None) -> str:
    """'auto' (or None) picks the fastest mode that passes the quality guard (gptchat/quality.py):

    - a GGUF file: int4. Its Q4_0/Q4_1 blocks run as they are and its Q8_0 blocks stay 8-bit, so nothing is
      lost beyond the file's own quantization (other tensor types are quantized to int4);
    - float weights (a Hugging Face directory, a float checkpoint): int8, which stays within 2% of float32's
      perplexity; int4 from float weights costs more (see the README's Speed section), so it is opt-in.
    Without the int4 kernel, int8; without the int8 kernel either, none.
    """
    if mode in (None, "auto"):
        if source_format == "gguf" and int4_kernel_available():
            return "int4"
        return "int8" if int8_kernel_available() else "none"
    if mode not in QUANT_MODES:
        raise InvalidParameterError("quant", f"unknown quantization {mode!r} (known: auto, {', '.join(QUANT_MODES)})")
    return mode


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Module:
    if mode == "int4" and int4_fits(linear.out_features, linear.in_features):
        return Int4Linear.from_linear(linear)
    return Int8Linear.from_linear(linear)  # int8, or int4 where the shape does not fit the int4 kernel


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every float Linear (and the token embedding, the tied head) in place; modules that are
    already quantized (loaded from GGUF blocks) stay as they are."""
    if mode == "none":
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, quantize_linear(child, mode))
            elif isinstance(child, nn.Embedding) and name == "tok_emb":
                as_linear = nn.Linear(child.embedding_dim, child.num_embeddings, bias=False, device="meta")
                as_linear.weight = child.weight
                setattr(module, name, QuantizedEmbedding(quantize_linear(as_linear, mode)))
    return model


def empty_quantized(state: dict[str, torch.Tensor], prefix: str, in_features: int, out_features: int,
                    bias: bool) -> nn.Module | None:
    """The (meta-device) quantized Linear that `state` holds at `prefix`, judged by its tensors; None if float."""
    w, scale = state.get(prefix + "weight"), state.get(prefix + "scale")
    if w is None or scale is None:
        return None
    if w.dtype == torch.uint8:
        return Int4Linear(in_features, out_features, bias, in_features // scale.shape[-1], device="meta")
    return Int8Linear(in_features, out_features, bias, scale.shape[-1] if scale.dim() == 2 else 1, device="meta")


def adopt_quantized_structure(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Swap in quantized modules (on the meta device) wherever `state` holds quantized tensors, so that
    `load_state_dict(state, assign=True)` adopts them as they are."""
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{prefix}.{name}." if prefix else f"{name}."
            if isinstance(child, nn.Linear):
                new = empty_quantized(state, full, child.in_features, child.out_features, child.bias is not None)
            elif isinstance(child, nn.Embedding) and name == "tok_emb":
                new = empty_quantized(state, full + "head.", child.embedding_dim, child.num_embeddings, False)
                new = QuantizedEmbedding(new) if new is not None else None
            else:
                continue
            if new is not None:
                setattr(module, name, new)
    return model


def held_quantization(state: dict[str, torch.Tensor]) -> str | None:
    """What a saved state dict holds: 'int4', 'int8', or None for float weights."""
    dtypes = {v.dtype for k, v in state.items() if k.endswith(".weight")}
    return "int4" if torch.uint8 in dtypes else "int8" if torch.int8 in dtypes else None


def quantization_of(model: nn.Module) -> str:
    """'int4' if any weight is 4-bit, else 'int8' if any is 8-bit, else 'none'."""
    kinds = {type(m) for m in model.modules()}
    return "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds else "none"
