"""gptchat's own CPU kernels: quantized matmuls (decoding, batches and prompts) and the attention of a
decoded token over its cache (quant_matmul.cpp), a prompt's causal attention (attention.cpp), and a sampled
token drawn from a row of logits in one call (sampling.cpp; gptchat/sampling.py uses it whenever the library
is loaded), and the small ops between a layer's matmuls, each in one pass (elementwise.cpp: RMSNorm, SwiGLU,
RoPE). simd.h holds the vector helpers they share.

PyTorch's weight-only int4 kernel converts bfloat16 activations in software on CPUs without avx512_bf16,
which makes it compute-bound there. This one does what llama.cpp does on AVX2: activations quantized to
16-bit integers per block of 32, integer dot products with the weights, which Int4Linear and Int8Linear hold
in the kernel's own layout while it serves them (`to_lanes`: 16 weight rows side by side, float16 scales). The
attention ops read a float32 or a float16 cache (quantized models keep theirs in float16).

It is compiled on first use (`torch.utils.cpp_extension.load`, g++ and ninja; ~30 s) into the cache,
under a name keyed by the source and torch version, and only on CPUs with AVX2, FMA and F16C. Where it cannot be
built or loaded, `ops()` returns None and the quantized Linears use PyTorch's kernels instead; so does
GPTCHAT_KERNELS=aten.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from ..cpu import cpu_flags

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("quant_matmul.cpp", "sampling.cpp", "attention.cpp", "elementwise.cpp")]
HEADERS = [Path(__file__).with_name("simd.h")]
BLOCK = 32  # columns per quantization block, on both sides of the dot products
LANES = 16  # weight rows side by side in the kernel's layout (quant_matmul.cpp)
# -ffp-contract=off: a * b + c stays two roundings where the source says so (dequantization matches PyTorch's).
# -fopenmp: at::parallel_for is inline OpenMP in ATen's headers; without the flag the pragma is dropped and
# the kernel runs on one thread. The OpenMP runtime is the libgomp.so.1 torch has already loaded.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
_loaded: list = []  # [] until the first try, then [the ops namespace, or None]
_lock = threading.Lock()


def cpu_supported() -> bool:
    """AVX2, FMA and F16C (float16 caches) on x86-64 Linux: the kernel's instructions."""
    return {"avx2", "fma", "f16c"} <= cpu_flags()


@functools.cache
def build_key() -> str:
    """The hash of the source, the flags and the torch version: it names the build, and the kernel layouts
    saved for it (layout_cache). Read once a process: a start asks for it several times."""
    code = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    return hashlib.sha256(code + " ".join(CFLAGS).encode() + torch.__version__.encode()).hexdigest()[:16]


def build_target() -> tuple[str, Path]:
    """(library name, build folder): cache/kernels/<build_key>."""
    from ..checkpoints import cache_root

    key = build_key()
    return f"gptchat_quant_matmul_{key}", cache_root() / "kernels" / key


def find_ninja() -> None:
    """torch runs `ninja` from PATH; the pip package's (a dependency) may not be on it, in a venv not activated."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build():
    """Compile (or find already compiled) and load the kernel; the ops namespace, or None with the reason logged."""
    if not cpu_supported():
        log.info("gptchat kernels: this CPU lacks AVX2/FMA/F16C; using PyTorch's quantized matmuls")
        return None
    name, build_dir = build_target()
    if not load_built(build_dir / f"{name}.so"):
        from torch.utils import cpp_extension

        try:
            find_ninja()
            build_dir.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=name, sources=[str(source) for source in SOURCES], build_directory=str(build_dir),
                               extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        except Exception as e:  # no compiler, no ninja, a failed build: PyTorch's kernels still work
            last_line = (str(e).strip().splitlines() or [""])[-1]
            log.warning("gptchat kernels: could not build %s (%s: %s); using PyTorch's quantized matmuls",
                        " and ".join(source.name for source in SOURCES), type(e).__name__, last_line)
            return None
    register_fakes()
    return torch.ops.gptchat


def load_built(library: Path) -> bool:
    """Load a library compiled before, without importing the build machinery (setuptools, ~0.2 s). False if
    there is none, or it is damaged (then it is removed: ninja would think it up to date and not rebuild it)."""
    if not library.is_file():
        return False
    try:
        torch.ops.load_library(str(library))
        return True
    except OSError as e:
        log.warning("gptchat kernels: could not load %s (%s); building it again", library, e)
        library.unlink(missing_ok=True)
        return False


def register_fakes() -> None:
    """Output shapes without running the kernel, so torch.compile can trace through the ops."""

    @torch.library.register_fake("gptchat::to_lanes")
    def _(weight, scale, offset):
        groups, K = -(-weight.shape[0] // LANES), weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
        half = scale.new_empty(groups, K // 32 * LANES, dtype=torch.float16)  # scales (and offsets) in float16
        parts = [weight.new_empty(groups, K * LANES // (2 if weight.dtype == torch.uint8 else 1)), half]
        return parts + [torch.empty_like(half)] if offset is not None else parts

    @torch.library.register_fake("gptchat::int4_linear")
    def _(x, weight, scale, offset, N):
        return x.new_empty(x.shape[0], N)

    @torch.library.register_fake("gptchat::int8_linear")
    def _(x, weight, scale, N):
        return x.new_empty(x.shape[0], N)

    @torch.library.register_fake("gptchat::lanes_to_bf16")
    def _(weight, scale, offset, N):
        K = weight.shape[1] // (LANES * 32 // (2 if offset is not None else 1)) * 32
        return weight.new_empty(N, K, dtype=torch.bfloat16)

    @torch.library.register_fake("gptchat::gqa_scores")
    def _(q, k):
        return q.new_empty(q.shape[0], q.shape[1], k.shape[2])

    @torch.library.register_fake("gptchat::gqa_mix")
    def _(p, v):
        return p.new_empty(p.shape[0], p.shape[1], v.shape[3])

    @torch.library.register_fake("gptchat::prompt_attention")
    def _(q, k, v):
        B, H, T, D = q.shape
        return q.new_empty(B, T, H, D).transpose(1, 2)


def disabled() -> bool:
    """GPTCHAT_KERNELS=aten: PyTorch's kernels only (for A/B runs)."""
    return os.environ.get("GPTCHAT_KERNELS") == "aten"


def ops():
    """torch.ops.gptchat (to_lanes, int4_linear, int8_linear, gqa_scores, gqa_mix, lanes_to_bf16, set_vnni, sample_token,
    prompt_attention, rms_norm, silu_mul, rope), or None: unsupported, failed to build, or GPTCHAT_KERNELS=aten."""
    if disabled():
        return None
    if not _loaded:
        with _lock:  # one build, even when the first calls come from several threads
            if not _loaded:
                _loaded.append(build())
    return _loaded[0]


def loaded():
    """The ops if this process has already loaded them, else None (never starts a build)."""
    if disabled():
        return None
    return _loaded[0] if _loaded else None


def build_pending() -> bool:
    """Whether the first ops() call will compile the kernel (the CLI says so before that pause)."""
    if _loaded or disabled() or not cpu_supported():
        return False
    name, build_dir = build_target()
    return not (build_dir / f"{name}.so").exists()
