"""One training loop for pre-training and supervised fine-tuning.

    loss = cross-entropy of the next token, over every position (pre-training) or only the
           assistant's tokens (SFT, where the data brings a mask)

AdamW (fused when this torch has it), linear warm-up then cosine decay to `min_lr_ratio` x the peak,
gradient accumulation, clipping. Every `save_every` steps a checkpoint `OUT/step-NNNNNN/` is written:
a native model directory (`gptchat chat --model` loads it) plus `optimizer.pt` and `trainer.json`, built
under a temporary name and renamed, so a crash never leaves half a checkpoint; the last `keep` remain.
`resume` continues from the newest one exactly: the data order is a function of (seed, step), the
schedule a function of step, and the optimizer and RNG states are restored.

Under `torchrun` the model is wrapped in DistributedDataParallel and each process trains on its rows
of the same global batch (see distributed.py); rank 0 logs, validates, samples and checkpoints.
Options: bf16 autocast (`dtype`), `torch.compile`, greedy sample generations at each checkpoint
(`samples.jsonl`), a progress bar on a terminal, and TensorBoard event files when tensorboard is installed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed
from .checkpoints.native import load_native, save_native
from .cpu import cpu_has_fast_bf16
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
    schedule: str = "cosine"  # or "linear": the decay after warm-up
    dtype: str = "fp32"  # "bf16": autocast matmuls to bfloat16 (weights and optimizer stay float32)
    compile: bool = False  # torch.compile the model (eager with a warning if compiling fails)
    sample_prompts: tuple = ()  # greedy continuations of these at each checkpoint (chat prompts for SFT)
    sample_tokens: int = 32


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to s.lr, then cosine (or linear) decay to s.lr * s.min_lr_ratio at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    remaining = 0.5 * (1 + math.cos(math.pi * progress)) if s.schedule == "cosine" else 1 - progress
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * remaining)


def resolve_dtype(name: str, device) -> str:
    """'auto' -> 'bf16' where the hardware runs it fast (CUDA with bf16, or such a CPU), else 'fp32'."""
    if name != "auto":
        return name
    kind = torch.device(device).type
    fast = torch.cuda.is_bf16_supported() if kind == "cuda" else kind == "cpu" and cpu_has_fast_bf16()
    return "bf16" if fast else "fp32"


def autocast(s: TrainSettings, device):
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if s.dtype == "bf16" else nullcontext()


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
def evaluate(model: GPT, data, device, s: TrainSettings | None = None) -> dict:
    """Mean validation loss (nats per target token) and, for text, bits per byte."""
    model.eval()
    total, count = 0.0, 0.0
    with autocast(s, device) if s else nullcontext():
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


@torch.no_grad()
def greedy(model: GPT, ids: list[int], max_new: int, stop_ids, device) -> list[int]:
    """The likeliest continuation, token by token (no KV cache: a few dozen tokens at a checkpoint)."""
    model.eval()
    x = torch.tensor([ids], device=device)
    new = []
    for _ in range(max_new):
        token = int(model(x[:, -model.config.max_seq_len :], last_only=True)[0, -1].argmax())
        if token in stop_ids:
            break
        new.append(token)
        x = torch.cat([x, x.new_tensor([[token]])], dim=1)
    model.train()
    return new


def write_samples(model: GPT, tokenizer, s: TrainSettings, step: int, out: Path, device, log):
    """Greedy replies to the fixed prompts, appended to samples.jsonl and logged: how the model's text
    grows from checkpoint to checkpoint. SFT prompts are user messages under the chat template."""
    from .templates import render_chat

    with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
        for prompt in s.sample_prompts:
            if s.kind == "sft":
                text = render_chat(tokenizer.chat_template, [{"role": "user", "content": prompt}],
                                   bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
                ids = tokenizer.encode(text)
            else:
                ids = tokenizer.encode(prompt, add_special_tokens=True)
            if not ids or len(ids) >= model.config.max_seq_len:
                continue
            reply = tokenizer.decode(greedy(model, ids, s.sample_tokens, tokenizer.eos_ids, device))
            f.write(json.dumps({"step": step, "prompt": prompt, "sample": reply}, ensure_ascii=False) + "\n")
            log(f"sample @{step}: {prompt!r} -> {reply!r}")


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
    trainer = {"step": step, "settings": asdict(s), "torch_rng": torch.get_rng_state().tolist(),
               "world_size": distributed.world_size()}
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


def tensorboard_writer(out: Path, start: int):
    """TensorBoard event files in OUT/tensorboard when tensorboard is installed; None otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)  # a resumed run overwrites redone steps


def wrap(model: GPT, s: TrainSettings, device):
    """What the loop calls: the model, in DDP when several processes train it, compiled if asked."""
    runner = model
    if distributed.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        on_gpu = torch.device(device).type == "cuda"
        runner = DistributedDataParallel(model, device_ids=[torch.device(device).index] if on_gpu else None)
    return (torch.compile(runner) if s.compile else runner), runner


def train(model: GPT, tokenizer, data, s: TrainSettings, *, resume: bool = False, device="cpu",
          info: dict | None = None, log=None, stop_after: int | None = None, progress: bool | None = None) -> dict:
    """Train for s.steps optimizer steps; returns the last metrics. `stop_after` ends the run early
    (as an interruption would, without a final checkpoint) — for tests of resume. `progress`: a tqdm
    bar (default: when stderr is a terminal)."""
    from tqdm import tqdm

    main, world = distributed.is_main(), distributed.world_size()
    log = (log or (lambda line: tqdm.write(line, file=sys.stderr))) if main else (lambda line: None)
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
        if main:
            for name in ("metrics.jsonl", "samples.jsonl"):
                drop_metrics_after(out / name, start)
    runner, eager = wrap(model, s, device)
    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8") if main else None
    board = tensorboard_writer(out, start) if main else None
    bar = tqdm(total=s.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not main or not (sys.stderr.isatty() if progress is None else progress))
    info = {**(info or {}), "seed": s.seed}
    last = {}

    def record(metrics: dict):
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
        for k, v in metrics.items():
            if board is not None and k != "step":
                board.add_scalar(k, v, metrics["step"])

    def run_step(step: int, net) -> tuple[float, int]:
        """Forward and backward over the step's micro-batches: (global mean loss, global batch tokens)."""
        loss_sum, n_tokens = torch.zeros((), device=device), 0
        for micro in range(s.grad_accum):
            batch = data.batch(step, micro)
            n_tokens += batch[0].numel()
            # the loss is a mean over the global batch's target tokens; DDP averages gradients over
            # ranks, so each rank's sum is scaled by world / (the global count)
            count = batch[2].sum().clamp(min=1) if batch[2] is not None else batch[1].numel()
            x, y, m = (None if t is None else t.to(device) for t in distributed.shard(batch, len(batch[0])))
            sync = micro == s.grad_accum - 1 or world == 1
            with (nullcontext() if sync else net.no_sync()) if hasattr(net, "no_sync") else nullcontext():
                with autocast(s, device):
                    total, _ = loss_fn(net, x, y, m, reduction="sum")
                (total * (world / count / s.grad_accum)).backward()
            loss_sum += total.detach() / count
        return float(distributed.all_sum(loss_sum)) / s.grad_accum, n_tokens

    if main and start == 0 and s.steps > 0:  # the starting point, for comparison (e.g. SFT held-out loss before/after)
        before = evaluate(model, data, device, s)
        if before:
            record({"step": 0, **before})
            log("before training: " + " ".join(f"{k} {v:.4f}" for k, v in before.items()))
    t0, tokens = time.time(), 0
    try:
        for step in range(start, s.steps):
            if stop_after is not None and step >= stop_after:
                return last
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                loss, n_tokens = run_step(step, runner)
            except Exception as e:  # compiling happens at the first call: fall back to eager if it fails
                if runner is eager:
                    raise
                log(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    "training without it")
                optimizer.zero_grad(set_to_none=True)
                runner = eager
                loss, n_tokens = run_step(step, runner)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip) if s.grad_clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            tokens += n_tokens
            last = {"step": done, "loss": loss, "lr": lr}
            if norm is not None:
                last["grad_norm"] = float(norm)
            elapsed = time.time() - t0
            last["tok_per_s"] = tokens / elapsed if elapsed > 0 else 0.0
            final = done == s.steps
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{last['tok_per_s']:,.0f}", refresh=False)
            if not main:
                continue
            if final or (s.eval_every and done % s.eval_every == 0):
                last.update(evaluate(model, data, device, s))
            record(last)
            if final or done % s.log_every == 0 or done == start + 1:
                eta = (s.steps - done) * elapsed / max(1, done - start)
                extra = "".join(f" {k} {last[k]:.4f}" for k in ("val_loss", "val_bpb") if k in last)
                log(f"step {done}/{s.steps} loss {last['loss']:.4f}{extra} lr {lr:.2e} "
                    f"{last['tok_per_s']:,.0f} tok/s eta {eta:.0f}s")
            if final or (s.save_every and done % s.save_every == 0):
                save_checkpoint(out, done, model, optimizer, tokenizer, s, info)
                if s.sample_prompts and s.sample_tokens > 0:
                    write_samples(model, tokenizer, s, done, out, device, log)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        if board is not None:
            board.close()
    if main:
        save_native(out / "model", model.config, {k: v.detach().cpu() for k, v in model.state_dict().items()}, tokenizer,
                    {**info, "step": s.steps, "kind": s.kind, **{k: v for k, v in last.items() if k.startswith("val")}})
        log(f"saved {out / 'model'}")
    distributed.barrier()  # the others wait for rank 0's last checkpoint and model
    return last
