"""What this CPU can do, from /proc/cpuinfo's flags: which kernels and dtypes are fast here."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The first processor's feature flags (empty where /proc/cpuinfo cannot be read: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split(":")[-1].split())
    except OSError:
        return frozenset()


def cpu_has_fast_bf16() -> bool:
    """bfloat16 matmuls beat float32 only with native bf16 instructions (avx512_bf16, AMX); on plain AVX2 they
    are emulated, several times slower."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
