"""A compiled decode step: one token through the model as one torch.compile'd graph.

In eager PyTorch a decoded token costs hundreds of small kernel launches (norms, RoPE, reshapes, the
quantized matmuls), and at batch 1 their fixed costs are a large share of the token's time. Compiling the
step fuses the small ops and drops the Python between them.

The graph must not change from token to token, so the step does not slice the cache by Python ints:
this token's keys and values are written at a position tensor (`index_copy_`), and attention reads the
first `window` positions, a size marked dynamic (as is the cache's capacity, which doubles as a sequence
grows). One graph then serves every step of every sequence at this batch size.

Compiled code is cached on disk by inductor (its FX graph cache, under gptchat's cache directory), so
only the first run pays the compile (tens of seconds); later runs trace the model again (seconds) and
load the compiled code. Where compiling fails (no C++ compiler, an unsupported op), the step says so once
and decoding continues in eager mode.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from .model import GPT, KVCache


class StepCache:
    """The KV cache as the compiled step sees it: write at `pos`, read the first `window` positions."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int):
        self.k, self.v, self.pos, self.window = k, v, pos, window

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer, :, :, : self.window], self.v[layer, :, :, : self.window]


def decode_step(model: GPT, idx: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                window: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] for one new token per row, idx [B, 1], all at position pos [1]; the cache
    tensors k, v [layers, B, kv heads, capacity, head dim] get its keys/values. window: a tensor whose
    length is the number of positions to attend to (pos + 1), passed as a size so the graph stays the same."""
    n = window.shape[0]
    x, rope = model.embed(idx, pos.expand(idx.shape[0], 1))
    mask = (torch.arange(n, device=idx.device) <= pos)[None, None, None]  # [1, 1, 1, n]
    cache = StepCache(k, v, pos, n)
    for i, block in enumerate(model.blocks):
        x = block(x, rope, cache, i, mask)
    return model.head(model.norm(x))[:, -1]


def prepare_kernels(model: torch.nn.Module) -> None:
    """Derive every quantized layer's kernel tensors now, so the compiler does not trace that conversion."""
    for m in model.modules():
        if hasattr(m, "kernel") and callable(m.kernel):
            m.kernel()


def use_cache_dir() -> None:
    """Inductor's compiled code goes under gptchat's cache directory (unless the user chose a place)."""
    from .checkpoints import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True


_STEP = None


def compiled_step():
    """decode_step through torch.compile, once per process: every engine shares its compiled graphs."""
    global _STEP
    if _STEP is None:
        use_cache_dir()
        _STEP = torch.compile(decode_step, fullgraph=True)
    return _STEP


class CompiledDecoder:
    """Decodes one token for a KVCache of batch size 1 through the compiled step; eager if it fails."""

    def __init__(self, model: GPT, announce: bool = True):
        self.model = model
        self.announce = announce
        self.failed = False
        self._fn = None

    def _compiled(self):
        if self._fn is None:
            prepare_kernels(self.model)
            self._fn = compiled_step()
        return self._fn

    @torch.inference_mode()
    def __call__(self, token: int, cache: KVCache) -> torch.Tensor | None:
        """The next logits [vocab], or None when compiling failed (the caller decodes eagerly)."""
        if self.failed:
            return None
        pos = cache.length
        cache.reserve(pos + 1)
        window = torch.empty(pos + 1, dtype=torch.bool)
        torch._dynamo.mark_dynamic(window, 0)
        torch._dynamo.mark_dynamic(cache.k, 3)
        torch._dynamo.mark_dynamic(cache.v, 3)
        if _STEP is None and self.announce:
            print("gptchat: compiling the decode step (the first time takes a while; it is cached)...",
                  file=sys.stderr, flush=True)
        try:
            logits = self._compiled()(self.model, torch.tensor([[token]]), torch.tensor([pos]), cache.k, cache.v, window)
        except Exception as e:  # no compiler, an op it cannot handle: decode eagerly instead
            self.failed = True
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "decoding without it")
            return None
        cache.advance(1)
        return logits[0]
