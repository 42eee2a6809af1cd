"""The kernel layout of a cached model, saved beside it and memory-mapped on later loads.

gptchat's kernel reads quantized weights in its own "lanes" layout (quantize.KernelLayout), which checkpoints
do not hold: they keep the portable form. Converting a model at every start cost ~0.13 s (SmolLM2 int4, 2
threads) before its first token, and left the converted weights in the process's private memory. A model
loaded from gptchat's conversion cache (a GGUF file's entry under ~/.cache/gptchat/models) therefore gets
the converted tensors written once into its entry, `kernel-layout-<kernel key>.safetensors`, and later
processes map that file instead of converting: no conversion, and weights that are shared page cache, not
private memory. The key is the kernel library's (its source, flags and torch version), so a changed layout
is never read. Checkpoints a user saved are left as they are: nothing is written into them.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from . import kernels
from .pages import file_mappings

PREFIX = "kernel-layout-"
FORMAT = "gptchat-kernel-layout"


def layout_file(directory: Path) -> Path:
    """Where a cache entry's kernel layout lives, for the kernel this process would build or load."""
    return Path(directory) / f"{PREFIX}{kernels.build_key()}.safetensors"


def expected_shapes(layer) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of each tensor `to_lanes` makes for this layer (quant_matmul.cpp: `to_lanes`)."""
    groups = -(-layer.out_features // kernels.LANES)
    blocks = layer.in_features // kernels.BLOCK
    int4 = len(layer.PARTS) == 3
    weight_bytes = blocks * kernels.LANES * (kernels.BLOCK // 2 if int4 else kernels.BLOCK)
    half = ((groups, blocks * kernels.LANES), torch.float16)
    shapes = {"weight": ((groups, weight_bytes), torch.uint8 if int4 else torch.int8), "scale": half}
    if int4:
        shapes["offset"] = half
    return shapes


def adopt(layers: dict[str, object], directory: Path) -> list[str]:
    """Give `layers` (name -> a KernelLayout layer still in the portable layout) their tensors from the
    entry's saved kernel layout, memory-mapped. Returns the names adopted: none where there is no file, or
    where anything in it does not match what converting these layers would give."""
    from safetensors import safe_open

    path = layout_file(directory)
    if not path.is_file():
        return []
    try:
        with safe_open(str(path), framework="pt") as f:  # the tensors are views of the file's mapping
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return []
            scale_groups = json.loads(meta["scale_groups"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception:  # unreadable or damaged: converted again, and saved again
        return []
    if not isinstance(scale_groups, dict):
        return []
    found = {}
    for name, layer in layers.items():
        if name not in scale_groups:
            continue
        parts = {}
        for part, (shape, dtype) in expected_shapes(layer).items():
            t = tensors.get(f"{name}.{part}")
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                return []
            parts[part] = t
        found[name] = parts
    mappings = file_mappings()  # stays valid throughout: adopting maps no file and unmaps none
    for name, parts in found.items():
        layers[name].adopt_lanes(parts, int(scale_groups[name]), mappings)
    return list(found)


def save(layers: dict[str, object], directory: Path) -> None:
    """Write the kernel layout of `layers` (name -> a layer holding it) into the cache entry, atomically (a
    temporary file renamed into place), replacing any saved for another kernel. Failing to write is not an
    error: the next load converts again."""
    from safetensors.torch import save_file

    path = layout_file(directory)
    tensors, scale_groups = {}, {}
    for name, layer in layers.items():
        for part in layer.PARTS:
            tensors[f"{name}.{part}"] = getattr(layer, part)
        scale_groups[name] = layer.portable_scale_groups
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    except OSError as e:
        warnings.warn(f"could not save the kernel layout at {path}: {e}")
        return
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "scale_groups": json.dumps(scale_groups)})
        os.replace(tmp, path)
        for stale in path.parent.glob(f"{PREFIX}*.safetensors"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not save the kernel layout at {path}: {e}")
