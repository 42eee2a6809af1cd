"""The GPT: one decoder-only Transformer for the GPT-2 and the Llama families.

attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, computed by F.scaled_dot_product_attention.

The two families differ in four places, each chosen by `config.arch`:

    GPT-2: learned position embeddings, LayerNorm with bias, GELU MLP, biases in every Linear
    Llama: rotary position embeddings (RoPE), RMSNorm, SwiGLU MLP, no biases, grouped-query attention

Parameter names are our own (see `GPT.__init__`); the checkpoint loaders map other formats onto them.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

ARCHS = ("gpt2", "llama")


@dataclass
class GPTConfig:
    arch: str = "llama"  # "gpt2" or "llama"
    vocab_size: int = 49152
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain multi-head)
    n_embd: int = 768
    head_dim: int | None = None  # None means n_embd // n_head
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd
    max_seq_len: int = 1024  # context length
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # RoPE base (llama only)
    tie_embeddings: bool = True  # the output head reuses the token embedding
    bias: bool | None = None  # biases in the attention/MLP Linears; None means True for gpt2, False for llama
    attn_bias: bool | None = None  # biases in q/k/v only (Qwen2-style); None means same as `bias`
    activation: str | None = None  # "gelu_tanh" (GPT-2), "gelu", or "silu"; None picks the family's

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r} (known: {', '.join(ARCHS)})")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.n_inner = self.n_inner or 4 * self.n_embd
        if self.bias is None:
            self.bias = self.arch == "gpt2"
        if self.attn_bias is None:
            self.attn_bias = self.bias
        if self.activation is None:
            self.activation = "gelu_tanh" if self.arch == "gpt2" else "silu"
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def activation_fn(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown activation {name!r}")


def fused_ops(x: torch.Tensor):
    """gptchat's kernel ops for the small ops between matmuls (rms_norm, silu_mul, rope: one pass each, see
    kernels/elementwise.cpp) where this process has loaded them and they apply: on the CPU, in inference.
    Not while compiling (inductor fuses PyTorch's ops itself; ours would be calls it cannot fuse) nor where
    gradients flow (they have no backward). Else None: PyTorch's ops."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return None
    return kernels.loaded()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32 and (ops := fused_ops(x)) is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.arch == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, config.norm_eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin for rotate-half RoPE (the Hugging Face convention), shaped [B, T, 1, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None]  # [B, T, 1, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    if x.dtype in (torch.float32, torch.bfloat16) and cos.dtype == torch.float32 and (ops := fused_ops(x)) is not None:
        return ops.rope(x, cos, sin)  # the same float32 operations as below, in one pass
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


CACHE_RESERVE_BYTES = 256 * 2**20  # address space a new CPU cache may take ahead of need (see zeros_on_touch)


def zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A zero tensor whose CPU memory becomes resident only where it is written.

    Its storage is an anonymous memory mapping: the kernel hands out zero pages on first touch, so a KV
    cache sized for a long context costs the process only the positions it has filled (and nothing reads
    beyond those), and needs no reallocation, no copy of what it holds, as a conversation grows.
    torch.zeros writes every page. Other devices: torch.zeros."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # not shared memory (Unix)
    return torch.frombuffer(mmap.mmap(-1, nbytes, **private), dtype=dtype).view(shape)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated and grown by doubling.

    `length` counts the positions filled; the model writes new keys at [length, length + T) and then
    `advance(T)`. Setting `length` back (`truncate`) forgets a suffix, which lets a chat reuse the
    cache for the part of the prompt it shares with the previous turn. On the CPU its memory is resident
    only as far as it is filled (zeros_on_touch), so `GPT.new_cache` reserves room generously.
    """

    def __init__(self, config: GPTConfig, batch_size: int, capacity: int, dtype=torch.float32, device="cpu"):
        self.config = config
        self.batch_size = batch_size
        self.dtype, self.device = dtype, device
        self.length = 0
        self._alloc(min(capacity, config.max_seq_len))

    def _alloc(self, capacity: int):
        c = self.config
        shape = (c.n_layer, self.batch_size, c.n_kv_head, capacity, c.head_dim)
        self.k = zeros_on_touch(shape, self.dtype, self.device)
        self.v = zeros_on_touch(shape, self.dtype, self.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, total: int):
        """Make room for `total` positions (copying what is kept), never beyond the context length."""
        if total > self.config.max_seq_len:
            raise ValueError(f"{total} positions exceed the context length {self.config.max_seq_len}")
        if total <= self.capacity:
            return
        self._move(min(max(total, 2 * self.capacity), self.config.max_seq_len))

    def _move(self, capacity: int, rows: list[int] | None = None, first: int = 0):
        """New tensors of `capacity` positions holding rows `rows` (all by default) of the filled positions
        from `first` on: only what is filled is copied, so untouched memory stays untouched."""
        old_k, old_v, n = self.k, self.v, self.length
        if rows is not None:
            self.batch_size = len(rows)
        self._alloc(capacity)
        for new, old in ((self.k, old_k), (self.v, old_v)):
            kept = old[:, :, :, first:n]
            new[:, :, :, : n - first] = kept if rows is None else kept[:, rows]
        self.length = n - first

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values for `layer` (converted to the cache's dtype); return all keys/values so
        far (views, no copy)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def layers(self) -> list[torch.Tensor]:
        """Each layer's keys, then each layer's values (views, as the compiled step takes them), made once per
        pair of cache tensors: unbinding them afresh cost the step ~0.1 ms a token."""
        held = getattr(self, "_layers", None)
        if held is None or held[0] is not self.k or held[1] is not self.v:
            held = self._layers = (self.k, self.v, [*self.k.unbind(0), *self.v.unbind(0)])
        return held[2]

    def advance(self, n: int):
        self.length += n

    def truncate(self, length: int):
        self.length = min(self.length, length)

    def select(self, rows: list[int]):
        """Keep only these batch rows (finished sequences leave the batch)."""
        self._move(self.capacity, rows)

    def drop_front(self, n: int):
        """Forget the first n positions of every row (padding no row uses any more); later ones move up."""
        self._move(self.capacity - n, first=n)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        # q, k and v in one matmul (fewer, larger kernels per decoded token); rows are [q; k; v]
        self.wqkv = nn.Linear(c.n_embd, (c.n_head + 2 * c.n_kv_head) * c.head_dim, bias=c.attn_bias)
        self.wo = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=c.bias)

    def forward(self, x, rope, cache: KVCache | None, layer: int, mask):
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        # split, not slicing: in training, split's backward is one cat, a slice's a zero-filled copy each
        qk, v = qkv.split((self.n_head + self.n_kv_head, self.n_kv_head), dim=2)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated together: half the small ops per token
        q, k = qk.split((self.n_head, self.n_kv_head), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        gqa = self.n_kv_head != self.n_head
        ops = decode_attention_ops(q, self.n_head // self.n_kv_head) if T == 1 else None
        prompt_ops = prompt_attention_ops(q) if T > 1 and mask is None and ops is None else None
        if ops is None and prompt_ops is None and k.dtype != q.dtype:  # a float16 cache, for PyTorch's attention
            k, v = k.to(q.dtype), v.to(q.dtype)
        if prompt_ops is not None:  # a prompt's tokens over themselves and the cache: gptchat's kernel
            y = prompt_ops.prompt_attention(q, k, v.to(k.dtype))  # (without a cache, k is float32 after RoPE)
        elif ops is not None:  # one new token per row over its cache: gptchat's kernel (see there)
            scores = ops.gqa_scores(q[:, :, 0] * self.head_dim**-0.5, k)
            if mask is not None:  # [B, 1, 1, S]: a batch's padding keys (each row sees at least itself)
                scores = scores.masked_fill(~mask[:, :, 0], float("-inf"))
            y = ops.gqa_mix(scores.softmax(dim=-1), v)[:, :, None]
        elif mask is None:  # no padding and the queries are the last T of the keys
            causal = T > 1
            if causal and k.shape[2] != T:  # continuing a cache: queries sit at the end of the keys
                mask = causal_mask(T, k.shape[2], x.device)
                causal = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def decode_attention_ops(q: torch.Tensor, group: int):
    """gptchat's kernel ops for one query per row over a cache (gqa_scores, gqa_mix), where this process has
    loaded them (quantized models do, on their first matmul) and they apply: float32 on the CPU, head size a
    multiple of 8, at most 8 query heads per key/value head. Else None: PyTorch's attention."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or not kernel_attention_fits(q.shape[-1], group):
        return None
    return kernels.loaded()


PROMPT_ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what prompt_attention reads


def prompt_attention_ops(q: torch.Tensor):
    """gptchat's kernel op for a prompt's causal attention (prompt_attention), where this process has loaded the
    kernels and it applies: on the CPU, not for training (it has no backward), head size a multiple of 8. It was
    ~2x faster than PyTorch's flash kernel on SmolLM2's 500-token prompts. Else None: PyTorch's attention."""
    if q.device.type != "cpu" or q.requires_grad or q.shape[-1] % 8 or q.dtype not in PROMPT_ATTENTION_DTYPES:
        return None
    return kernels.loaded()


def kernel_attention_fits(head_dim: int, group: int) -> bool:
    """Whether gptchat's decode attention ops take these heads: a head size that is a multiple of 8, and at
    most 8 query heads (`group`) per key/value head."""
    return head_dim % 8 == 0 and group <= 8


def fuse_projections(state: dict, n_layer: int) -> dict:
    """Checkpoint formats store q, k, v (and gate, up) as separate matrices; we keep each group as one
    Linear. Turn `attn.wq/wk/wv` into `attn.wqkv` and `mlp.w_gate` + `mlp.w_up` into `mlp.w_gate_up`.
    Quantized parts (scale, offset) are fused alike; parts quantized differently are dequantized first.
    A group with a part missing is left alone, so the loader reports the missing tensor by name."""
    from .quantize import same_format

    groups = (("attn", ("wq", "wk", "wv"), "wqkv"), ("mlp", ("w_gate", "w_up"), "w_gate_up"))
    for i in range(n_layer):
        for module, parts, fused in groups:
            prefixes = [f"blocks.{i}.{module}.{p}." for p in parts]
            if all(p + "weight" in state for p in prefixes):
                same_format(state, prefixes)
            for kind in ("weight", "bias", "scale", "offset"):
                names = [p + kind for p in prefixes]
                if all(n in state for n in names):
                    state[f"blocks.{i}.{module}.{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])
    return state


def causal_mask(n_query: int, n_key: int, device) -> torch.Tensor:
    """Boolean [n_query, n_key] mask (True = may attend) for queries at the last n_query key positions."""
    offset = n_key - n_query
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(diagonal=offset)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        c = config
        self.gated = c.arch == "llama"  # SwiGLU: down(act(gate(x)) * up(x)); GPT-2: down(act(up(x)))
        self.act = activation_fn(c.activation)
        if self.gated:  # gate and up in one matmul; rows are [gate; up]
            self.w_gate_up = nn.Linear(c.n_embd, 2 * c.n_inner, bias=c.bias)
        else:
            self.w_up = nn.Linear(c.n_embd, c.n_inner, bias=c.bias)
        self.w_down = nn.Linear(c.n_inner, c.n_embd, bias=c.bias)

    def forward(self, x):
        if self.gated:
            gate_up = self.w_gate_up(x)
            fusable = self.act is F.silu and gate_up.dtype in (torch.float32, torch.bfloat16)
            if fusable and (ops := fused_ops(gate_up)) is not None:
                return self.w_down(ops.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.w_down(self.act(gate) * up)
        return self.w_down(self.act(self.w_up(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache, layer, mask):
        x = x + self.attn(self.attn_norm(x), rope, cache, layer, mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        c = self.config = config
        # embeddings are created empty (a random init of a 49152-row table on the meta device costs
        # seconds); init_weights() below fills every parameter
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd, _weight=torch.empty(c.vocab_size, c.n_embd))
        if c.arch == "gpt2":
            self.pos_emb = nn.Embedding(c.max_seq_len, c.n_embd, _weight=torch.empty(c.max_seq_len, c.n_embd))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = make_norm(c)
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self._kernels_prepared = False  # see prepare_kernels
        if not self.tok_emb.weight.is_meta:  # on the meta device the loader assigns real weights instead
            self.init_weights()

    def init_weights(self, std: float = 0.02):
        """GPT-2 initialisation: normal(0, std), output projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm weights
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):  # the residual projections
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)
        return self

    def head(self, x):
        if not self.config.tie_embeddings:
            return self.lm_head(x)
        if hasattr(self.tok_emb, "project"):  # a quantized embedding brings its own matmul
            return self.tok_emb.project(x)
        return F.linear(x, self.tok_emb.weight)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor):
        """Token embeddings (plus learned positions for GPT-2), and RoPE's cos/sin for Llama (else None)."""
        x = self.tok_emb(idx)
        if self.config.arch == "gpt2":
            return x + self.pos_emb(positions), None
        return x, rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `idx` [B, T].

        cache: keys/values of earlier tokens; these T tokens are appended to it.
        positions: [B, T] position ids (default: the next T positions after the cache).
        key_mask: [B, S] bool, False for padding keys, S = cached + T (batches of unequal prompts).
        last_only: compute logits for the last position only (what generation needs; saves the head).
        """
        if not getattr(self, "_kernels_prepared", False) and not torch.compiler.is_compiling():
            self.prepare_kernels()
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        x, rope = self.embed(idx, positions)
        mask = None
        if key_mask is not None:
            # padding keys are hidden; each query also sees itself so padding rows stay finite (no NaN)
            itself = torch.eye(T, start + T, dtype=torch.bool, device=idx.device).roll(start, dims=1)
            mask = (causal_mask(T, start + T, idx.device) & key_mask[:, None, : start + T]) | itself
            mask = mask[:, None]  # [B, 1, T, S]
        if cache is not None:
            cache.reserve(start + T)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))

    def prepare_kernels(self):
        """Quantized layers into gptchat's kernel layout, which loads the kernels, before the first forward (as
        an Engine does when it is made): else the first call's first norm would run before any kernel is
        loaded, as PyTorch's ops (fused_ops), and the first call would differ from later ones in the last bits."""
        from .quantize import use_kernel_layout

        use_kernel_layout(self)
        self._kernels_prepared = True

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty KV cache for this model with room for at least `capacity` positions, in the dtype its
        decoding reads (cache_dtype). On the CPU, where a cache's untouched memory costs nothing, it
        reserves as many positions as CACHE_RESERVE_BYTES of address space hold (up to the context), so
        that a growing conversation seldom reallocates it."""
        c, dtype = self.config, self.cache_dtype()
        if self.norm.weight.device.type == "cpu":
            per_position = 2 * c.n_layer * batch_size * c.n_kv_head * c.head_dim * dtype.itemsize
            capacity = max(capacity, CACHE_RESERVE_BYTES // per_position)
        return KVCache(c, batch_size, capacity, dtype=dtype)

    def cache_dtype(self) -> torch.dtype:
        """float16 for a quantized model whose decode attention runs on gptchat's kernel (on the CPU), as
        llama.cpp's default cache: a decoded token reads every cached key and value once, and those reads bound
        the attention ops (float16 made them ~30% faster at 700 cached tokens; the cache also takes half the
        memory). float32 otherwise, which keeps `--quant none` the exact float32 path."""
        from .quantize import QUANTIZED_LINEARS

        c = self.config
        fits = kernel_attention_fits(c.head_dim, c.n_head // c.n_kv_head) and self.norm.weight.device.type == "cpu"
        if fits and any(isinstance(m, QUANTIZED_LINEARS) for m in self.modules()) and kernels.ops() is not None:
            return torch.float16
        return torch.float32

    def num_parameters(self) -> int:
        """Number of weights (a quantized weight counts its values, two per byte for int4; scales and
        offsets are not weights)."""
        state = self.state_dict().items()
        return sum(t.numel() * (2 if t.dtype == torch.uint8 else 1)
                   for name, t in state if not name.endswith((".scale", ".offset")))
