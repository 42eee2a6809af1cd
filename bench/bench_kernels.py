"""gptchat's quantized-matmul kernel (gptchat/kernels) against PyTorch's weight-only kernels
(GPTCHAT_KERNELS=aten), alternating A and B in one process (the machine is shared): per-call time on
SmolLM2-135M's shapes, and with --decode the whole decode step of the default model (int4).

    python bench/bench_kernels.py [--rows 1] [--repeats 7] [--threads N] [--decode]
"""

import argparse
import os
import time

import torch

from gptchat import kernels
from gptchat.quantize import Int4Linear, Int8Linear

SHAPES = [  # (what, N, K, kind): SmolLM2-135M's Linears and its Q8_0 tied head
    ("qkv", 960, 576, "int4"), ("o", 576, 576, "int4"), ("gate+up", 3072, 576, "int4"),
    ("down", 576, 1536, "int4"), ("head (Q8_0)", 49152, 576, "int8"),
]


def per_call_us(layer, x, calls):
    with torch.inference_mode():
        layer(x)
        t = time.perf_counter()
        for _ in range(calls):
            layer(x)
    return (time.perf_counter() - t) / calls * 1e6


def decode_step_ms(repeats, steps=20):
    """Best ms per decoded token of the default model (int4), each kernel in turn, 17 tokens of context."""
    from gptchat.checkpoints import load_model
    from gptchat.model import KVCache

    lm = load_model(None, quant="int4")
    cache = KVCache(lm.config, 1, 1024)
    token = torch.tensor([[42]])
    best = {"aten": float("inf"), "gptchat": float("inf")}
    with torch.inference_mode():
        lm.model(torch.arange(1, 18)[None], cache=cache, last_only=True)
        for _ in range(repeats):
            for impl in best:
                os.environ["GPTCHAT_KERNELS"] = impl
                lm.model(token, cache=cache, last_only=True)
                t = time.perf_counter()
                for _ in range(steps):
                    lm.model(token, cache=cache, last_only=True)
                best[impl] = min(best[impl], (time.perf_counter() - t) / steps * 1e3)
                cache.truncate(17)  # decode from the same context again
    os.environ.pop("GPTCHAT_KERNELS")
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7, help="A/B alternations; the best of each is printed")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--decode", action="store_true", help="also time whole decode steps of the default model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.ops() is None:
        raise SystemExit("gptchat kernels unavailable here (see the log)")
    print(f"{torch.get_num_threads()} threads, {args.rows} row(s); best of {args.repeats}, microseconds per call")
    print(f"{'layer':<12} {'N x K':>12} {'aten':>9} {'gptchat':>9} {'speedup':>8}")
    for what, N, K, kind in SHAPES:
        linear = torch.nn.Linear(K, N, bias=False)
        layer = Int4Linear.from_linear(linear) if kind == "int4" else Int8Linear.from_linear(linear)
        x = torch.randn(args.rows, K)
        calls = max(3, int(2e5 // (N * K / 1000)))
        best = {"aten": float("inf"), "gptchat": float("inf")}
        for _ in range(args.repeats):
            for impl in best:
                os.environ["GPTCHAT_KERNELS"] = impl
                best[impl] = min(best[impl], per_call_us(layer, x, calls))
        os.environ.pop("GPTCHAT_KERNELS")
        print(f"{what:<12} {f'{N} x {K}':>12} {best['aten']:9.0f} {best['gptchat']:9.0f} {best['aten'] / best['gptchat']:7.2f}x")
    if args.decode:
        best = decode_step_ms(args.repeats)
        print(f"decode step, SmolLM2 int4, ms/token: aten {best['aten']:.1f}, gptchat {best['gptchat']:.1f} "
              f"({best['aten'] / best['gptchat']:.2f}x)")


if __name__ == "__main__":
    main()
