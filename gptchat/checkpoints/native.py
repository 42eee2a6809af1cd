"""Our own checkpoint format: a directory with

    gptchat.json        {"format": "gptchat", "version": 1, "config": {GPTConfig}, "info": {...}}
    model.safetensors   the state dict under our parameter names (memory-mapped on load)
    tokenizer.json, tokenizer_config.json   (Tokenizer.save)

Written into a temporary directory that is renamed into place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..model import GPTConfig

MARKER = "gptchat.json"
FORMAT_VERSION = 1


def is_native(directory: Path) -> bool:
    return (directory / MARKER).is_file()


@contextmanager
def atomic_directory(directory: str | Path):
    """Yield a sibling temp directory to fill; on success it replaces `directory` (renames), on any
    error it is removed. A reader sees the old directory or the new one, never half of one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_native(directory: str | Path, config: GPTConfig, state: dict[str, torch.Tensor], tokenizer, info: dict | None = None):
    """Write atomically: build in a sibling temp dir, then rename over `directory`."""
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tokenizer.save(tmp)
        meta = {"format": "gptchat", "version": FORMAT_VERSION, "config": config.to_dict(), "info": info or {}}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def load_native(directory: Path):
    """(config, state_dict, tokenizer, info); the tensors are memory-mapped from model.safetensors."""
    from safetensors.torch import load_file

    from ..tokenizer import Tokenizer

    try:
        meta = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{directory}: unreadable {MARKER} ({e})") from None
    if meta.get("format") != "gptchat" or meta.get("version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{directory}: {MARKER} is not a gptchat checkpoint of a version this gptchat reads")
    try:
        config = GPTConfig.from_dict(meta["config"])
        state = load_file(str(directory / "model.safetensors"))
    except Exception as e:
        raise ModelLoadError(f"{directory}: damaged checkpoint ({e})") from None
    tokenizer = Tokenizer.from_file(directory)
    return config, state, tokenizer, dict(meta.get("info") or {})
