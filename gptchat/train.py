"""One training loop for pre-training and supervised fine-tuning.

    loss = cross-entropy of the next token, over every position (pre-training) or only the
           assistant's tokens (SFT, where the data brings a mask)

AdamW (fused when this torch has it), linear warm-up then cosine decay to `min_lr_ratio` x the peak,
gradient accumulation, clipping. Every `save_every` steps a checkpoint `OUT/step-NNNNNN/` is written:
a native model directory (`gptchat chat --model` loads it) plus `optimizer.pt` and `trainer.json`, built
under a temporary name and renamed, so a crash never leaves half a checkpoint; the last `keep` remain.
`resume` continues from the newest one exactly: the data order is a function of (seed, step), the
schedule a function of step, and the optimizer and RNG states are restored.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoints.native import load_native, save_native
from .errors import GptchatError
from .model import GPT, GPTConfig

PRESETS = {  # name: (n_layer, n_head, n_embd)
    "tiny": (4, 4, 128),
    "small": (6, 6, 384),
    "gpt2-124m": (12, 12, 768),
}


def model_config(vocab_size: int, seq_len: int, *, preset: str | None = "tiny", depth=None, width=None,
                 heads=None, arch: str = "llama") -> GPTConfig:
    """A preset, with any of depth/width/heads overriding it."""
    layers, n_head, n_embd = PRESETS[preset or "tiny"]
    n_layer, n_head, n_embd = depth or layers, heads or n_head, width or n_embd
    if n_embd % n_head:
        raise GptchatError(f"width {n_embd} is not a multiple of heads {n_head}")
    return GPTConfig(arch=arch, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     max_seq_len=seq_len)


@dataclass
class TrainSettings:
    out: str
    steps: int
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 0
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_accum: int = 1
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep: int = 2
    log_every: int = 10
    seed: int = 0
    kind: str = "pretrain"


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to s.lr, then cosine down to s.lr * s.min_lr_ratio at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: GPT, s: TrainSettings) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms and biases); fused kernels when available."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas)


def loss_fn(model: GPT, x, y, mask=None, reduction: str = "mean"):
    """Next-token cross-entropy; with a mask, only over the masked-in positions."""
    logits = model(x)
    losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    if mask is not None:
        mask = mask.reshape(-1).to(losses.dtype)
        total, count = (losses * mask).sum(), mask.sum()
    else:
        total, count = losses.sum(), losses.new_tensor(float(losses.numel()))
    if reduction == "sum":
        return total, count
    return total / count.clamp(min=1)


@torch.no_grad()
def evaluate(model: GPT, data, device) -> dict:
    """Mean validation loss (nats per target token) and, for text, bits per byte."""
    model.eval()
    total, count = 0.0, 0.0
    for x, y, m in data.val_batches():
        t, c = loss_fn(model, x.to(device), y.to(device), None if m is None else m.to(device), reduction="sum")
        total, count = total + t.item(), count + c.item()
    model.train()
    if not count:
        return {}
    out = {"val_loss": total / count}
    if data.bytes_per_token:
        out["val_bpb"] = out["val_loss"] / math.log(2) / data.bytes_per_token
    return out


# ---- checkpoints -----------------------------------------------------------------------------


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first (a complete one has trainer.json)."""
    return sorted(p for p in out.glob("step-*") if (p / "trainer.json").is_file())


def save_checkpoint(out: Path, step: int, model: GPT, optimizer, tokenizer, s: TrainSettings, info: dict) -> Path:
    """Model + optimizer + trainer state under a temporary name, then renamed: all or nothing."""
    final = out / f"step-{step:06d}"
    tmp = out / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_native(tmp, model.config, state, tokenizer, {**info, "step": step, "kind": s.kind})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    trainer = {"step": step, "settings": asdict(s), "torch_rng": torch.get_rng_state().tolist()}
    (tmp / "trainer.json").write_text(json.dumps(trainer))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(out)[: -s.keep] if s.keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: GPT, optimizer) -> int:
    """Restore model, optimizer and RNG from a checkpoint; the step to continue from."""
    config, state, _, _ = load_native(path)
    model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in state.items()})
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    trainer = json.loads((path / "trainer.json").read_text())
    torch.set_rng_state(torch.tensor(trainer["torch_rng"], dtype=torch.uint8))
    return trainer["step"]


def drop_metrics_after(path: Path, step: int):
    """On resume, forget the metrics of steps that are about to be run again."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text("".join(line + "\n" for line in lines if json.loads(line).get("step", 0) <= step), encoding="utf-8")


# ---- the loop --------------------------------------------------------------------------------


def train(model: GPT, tokenizer, data, s: TrainSettings, *, resume: bool = False, device="cpu",
          info: dict | None = None, log=None, stop_after: int | None = None) -> dict:
    """Train for s.steps optimizer steps; returns the last metrics. `stop_after` ends the run early
    (as an interruption would, without a final checkpoint) — for tests of resume."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model.to(device).train().requires_grad_(True)
    optimizer = make_optimizer(model, s)
    start = 0
    if resume:
        found = checkpoints(out)
        if not found:
            raise GptchatError(f"--resume: no checkpoint in {out}")
        start = load_checkpoint(found[-1], model, optimizer)
        log(f"resuming from {found[-1]} (step {start})")
        drop_metrics_after(out / "metrics.jsonl", start)
    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8")
    info = {**(info or {}), "seed": s.seed}
    last = {}
    if start == 0 and s.steps > 0:  # the starting point, for comparison (e.g. SFT held-out loss before/after)
        before = evaluate(model, data, device)
        if before:
            metrics_file.write(json.dumps({"step": 0, **before}) + "\n")
            log("before training: " + " ".join(f"{k} {v:.4f}" for k, v in before.items()))
    t0, tokens = time.time(), 0
    try:
        for step in range(start, s.steps):
            if stop_after is not None and step >= stop_after:
                return last
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(s.grad_accum):
                x, y, m = data.batch(step, micro)
                x, y = x.to(device), y.to(device)
                loss = loss_fn(model, x, y, None if m is None else m.to(device))
                (loss / s.grad_accum).backward()
                loss_sum += loss.item()
                tokens += x.numel()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip) if s.grad_clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last = {"step": done, "loss": loss_sum / s.grad_accum, "lr": lr}
            if norm is not None:
                last["grad_norm"] = float(norm)
            elapsed = time.time() - t0
            last["tok_per_s"] = tokens / elapsed if elapsed > 0 else 0.0
            final = done == s.steps
            if final or (s.eval_every and done % s.eval_every == 0):
                last.update(evaluate(model, data, device))
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            if final or done % s.log_every == 0 or done == start + 1:
                eta = (s.steps - done) * elapsed / max(1, done - start)
                extra = "".join(f" {k} {last[k]:.4f}" for k in ("val_loss", "val_bpb") if k in last)
                log(f"step {done}/{s.steps} loss {last['loss']:.4f}{extra} lr {lr:.2e} "
                    f"{last['tok_per_s']:,.0f} tok/s eta {eta:.0f}s")
            if final or (s.save_every and done % s.save_every == 0):
                save_checkpoint(out, done, model, optimizer, tokenizer, s, info)
    finally:
        metrics_file.close()
    save_native(out / "model", model.config, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                tokenizer, {**info, "step": s.steps, "kind": s.kind, **{k: v for k, v in last.items() if k.startswith("val")}})
    log(f"saved {out / 'model'}")
    return last
