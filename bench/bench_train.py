#!/usr/bin/env python
"""Pre-training throughput: gptchat's GPT against transformers' GPT2LMHeadModel of the same shape.

Both models are GPT-2 (learned positions, LayerNorm, GELU), 6 layers, 6 heads, width 384, context 256,
trained with batch 16 on the same batches of the same text, with the same AdamW (fused when this torch
has it), schedule, clipping and precision, starting from the same weights (transformers' copy is our
initialisation exported with gptchat.checkpoints.export_hf), in the same process. Steps alternate
between the models in chunks, so a machine shared with other work slows both alike.

Figures per precision (fp32; bf16 autocast too with --dtypes fp32,bf16, the default where bf16 is fast):

    tok/s      training tokens (batch x context) per second over the timed steps (after --warmup steps)
    val loss   validation loss (nats/token) on held-out text after the same training tokens: equal
               curves mean both models compute the same thing

    python bench/bench_train.py                          # 6x384, 40 steps, fp32 (+ bf16 where fast)
    python bench/bench_train.py --steps 10 --warmup 2    # a quick check
    python bench/bench_train.py --data my_text/ --dtypes fp32,bf16 --compile --json out.json

Data: --data (text files or folders); by default the Python standard library's own source (text that
every machine has), the first --max-mb megabytes. A byte-level BPE of --vocab-size tokens is trained on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptchat.checkpoints.export_hf import hf_config, hf_state_dict  # noqa: E402
from gptchat.data import TextData, prepare_text  # noqa: E402
from gptchat.model import GPT, GPTConfig  # noqa: E402
from gptchat.tokenizer import Tokenizer  # noqa: E402
from gptchat.tokenizer_train import train_tokenizer  # noqa: E402
from gptchat.train import TrainSettings, autocast, evaluate, loss_fn, lr_at, make_optimizer, resolve_dtype  # noqa: E402


class LogitsOnly(nn.Module):
    """transformers' model called as ours is: ids -> logits (so one loss function serves both)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx):
        return self.hf(input_ids=idx, use_cache=False).logits


def default_text(directory: Path, max_mb: float) -> list[Path]:
    """The standard library's .py files, concatenated up to max_mb into one file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, size = directory / "stdlib.txt", 0
    with open(out, "w", encoding="utf-8") as f:
        for p in sorted(stdlib.glob("*.py")):
            text = p.read_text(encoding="utf-8", errors="replace")
            f.write(text + "\n")
            size += len(text)
            if size > max_mb * 1e6:
                break
    return [out]


def build_pair(vocab: int, args):
    """Our GPT and transformers' GPT2LMHeadModel with identical weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = GPTConfig(arch="gpt2", vocab_size=vocab, n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                       max_seq_len=args.context)
    ours = GPT(config)

    class _Tok:  # hf_config only reads the special ids
        bos_id = eos_id = pad_id = None
        eos_ids = set()

    cfg = {k: v for k, v in hf_config(config, _Tok()).items() if k not in ("architectures", "model_type", "torch_dtype")}
    theirs = GPT2LMHeadModel(GPT2Config(**cfg))
    missing, unexpected = theirs.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)  # lm_head is tied
    return ours, LogitsOnly(theirs)


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_train.") as work:
        return measure(args, Path(work))


def measure(args, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    files = args.data or default_text(work, args.max_mb)
    print(f"tokenizer: training {args.vocab_size} tokens on {', '.join(map(str, files))}", file=sys.stderr)
    tok, _ = train_tokenizer(files, args.vocab_size)
    tok.save(work / "tok")
    tok = Tokenizer.from_file(work / "tok")
    meta = prepare_text(files, tok, work / "shards", val_fraction=0.05)
    data = TextData(work / "shards", args.batch, args.context, seed=args.seed, val_batches=args.val_batches)
    print(f"data: {meta['train_tokens']:,} training tokens, {meta['val_tokens']:,} validation", file=sys.stderr)
    results = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, "
                          f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}",
               "config": vars(args) | {"data": [str(f) for f in files]}, "rows": []}
    total = args.warmup + args.steps
    for dtype in args.dtypes:
        s = TrainSettings(out=str(work), steps=total, lr=args.lr, warmup=max(1, total // 10), dtype=dtype)
        ours, theirs = build_pair(tok.vocab_size, args)
        runners = {"gptchat": ours, "transformers": theirs}
        if args.compile:
            runners["gptchat"] = torch.compile(ours)
        optimizers = {name: make_optimizer(m, s) for name, m in (("gptchat", ours), ("transformers", theirs))}
        params = {"gptchat": ours, "transformers": theirs}
        for m in params.values():
            m.train()
        seconds = {name: 0.0 for name in runners}
        step = {name: 0 for name in runners}
        while min(step.values()) < total:
            for name, runner in runners.items():  # alternate chunks: drift in machine load hits both
                for _ in range(min(args.chunk, total - step[name])):
                    x, y, _ = data.batch(step[name])
                    t0 = time.perf_counter()
                    for group in optimizers[name].param_groups:
                        group["lr"] = lr_at(step[name], s)
                    with autocast(s, "cpu"):
                        loss = loss_fn(runner, x, y)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params[name].parameters(), 1.0)
                    optimizers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                    elapsed = time.perf_counter() - t0
                    if step[name] >= args.warmup:
                        seconds[name] += elapsed
                    step[name] += 1
                print(f"{dtype} {name}: step {step[name]}/{total} loss {loss.item():.4f}", file=sys.stderr)
        tokens = args.steps * args.batch * args.context
        for name in runners:
            val = evaluate(params[name], data, "cpu", s)["val_loss"]
            results["rows"].append({"dtype": dtype, "model": name + (" (compiled)" if args.compile and name == "gptchat" else ""),
                                    "tok_per_s": tokens / seconds[name], "val_loss": val,
                                    "train_tokens": total * args.batch * args.context})
    return results


def table(results: dict) -> str:
    rows = results["rows"]
    base = {r["dtype"]: r["tok_per_s"] for r in rows if r["model"] == "transformers"}
    base_fp32 = base.get("fp32")
    lines = ["| precision | model | tok/s | vs transformers (same precision) | vs transformers fp32 | val loss |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        vs32 = f"{r['tok_per_s'] / base_fp32:.2f}x" if base_fp32 else "—"
        lines.append(f"| {r['dtype']} | {r['model']} | {r['tok_per_s']:,.0f} | {r['tok_per_s'] / base[r['dtype']]:.2f}x "
                     f"| {vs32} | {r['val_loss']:.4f} |")
    c = results["config"]
    lines.append("")
    lines.append(f"{c['layers']} layers, {c['heads']} heads, width {c['width']}, context {c['context']}, batch {c['batch']}, "
                 f"vocab {c['vocab_size']}; {c['steps']} timed steps after {c['warmup']} warm-up; val loss after "
                 f"{rows[0]['train_tokens']:,} tokens. {results['machine']}.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", type=Path, help="text files or folders (default: Python's stdlib source)")
    p.add_argument("--max-mb", type=float, default=2.0, help="megabytes of the default text (default 2)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40, help="timed steps per model and precision (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--chunk", type=int, default=5, help="steps per turn when alternating the models (default 5)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-batches", type=int, default=4, help="validation batches (default 4)")
    p.add_argument("--dtypes", default=None, help="comma-separated: fp32, bf16 (default: fp32, plus bf16 where it is fast)")
    p.add_argument("--compile", action="store_true", help="torch.compile gptchat's model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    args.dtypes = args.dtypes.split(",") if args.dtypes else ["fp32"] + (["bf16"] if resolve_dtype("auto", "cpu") == "bf16" else [])
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))


if __name__ == "__main__":
    main()
